"""Save and exit on a signal: SLURM's time-limit warning (USR1) or pre-emption (TERM).

The handler only records the signal (Megatron-LM's `--exit-signal-handler` style): acting inside
it would stop a rank in the middle of a collective. The training loop asks `should_exit()` once
per iteration, at the same point on every rank; it all-reduces the flag, so all ranks leave after
the same iteration, save one checkpoint together and exit, even when the signal reached only
some of them.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """Context manager that records `signals` while training runs and restores the previous
    handlers afterwards.

        with ExitSignalHandler() as exit_signal:
            while training:
                step()
                if exit_signal.should_exit():
                    save(); break
    """

    def __init__(self, signals=EXIT_SIGNALS):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "ExitSignalHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def should_exit(self, group=None) -> bool:
        """Whether any rank of `group` (default: all) received a signal. Collective."""
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        flag = torch.tensor([int(self.received is not None)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
