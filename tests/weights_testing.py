"""Inverses of the TP sharding of `weights` and `state_dict_adapter` (gathering every rank's
shard back into the full tensor): what the tests compare sharded models with."""
from __future__ import annotations

import torch

from megatron_dflash.state_dict_adapter import split_kind
from megatron_dflash.weights import merge_fc1, split_fc1


def gather_columns(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_columns` over all ranks (TP-rank order)."""
    return torch.cat(shards, dim=0)


def gather_rows(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_rows` over all ranks (TP-rank order)."""
    return torch.cat(shards, dim=1)


def gather_qkv(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_qkv` over all ranks: the shards are contiguous slices of the fused QKV."""
    return torch.cat(shards, dim=0)


def gather_fc1(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_fc1` `[gate_0; up_0], [gate_1; up_1]...` -> `[gate; up]`."""
    gates, ups = zip(*(split_fc1(s) for s in shards))
    return merge_fc1(torch.cat(gates, dim=0), torch.cat(ups, dim=0))


def gather(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full draft state dict from every TP rank's (in rank order)."""
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        kind = split_kind(name)
        out[name] = (gather_qkv(parts) if kind == "qkv" else gather_fc1(parts) if kind == "fc1"
                     else gather_rows(parts) if kind == "rows"
                     else gather_columns(parts) if kind == "columns" else parts[0])
    return out
