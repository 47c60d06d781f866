"""Read a Hugging Face checkpoint (safetensors files, or an in-memory state dict) slice by slice.

Shapes come from the safetensors headers; a tensor's data is read only when asked for, and only
the slice asked for (`get_shard`: one tensor-parallel slice), so each rank reads what it holds.
A *view* names a basic-index slice of a stored tensor as a tensor of its own (e.g. one expert of
transformers 5's fused `mlp.experts.gate_up_proj`); it is read slice by slice like any tensor. A
*decoded* view names a tensor the checkpoint stores in another form (transposed, quantized:
gpt-oss's MXFP4 experts), read by decoding only the stored slices the asked slice needs.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from megatron_dflash.weights import shard_range

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# A view: (stored tensor, index), the index one int (drops that dim) or slice (keeps it) per
# leading dim of the stored tensor; the dims after it are kept whole.
View = tuple[str, tuple[int | slice, ...]]


@dataclass(frozen=True)
class Decoded:
    """A decoded view: a tensor of `shape` stored as the tensors `stored`; `read(raw, index)`
    returns its `index` (one slice per dim), reading stored slices through `raw(key, index)`
    (a basic-index read, counted in `elements_read`)."""

    shape: tuple[int, ...]
    stored: tuple[str, ...]
    read: Callable[[Callable, tuple[slice, ...]], torch.Tensor]


class HFCheckpoint(contextlib.ExitStack):
    """Names, shapes and tensors of a safetensors checkpoint directory or an in-memory state dict.

    `elements_read` counts the elements `get` and `get_shard` returned, so tests can check that a
    rank reads only its slices.
    """

    def __init__(self, source: str | Path | Mapping[str, torch.Tensor]):
        super().__init__()
        self._handles = {}
        self._views: dict[str, View] = {}
        self._decoded: dict[str, Decoded] = {}
        self.elements_read = 0
        if isinstance(source, Mapping):
            self._state_dict = source
            self.name = "state dict"
            self.shapes = {k: tuple(v.shape) for k, v in source.items()}
            self.files = {}
        else:
            self._state_dict = None
            self._open(Path(source))
        self._stored = dict(self.shapes)

    def _open(self, path: Path) -> None:
        index = path / INDEX_FILE
        if index.is_file():
            self.name = str(index)
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({path / f for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard}: listed in {index} but not found")
        else:
            self.name = str(path)
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors file")
        self.shapes, self.files = {}, {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())
                    self.files[key] = shard

    def add_views(self, views: Mapping[str, View | Decoded]) -> None:
        """Name slices of stored tensors (`View`) and decoded tensors (`Decoded`); the stored
        tensors they read leave `shapes` (read through their views only, so nothing is counted
        twice)."""
        stored = set()
        for name, view in views.items():
            if isinstance(view, Decoded):
                self.shapes[name] = tuple(view.shape)
                if view.stored[0] in self.files:
                    self.files[name] = self.files[view.stored[0]]
                self._decoded[name] = view
                stored |= set(view.stored)
                continue
            key, index = view
            stored.add(key)
            shape = self._stored[key]
            self.shapes[name] = tuple(
                len(range(*item.indices(size))) for item, size in zip(index, shape)
                if isinstance(item, slice)) + shape[len(index):]
            if key in self.files:
                self.files[name] = self.files[key]
            self._views[name] = (key, index)
        for key in stored:
            self.shapes.pop(key, None)

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        for key, shape in expected.items():
            if key not in self.shapes:
                raise ValueError(f"{self.name}: tensor {key!r} is missing (expected shape "
                                 f"{list(shape)})")
            if self.shapes[key] != tuple(shape):
                raise ValueError(f"{self.files.get(key, self.name)}: tensor {key!r} has shape "
                                 f"{list(self.shapes[key])}, config.json implies {list(shape)}")

    def get(self, key: str) -> torch.Tensor:
        if key in self._decoded:
            return self._decoded[key].read(self._read, tuple(map(slice, self.shapes[key])))
        if key in self._views:
            return self._read(*self._views[key])
        if self._state_dict is not None:
            tensor = self._state_dict[key]
        else:
            tensor = self._handle(key).get_tensor(key)
        self.elements_read += tensor.numel()
        return tensor

    def get_shard(self, key: str, dim: int, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s even slice of `key` along `dim`, reading only that slice."""
        return self.get_range(key, dim, *shard_range(self.shapes[key], dim, rank, size))

    def get_range(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """`key[..., start:stop, ...]` along `dim`, reading only that range (e.g. one rank's
        heads inside one part of a fused projection)."""
        if key in self._decoded:
            index = [slice(None)] * len(self.shapes[key])
            index[dim] = slice(start, stop)
            return self._decoded[key].read(self._read, tuple(index))
        stored, index = self._views.get(key, (key, ()))
        shape = self._stored[stored]
        index = [*index, *(slice(None),) * (len(shape) - len(index))]
        at = [i for i, item in enumerate(index) if isinstance(item, slice)][dim]
        offset = index[at].indices(shape[at])[0]
        index[at] = slice(offset + start, offset + stop)
        return self._read(stored, tuple(index))

    def _read(self, key: str, index: tuple[int | slice, ...]) -> torch.Tensor:
        if self._state_dict is not None:
            tensor = self._state_dict[key][index]
        else:
            tensor = self._handle(key).get_slice(key)[index]
        self.elements_read += tensor.numel()
        return tensor

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = self.enter_context(safe_open(file, framework="pt"))
        return self._handles[file]


def hf_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of an HF checkpoint directory (e.g. `model.norm.weight` for a draft's initial
    final norm when the target was built without it)."""
    with HFCheckpoint(path) as checkpoint:
        return checkpoint.get(name)
