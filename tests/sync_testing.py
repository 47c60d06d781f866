"""Recording the operations that make the host wait for the GPU (a device->host sync), on CPU.

On CUDA these ops block the Python thread until the device has caught up: the value or the output
shape they return depends on device data. One between forward and backward drains the launch
queue every micro-batch. On CPU nothing waits, so a test records the ops instead
(`record_host_syncs`): the aten ops under a dispatch mode, and the tensor methods that copy to the
host (they do not dispatch at all when the tensor is already on the CPU) under a function mode.
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Whatever their arguments: a data-dependent output shape, or a value read on the host.
SYNCING = {aten.nonzero, aten.argwhere, aten._local_scalar_dense, aten.masked_select,
           aten.masked_scatter, aten.bincount, aten._unique, aten._unique2, aten.unique_dim,
           aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal, aten.is_nonzero,
           aten.allclose}
# With a boolean index (a `nonzero` inside), but see `_syncs` for `t[mask] = scalar`.
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Host copies of tensor data (`.tolist()`, `.numpy()`, `.cpu()`).
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
# Host data made into a device tensor: a blocking copy from pageable memory, which waits for the
# stream (what a step needs of host data belongs in the micro-batch, copied ahead from pinned).
HOST_DATA = {torch.tensor, torch.as_tensor}


def _syncs(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in SYNCING:
        return True
    if packet in BOOL_INDEXED:
        indices = [i for i in (args[1] if len(args) > 1 else kwargs["indices"]) if i is not None]
        if not any(i.dtype in (torch.bool, torch.uint8) for i in indices):
            return False
        # `t[mask] = scalar`: one mask and a one-element host value (setitem makes the scalar a
        # CPU tensor for a CUDA `t` too) is `masked_fill_` inside `_index_put_impl_`: no sync.
        value = args[2] if len(args) > 2 else kwargs.get("values")
        return not (packet is not aten.index and len(indices) == 1 and value.numel() == 1
                    and value.device.type == "cpu")
    if packet is aten.repeat_interleave:  # the output length is a sum of the repeats
        return (isinstance(args[0] if func is aten.repeat_interleave.Tensor else args[1],
                           torch.Tensor)
                and kwargs.get("output_size") is None)
    return False


def _where() -> str:
    """The innermost frame of the project's or megatron's code that led here (not the CPU
    adaptations' pass-through)."""
    for frame in reversed(traceback.extract_stack()):
        if (any(part in frame.filename for part in ("megatron_dflash", "megatron/core"))
                and not frame.filename.endswith("megatron_dflash/cpu.py")):
            return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


class HostSyncs(TorchDispatchMode):
    """The host-syncing ops seen, as 'op at file:line' strings; `paused()` stops recording."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.recording = True

    def record(self, name: str) -> None:
        if self.recording:
            self.seen.append(f"{name} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        recording, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = recording


class _HostCopies(TorchFunctionMode):
    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.syncs.record(f"Tensor.{func.__name__}")
        elif func in HOST_DATA and (kwargs or {}).get("device") is not None:
            self.syncs.record(f"torch.{func.__name__}(..., device=...)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_syncs():
    """`with record_host_syncs() as syncs:` ... `assert not syncs.seen, syncs.seen`."""
    syncs = HostSyncs()
    with _HostCopies(syncs), syncs:
        yield syncs
