"""Micro-batches prepared ahead, off the training step's critical path.

Drawing anchors and building block inputs, labels and masks is host work; done inside the step it
stalls the GPU once per micro-batch. A `Prefetcher` runs the (deterministic) producer in a
background thread `depth` micro-batches ahead, pins their tensors when CUDA is present, and hands
them out already copied to the training device (asynchronously, from pinned memory), so every
collective of the step also sees device tensors. Pinning copies a tensor into pinned storage of
its own strides, so every tensor of a micro-batch must be contiguous (`check_pinnable`, checked
on every device, so that a CPU run catches what would fail on CUDA).

Resumability is unchanged: what the producer draws depends only on the data position (seed and
consumed samples, `training.step.anchor_generator`), not on timing, and each item carries the
position *after* it, so a checkpoint records what was consumed rather than what was prefetched.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from megatron_dflash.training.step import to_device


def microbatch_tensors(mb: dict) -> dict[str, torch.Tensor]:
    """Every tensor a micro-batch hands to the device, by key (a mask's own as `key.field`)."""
    out = {}
    for key, value in mb.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        else:
            out.update({f"{key}.{name}": t for name, t in value.tensors().items()})
    return out


def check_pinnable(mb: dict) -> None:
    """ValueError naming every tensor of `mb` that is not contiguous. `pin_memory()` copies into
    storage of the tensor's own strides, which `copy_` refuses when elements share memory (an
    expand's stride 0); a strided view would pin, and send, all it strides over."""
    bad = [f"{key} {tuple(t.shape)} strides {t.stride()}"
           for key, t in microbatch_tensors(mb).items() if not t.is_contiguous()]
    if bad:
        raise ValueError(f"micro-batch tensors must be contiguous to be pinned: {', '.join(bad)}")


class Prefetcher:
    """`next()` -> (micro-batch on `device`, data position after it), from `produce()` items
    (micro-batch, position) prepared `depth` ahead in a daemon thread. An exception in the
    producer is raised by the `next()` that would have returned its item."""

    def __init__(self, produce: Callable[[], tuple[dict, int]], device: torch.device,
                 depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth {depth} must be >= 1")
        self._produce, self.device = produce, device
        self._pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dflash-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mb, position = self._produce()
                check_pinnable(mb)
                if self._pin:
                    mb = {k: v.pin_memory() for k, v in mb.items()}
                item = (mb, position)
            except BaseException as error:  # handed to the consumer, which raises it
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[dict, int]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        mb, position = item
        return to_device(mb, self.device), position

    def close(self) -> None:
        """Stop the producer (it finishes the item in hand) and drop what was prepared."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
