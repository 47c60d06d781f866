"""Process-group setup for the command-line tools: torchrun's world (or a world of one) with
megatron tensor parallelism across it."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def initialize_tensor_parallel(seed: int = 1234) -> int:
    """Join torchrun's world (or create a world of one process) and make every rank one
    tensor-parallel rank. Returns the TP size. Keeps a layout that is already initialised."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_state.get_tensor_model_parallel_world_size()
