"""HF <-> megatron-core weight layouts, as pure tensor functions (importer and exporter share them).

Two fused layouts differ from Hugging Face:

* QKV: megatron's `linear_qkv` stores the heads per query group, `[ng, (nh/ng + 2), hd, ...]`: group
  g is `[q heads of g, k_g, v_g]` (HF: separate q_proj, k_proj, v_proj; query head h uses kv head
  h // (nh/ng)). Works for weights `[out, H]` and for biases `[out]`.
* SwiGLU fc1: `[gate; up]` along the output dim; megatron applies the activation to the first half.

Tensor parallelism: a column-parallel weight holds rank r's contiguous slice of dim 0, a
row-parallel one of dim 1. The fused layouts shard their parts, not the fused tensor, where needed:
fc1 holds `[gate_r; up_r]` on rank r; QKV holds whole query groups (or, with fewer groups than
ranks, an even slice of the full fused tensor; see `shard_qkv`).
"""
from __future__ import annotations

import torch

__all__ = [
    "merge_qkv", "split_qkv", "merge_fc1", "split_fc1",
    "shard_range", "check_qkv_groups", "shard_columns", "shard_rows", "shard_qkv", "shard_fc1",
]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              num_query_groups: int) -> torch.Tensor:
    """HF q `[nh*hd, ...]`, k and v `[ng*hd, ...]` -> megatron QKV `[ng*(nh/ng+2)*hd, ...]`."""
    if k.shape != v.shape or k.shape[0] % num_query_groups or q.shape[0] % k.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form "
                         f"{num_query_groups} query groups")
    rest = q.shape[1:]
    q, k, v = (t.reshape(num_query_groups, -1, *rest) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int,
              num_query_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`: megatron fused QKV -> HF (q, k, v)."""
    heads_per_group = num_attention_heads // num_query_groups
    if num_attention_heads % num_query_groups or qkv.shape[0] % (num_attention_heads +
                                                                  2 * num_query_groups):
        raise ValueError(f"fused QKV {tuple(qkv.shape)} does not hold {num_attention_heads} query "
                         f"heads in {num_query_groups} groups")
    head_dim = qkv.shape[0] // (num_attention_heads + 2 * num_query_groups)
    rest = qkv.shape[1:]
    groups = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = groups.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj `[F, H]` -> megatron `linear_fc1` `[2F, H]` = `[gate; up]`."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `merge_fc1`: `[gate; up]` -> (gate, up)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def shard_range(shape: tuple[int, ...], dim: int, rank: int, size: int) -> tuple[int, int]:
    """`[start, stop)` of rank `rank`'s even slice of dim `dim` of a `shape` tensor: one rule for
    slicing a tensor in memory and for reading only that slice from a checkpoint."""
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size - 1}]")
    if shape[dim] % size:
        raise ValueError(f"dim {dim} of a {tuple(shape)} tensor is not divisible by the "
                         f"tensor-parallel size {size}")
    step = shape[dim] // size
    return rank * step, (rank + 1) * step


def _shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    start, stop = shard_range(tensor.shape, dim, rank, size)
    return tensor.narrow(dim, start, stop - start)


def shard_columns(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of a column-parallel weight/bias (dim 0), e.g. the vocab-parallel
    embedding and output layer."""
    return _shard(tensor, 0, rank, size)


def shard_rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of a row-parallel weight (dim 1): `linear_proj`, `linear_fc2`."""
    return _shard(tensor, 1, rank, size)


def shard_qkv(qkv: torch.Tensor, num_query_groups: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of a fused QKV weight/bias (from `merge_qkv`).

    With `num_query_groups >= size` each rank holds `ng/size` whole groups, a contiguous slice.
    With fewer groups than ranks, megatron's `SelfAttention.get_query_key_value_tensors`
    all-gathers the QKV output over TP and re-slices each rank's group from it, so the weight
    is an even slice of the full fused tensor, which may cut a group between ranks. Both cases
    are therefore a plain split along dim 0; this checks that they line up with groups as
    megatron assumes.
    """
    check_qkv_groups(num_query_groups, size)
    return _shard(qkv, 0, rank, size)


def check_qkv_groups(num_query_groups: int, size: int) -> None:
    """megatron shards QKV by whole groups or splits each group evenly over ranks (`shard_qkv`)."""
    if num_query_groups % size and size % num_query_groups:
        raise ValueError(f"num_query_groups={num_query_groups} must divide or be divisible by the "
                         f"tensor-parallel size {size}")


def shard_fc1(fc1: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s `[gate_r; up_r]` of a fused fc1 `[gate; up]`: megatron's per-rank GLU chunks
    its own output in two, so gate and up are sharded separately."""
    gate, up = split_fc1(fc1)
    return merge_fc1(shard_columns(gate, rank, size), shard_columns(up, rank, size))
