"""What a training run tells a person: Megatron-style progress lines, a metrics JSONL file, and
one silencing of the dependency warnings known to be harmless.

Progress goes to stdout from the last rank (it holds the loss): every `--log-interval`
iterations one line in Megatron-LM's `key: value | ...` form, or, when stdout is a terminal, a
progress bar that those lines scroll above. Every iteration's numbers go, one JSON object per
line, to the metrics file (`<--save>/metrics.jsonl`, or `--metrics-file`), never to stdout.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import warnings

from megatron_dflash.log import is_logging_rank, logger

# Dependency warnings that say nothing about this run, each with why it is harmless here.
KNOWN_HARMLESS = (
    # apex is optional (megatron falls back to torch); TE is the optional GPU extra.
    (r".*Apex is not installed.*", "megatron: apex absent, torch fallbacks in use"),
    (r".*Transformer Engine and Apex are not installed.*", "megatron: fused-kernel fallbacks"),
    (r".*Transformer Engine is not installed.*", "megatron: TE absent (local backend)"),
    (r".*torch_dtype.*is deprecated.*", "transformers: renamed argument inside a dependency"),
    (r".*GPTModel IS DEPRECATED.*", "megatron-core 0.19: GPTModel stays the target's builder"),
    (r".*full_param_layout not provided.*", "megatron DDP computes the layout itself"),
    (r".*No CUDA runtime is found.*", "torch cpp_extension probe on a CPU-only machine"),
    (r".*full scope is deprecated.*", "megatron-core 0.19 TransformerConfig: CUDA graphs unused"),
    (r".*MimoModelConfig is experimental.*", "megatron-core imports its experimental MIMO model"),
    (r".*\.grad attribute of a Tensor that is not a leaf.*",
     "megatron's schedule reads the received pipeline tensor's .grad; ours is linked explicitly"),
    (r".*torch.distributed is disabled, unavailable or uninitialized.*",
     "the export reads a checkpoint in one process (no_dist), as intended"),
    (r".*The argument order of load has been changed.*", "torch DCP: keyword arguments used"),
    (r".*MCore's async save is deprecated.*", "megatron 0.19 logs it on every save: its synchronous save runs through that path"),
)
_NOISY_LOGGERS = ("torch.utils.cpp_extension",)


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.match(pattern, message, re.S) for pattern, _ in KNOWN_HARMLESS)


def silence_known_warnings() -> None:
    """Drop the `KNOWN_HARMLESS` warnings (Python warnings and library log records) once, at
    start, before megatron is imported; anything else still shows."""
    for pattern, _ in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropKnown()
    # Records are filtered where they are created (a logger's own filters) or where they are
    # written (handlers, including logging's last-resort stderr handler).
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(drop)
    for handler in [logging.lastResort, *logging.getLogger().handlers,
                    *logging.getLogger("torch").handlers]:
        if handler is not None:
            handler.addFilter(drop)


class Progress:
    """Progress lines (or a bar), and the metrics JSONL, of one run (last rank only)."""

    def __init__(self, total_iters: int, start_iteration: int, log_interval: int,
                 metrics_path: str | None, bar: bool | None = None):
        self.total, self.start, self.log_interval = total_iters, start_iteration, log_interval
        self.active = is_logging_rank()
        self.start_time = time.time()
        self._window = [0, 0.0, 0]  # tokens, seconds, iterations since the last line
        self._bar = None
        self._metrics = None
        if not self.active:
            return
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self._metrics = open(metrics_path, "a", buffering=1)
        if bar if bar is not None else sys.stdout.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_iters, initial=start_iteration, unit="it",
                             dynamic_ncols=True, leave=False)

    def print(self, message: str) -> None:
        """A line above the bar (or just a line)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            logger.info(message)

    def iteration(self, iteration: int, metrics: dict, tokens: int, seconds: float) -> None:
        """Record one iteration: metrics file always; a line every `log_interval`."""
        if not self.active:
            return
        window = self._window
        window[0] += tokens
        window[1] += seconds
        window[2] += 1
        done = iteration - self.start
        eta = (self.total - iteration) * (time.time() - self.start_time) / max(done, 1)
        if self._metrics is not None:
            self._metrics.write(json.dumps({"iteration": iteration, **metrics,
                                            "tokens_per_s": tokens / max(seconds, 1e-9)}) + "\n")
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {metrics['loss']:.4f} tau {metrics['tau']:.3f}")
        if iteration % self.log_interval == 0 or iteration == self.total:
            acc = " ".join(f"{a:.3f}" for a in metrics["acc"][:3])
            self.print(
                f" iteration {iteration:8d}/{self.total:8d} |"
                f" consumed samples: {metrics['consumed_samples']:12d} |"
                f" elapsed time per iteration (ms): {1e3 * window[1] / window[2]:.1f} |"
                f" learning rate: {metrics['lr']:.3E} | loss: {metrics['loss']:.6E} |"
                f" tau: {metrics['tau']:.3f} | acc@1..3: {acc} |"
                f" grad norm: {metrics['grad_norm']:.3f} |"
                f" target tokens/s: {window[0] / max(window[1], 1e-9):.0f} |"
                f" skipped iterations: {metrics['skipped_iterations']:3d} |"
                f" ETA {format_duration(eta)}")
            self._window = [0, 0.0, 0]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
