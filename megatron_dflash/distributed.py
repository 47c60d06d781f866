"""The one distributed start-up of the main job, every tool and the tests.

`init_distributed` joins torchrun's world (its environment), or makes a world of one for a plain
`python` process (127.0.0.1 and a free port: one port scheme, no clash between concurrent jobs),
on NCCL with a GPU and gloo on the CPU (then with megatron-core's CPU adaptations, `cpu.apply`),
and lays megatron's model-parallel groups over it. It is the only place a process group is made.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_dflash import cpu
from megatron_dflash.log import setup_logging
from megatron_dflash.run.config import ParallelArgs

TIMEOUT = datetime.timedelta(minutes=30)
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def world_size() -> int:
    """The world this process is (or will be) part of: torchrun's, or one process."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def device() -> torch.device:
    """Where this rank trains: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelArgs | None = None, seed: int = 1234,
                     timeout: datetime.timedelta = TIMEOUT, backend: str | None = None) -> bool:
    """Join (or make) the world, then, with `parallel`, lay megatron's model-parallel groups
    over it (replacing any earlier layout) and seed its RNG tracker. Returns whether this call
    made the process group (the caller then tears it down: `shutdown_distributed`). `backend`:
    NCCL with a GPU, else gloo, unless given (gloo for work on CPU tensors only)."""
    setup_logging()
    if not torch.cuda.is_available():
        cpu.apply()
    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ:  # a plain `python` process: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if backend is None and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                timeout=timeout)
    if parallel is not None:
        set_parallel_layout(parallel, seed)
    return created


def set_parallel_layout(parallel: ParallelArgs, seed: int) -> None:
    """megatron's model-parallel groups for `parallel` (any earlier layout is destroyed) and the
    model-parallel RNG seeds."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_distributed(created: bool = True) -> None:
    """Destroy megatron's groups and, when `created`, the process group."""
    parallel_state.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(parallel: ParallelArgs | None = None, seed: int = 1234,
                backend: str | None = None):
    """`init_distributed` for the duration of a block; tears down only what it made (inside an
    existing world, e.g. a tool called in-process, the layout stays for the caller)."""
    created = init_distributed(parallel, seed, backend=backend)
    try:
        yield
    finally:
        if created:
            shutdown_distributed()


def launcher_free_env() -> dict[str, str]:
    """This process's environment without torchrun's variables: for a child process that
    starts a world of its own."""
    return {k: v for k, v in os.environ.items()
            if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC")}
