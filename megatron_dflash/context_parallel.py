"""Context parallelism (CP): the frozen target split along the sequence as megatron splits a model,
the draft given back the whole context and a share of the blocks.

Target. Each CP rank holds chunks r and 2CP-1-r of the sequence cut into 2CP equal chunks
(megatron's `get_batch_on_this_cp_rank`: causal attention costs each rank about the same), RoPE
rotates those chunks' global positions (megatron's `get_pos_emb_on_this_cp_rank`) and attention
sees the whole causal context: Transformer Engine's CP attention on GPU (the TE spec,
`cp_comm_type`), an all-gather of K/V in the local SDPA core attention (targets/sdpa_attention.py).
The taps and hidden states come out in that split.

Draft. A block at anchor a attends to the fused context 0..a-1, wherever it was computed, so every
CP rank all-gathers the taps back into sequence order (`gather_sequence`: megatron's all-gather
and the zigzag reorder of its all-gather CP attention) and runs the draft on its share of the
blocks (`blocks_of_rank`). The anchors are drawn exactly as without CP (same generator, same
global anchors) and dealt out afterwards, so any CP layout reproduces one process. The loss
stays the global weighted mean: Σw is summed over data- and context-parallel ranks, and megatron
scales a 2-tuple loss by the CP size while its DDP averages gradients over DP x CP.
"""
from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.experimental_attention_variant.dsa_layout import (
    build_zigzag_allgather_cp_key_reorder, build_zigzag_cp_local_positions)
from megatron.core.utils import get_batch_on_this_cp_rank, get_pg_rank, get_pg_size


def target_inputs(tokens: torch.Tensor, position_ids: torch.Tensor, cp_group):
    """(tokens, position_ids) [b, S] -> this CP rank's chunks [b, S/CP] (megatron's split)."""
    if cp_group is None or get_pg_size(cp_group) == 1:
        return tokens, position_ids
    batch = get_batch_on_this_cp_rank({"tokens": tokens, "position_ids": position_ids},
                                      is_hybrid_cp=False, cp_group=cp_group)
    return batch["tokens"], batch["position_ids"]


def local_positions(local_length: int, cp_group, device) -> torch.Tensor:
    """[s] the global positions of this CP rank's `local_length` tokens."""
    size = get_pg_size(cp_group)
    return build_zigzag_cp_local_positions(local_length * size, size, get_pg_rank(cp_group),
                                           device)


def gather_sequence(x: torch.Tensor, cp_group) -> torch.Tensor:
    """[s, ...] of this CP rank's chunks -> [s*CP, ...] in sequence order. Autograd: the
    gradient is reduce-scattered back to the ranks (each gets the sum over ranks for its rows)."""
    gathered = tensor_parallel.gather_from_sequence_parallel_region(x, group=cp_group)
    order = build_zigzag_allgather_cp_key_reorder(x.shape[0], get_pg_size(cp_group), x.device)
    return gathered.index_select(0, order)


@torch.no_grad()
def gather_context(features: torch.Tensor, cp_group, tp_group, sequence_parallel: bool):
    """The target's taps on this CP rank [S/CP(/TP under SP), b, K*H] -> the whole context the
    draft reads, [S(/TP), b, K*H] (under SP: this TP rank's shard of the sequence)."""
    if get_pg_size(cp_group) == 1:
        return features
    if sequence_parallel:
        features = tensor_parallel.gather_from_sequence_parallel_region(
            features, tensor_parallel_output_grad=False, group=tp_group)
    features = gather_sequence(features, cp_group)
    if sequence_parallel:
        features = tensor_parallel.scatter_to_sequence_parallel_region(features, group=tp_group)
    return features


def sequence_multiple(multiple: int, cp: int) -> int:
    """What padded lengths must be a multiple of under CP: 2CP equal chunks, and each rank's
    S/CP tokens a multiple of `multiple` (sequence-parallel shards, FP8 alignment)."""
    return multiple if cp == 1 else cp * math.lcm(multiple, 2)


def block_multiple(multiple: int, block_size: int, cp: int) -> int:
    """What N*B is padded to under CP: N a multiple of 2CP (`blocks_of_rank`), and each rank's
    N/CP blocks a multiple of `multiple` block tokens."""
    return multiple if cp == 1 else math.lcm(cp * multiple, 2 * cp * block_size)


def blocks_of_rank(anchors: torch.Tensor, keep: torch.Tensor, rank: int, size: int):
    """This CP rank's blocks of [b, N] anchors (N a multiple of 2*size): block slots dealt as
    megatron deals sequence chunks, slot i to rank i mod 2CP when that is < CP, else to
    2CP-1 - (i mod 2CP). Each row's kept blocks come first, ascending (`sample_anchors`), so
    every rank gets a share of them within one of the others' and an anchor-sum (the context
    its blocks attend to) close to theirs, in a fixed [b, N/CP] shape that keeps the kept-first,
    ascending order."""
    if size == 1:
        return anchors, keep
    n = anchors.shape[1]
    if n % (2 * size):
        raise ValueError(f"{n} blocks cannot be dealt to {size} context-parallel ranks: pad them "
                         f"to a multiple of {2 * size} (block_multiple)")
    phase = torch.arange(n) % (2 * size)
    mine = ((phase == rank) | (phase == 2 * size - 1 - rank)).nonzero().squeeze(1)
    return anchors[:, mine], keep[:, mine]
