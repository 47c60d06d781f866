"""One logger for every message the package prints, each written on one rank (megatron's
`log_single_rank` rule: the rank of the default group, or RANK before the group exists; it is
not imported, so that this module loads before megatron's import-time warnings are silenced).

Messages are plain lines on stdout (what a user reads in a job log, as Megatron-LM's own), so the
handler writes `%(message)s` to whatever `sys.stdout` is when the record is emitted (pytest's
capture included). Rank 0 reports set-up and tools; the last rank reports training, since it holds
the pipeline's last stage and so the loss.
"""
from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

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


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def last_rank() -> int:
    return (dist.get_world_size() if dist.is_initialized()
            else int(os.environ.get("WORLD_SIZE", "1"))) - 1


def is_logging_rank() -> bool:
    """The rank that reports training (the last: it holds the loss)."""
    return rank() == last_rank()


def log_rank0(message: str, level: int = logging.INFO) -> None:
    if rank() == 0:
        logger.log(level, message)


def log_last_rank(message: str, level: int = logging.INFO) -> None:
    if is_logging_rank():
        logger.log(level, message)


def log_this_rank(message: str, level: int = logging.INFO) -> None:
    """A message only this rank knows (e.g. a skipped conversation of its shard)."""
    logger.log(level, message)
