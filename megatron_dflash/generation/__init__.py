"""Generation with the frozen megatron target: one KV-cache forward (`engine`), batched greedy or
sampled generation on it (`batch`), and the stop tokens a target ends on (`stop_tokens`)."""
from megatron_dflash.generation.batch import BatchGenerator, Generated, Sampling
from megatron_dflash.generation.engine import TargetEngine, left_pad
from megatron_dflash.generation.stop_tokens import stop_token_ids

__all__ = ["BatchGenerator", "Generated", "Sampling", "TargetEngine", "left_pad",
           "stop_token_ids"]
