"""One logger for every message the package prints, written on one rank with megatron's
`log_single_rank`.

Messages are plain lines on stdout (what a user reads in a job log, as Megatron-LM's own), so the
handler writes `%(message)s` to whatever `sys.stdout` is when the record is emitted (pytest's
capture included). Rank 0 reports set-up and tools; the last rank reports training, since it holds
the pipeline's last stage and so the loss.
"""
from __future__ import annotations

import logging
import sys

import torch.distributed as dist
from megatron.core.utils import log_single_rank

logger = logging.getLogger("megatron_dflash")


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler bound to the current `sys.stdout`, not the one at creation."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send the package's messages to stdout as plain lines (once; entry points call it)."""
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def last_rank() -> int:
    return dist.get_world_size() - 1 if dist.is_initialized() else 0


def is_logging_rank() -> bool:
    """The rank that reports training (the last: it holds the loss)."""
    return not dist.is_initialized() or dist.get_rank() == last_rank()


def log_rank0(message: str, level: int = logging.INFO) -> None:
    log_single_rank(logger, level, message, rank=0)


def log_last_rank(message: str, level: int = logging.INFO) -> None:
    log_single_rank(logger, level, message, rank=last_rank())


def log_this_rank(message: str, level: int = logging.INFO) -> None:
    """A message only this rank knows (e.g. a skipped conversation of its shard)."""
    logger.log(level, message)
