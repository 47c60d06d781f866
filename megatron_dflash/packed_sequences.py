"""Packed rows (`data/packing.py`) as the models see them: where each document starts and ends.

Draft. Per position, the start and end of its document (`document_bounds`): an anchor is
eligible only when its whole block lies in its document, a block sees the context from its
document's start to its anchor, and the draft's RoPE positions count from the document's start.

Target. megatron's packed-sequence format, as its GPT training with packed sequences runs it: the
b rows of a micro-batch are one THD sequence of b*S tokens ([t, 1, h] activations) whose
`cu_seqlens` (`PackedSeqParams`, qkv_format "thd") mark every document (and each row's padding,
a segment of its own). Attention then stays within a document (Transformer Engine's THD kernels;
the local backend's SDPA core attention, one document at a time) and RoPE restarts at each
document's start (megatron's `apply_rotary_pos_emb` with `cu_seqlens`), so each document's taps
are those of its conversation alone. Every pipeline stage takes the boundaries from its own copy
of the micro-batch (`DocumentBoundaries`); the taps reach the draft in the usual [S, b, K*H]
layout (`rows_from_thd`).

Not with context parallelism (refused at the flags): megatron's per-document CP split
(`get_batch_on_this_cp_rank` given `cu_seqlens`) needs Transformer Engine's
`thd_get_partitioned_indices` and every document padded to a multiple of 2*CP, and both the local
all-gather attention and the draft's gather of the taps would need its order.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams


def row_segments(documents: list[list[int]], seq_len: int) -> list[list[int]]:
    """Each row's segments: its documents' lengths, then its padding to `seq_len` (if any)."""
    out = []
    for row in documents:
        if sum(row) > seq_len:
            raise ValueError(f"documents {row} do not fit a row of {seq_len} tokens")
        out.append(list(row) + ([seq_len - sum(row)] if sum(row) < seq_len else []))
    return out


def document_bounds(documents: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) [b, S] long: the first position of each position's document and the one
    past its last (a row's padding is a document of its own, ending at S)."""
    starts, ends = [], []
    for row in row_segments(documents, seq_len):
        lengths = torch.tensor(row)
        first = lengths.cumsum(0) - lengths
        starts.append(first.repeat_interleave(lengths))
        ends.append((first + lengths).repeat_interleave(lengths))
    return torch.stack(starts), torch.stack(ends)


@dataclasses.dataclass
class DocumentBoundaries:
    """The target's view of a micro-batch's packed rows: `cu_seqlens` [n+1] int32 over the b rows
    taken as one sequence of b*S tokens, every document and each row's padding a segment, and
    the longest segment. Moves like a micro-batch tensor."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    def packed_seq_params(self) -> PackedSeqParams:
        """megatron's THD `PackedSeqParams` (queries and keys alike: self-attention)."""
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"cu_seqlens": self.cu_seqlens}

    def to(self, device, non_blocking: bool = False) -> "DocumentBoundaries":
        return DocumentBoundaries(self.cu_seqlens.to(device, non_blocking=non_blocking),
                                  self.max_seqlen)

    def pin_memory(self) -> "DocumentBoundaries":
        return DocumentBoundaries(self.cu_seqlens.pin_memory(), self.max_seqlen)


def document_boundaries(documents: list[list[int]], seq_len: int) -> DocumentBoundaries:
    """The `DocumentBoundaries` of rows holding `documents` (lengths per row), padded to
    `seq_len`."""
    segments = [n for row in row_segments(documents, seq_len) for n in row]
    cu_seqlens = torch.tensor([0] + segments).cumsum(0).to(torch.int32)
    return DocumentBoundaries(cu_seqlens, max(segments))


@torch.no_grad()
def rows_from_thd(x: torch.Tensor, rows: int, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """The target's THD output [b*S(/TP under SP), 1, h] -> [S(/TP), b, h], megatron's layout of
    b rows (under SP: this TP rank's shard of the sequence)."""
    if rows == 1:
        return x
    if sequence_parallel:
        x = tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=tp_group)
    x = x.view(rows, -1, x.shape[-1]).transpose(0, 1).contiguous()
    if sequence_parallel:
        x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=tp_group)
    return x
