"""Megatron's model-parallel state set up and torn down between tests (megatron's own
tests/unit_tests `Utils`, on gloo)."""
import gc

import torch.distributed as dist


def destroy_model_parallel_and_groups():
    """destroy_model_parallel() drops megatron's references but gloo groups stay registered in c10d
    (~60 threads each); destroy every non-WORLD group so repeated layouts stay fast."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d as c10d

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        for pg in list(c10d._world.pg_map.keys()):
            if pg is not c10d.GroupMember.WORLD:
                dist.destroy_process_group(pg)
    gc.collect()


class Utils:
    """Set up and tear down model-parallel state (megatron's tests/unit_tests Utils, on gloo)."""

    @staticmethod
    def initialize_model_parallel(tp=1, pp=1, seed=123, ep=1, etp=None, cp=1):
        from megatron_dflash.distributed import set_parallel_layout
        from megatron_dflash.run.config import ParallelArgs

        destroy_model_parallel_and_groups()
        set_parallel_layout(ParallelArgs(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         context_parallel_size=cp,
                                         expert_model_parallel_size=ep,
                                         expert_tensor_parallel_size=etp), seed)

    @staticmethod
    def destroy_model_parallel():
        if dist.is_initialized():
            dist.barrier()
        destroy_model_parallel_and_groups()
