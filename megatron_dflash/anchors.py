"""Anchors and the packed draft blocks built from them (dflash_spec §6.3 (a), §6.4).

Each training sequence is supervised through N blocks of B slots. Block j starts at a random
anchor a_j, a response token whose whole block fits in the sequence (a_j + B <= S). Its input is
`[token at a_j, MASK, ..., MASK]`, and slot k predicts the token at a_j + k: the same position, no
shift, exactly as at inference where the anchor is the verified bonus token. Slot 0 is given, so it
carries no loss; later slots are down-weighted by exp(-(k-1)/gamma) because a wrong early slot ends
acceptance before a later one is ever used.

Unlike SpecForge's `_sample_anchor_positions`, N is min(num_anchors, most eligible positions in the
batch), without its "-1". Shapes: b sequences, S tokens, N blocks, B = block_size, Q = N*B.
"""
from __future__ import annotations

import math

import torch


def sample_anchors(loss_mask: torch.Tensor, block_size: int, num_anchors: int,
                   generator: torch.Generator, lengths: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to `num_anchors` distinct anchors per sequence, uniformly among eligible positions.

    A position a is eligible when `loss_mask[a]` is set and a + block_size <= S, S being the
    sample's own length (`lengths` [b], when the batch is padded past it) or, in a packed row,
    the end of a's document (`lengths` [b, S], `packed_sequences.document_bounds`): a block never
    crosses into the next document. Every TP rank must
    draw the same anchors, so randomness comes only from `generator` (seeded by the caller from
    seed, step and sample); its draws depend neither on the device of `loss_mask` nor on padding
    at the end of the sequence.

    Args:
        loss_mask: [b, S], nonzero on response tokens.
    Returns:
        anchors [b, N] long and keep [b, N] bool, N = min(num_anchors, max eligible count). In each
        row the kept anchors come first, ascending; the remaining slots hold anchor 0, keep False.
    """
    b, seq_len = loss_mask.shape
    eligible = eligible_anchors(loss_mask, block_size, lengths)
    counts = eligible.sum(1)
    n = min(num_anchors, int(counts.max()))
    # A uniform random permutation of the eligible positions: iid scores, eligible ones first.
    # Drawn position-major, so padding the sequence (never eligible) leaves every real
    # position's score, and so the anchors, unchanged.
    scores = torch.rand(seq_len, b, generator=generator, device=generator.device).t()
    scores = scores.to(loss_mask.device).masked_fill(~eligible, 2.0)
    picked = scores.topk(n, dim=1, largest=False).indices
    keep = torch.arange(n, device=loss_mask.device) < counts[:, None]
    # Sentinel S sorts the unused slots last, so `keep` stays a prefix of each row.
    anchors = picked.masked_fill(~keep, seq_len).sort(dim=1).values.masked_fill(~keep, 0)
    return anchors, keep


def eligible_anchors(loss_mask: torch.Tensor, block_size: int,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[b, S] bool: response positions a whose whole block fits in the sample, a + B <= S
    (S: `lengths` [b], or the padded width), or in a's document (`lengths` [b, S]: each
    position's document end)."""
    b, seq_len = loss_mask.shape
    positions = torch.arange(seq_len, device=loss_mask.device)
    ends = torch.full((b,), seq_len) if lengths is None else lengths.to(positions.device)
    return loss_mask.bool() & (positions + block_size <= (ends if ends.dim() == 2
                                                          else ends[:, None]))


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, N*B] sequence position of every block slot: a_j + k. Slot k predicts the token here."""
    k = torch.arange(block_size, device=anchors.device)
    return (anchors[:, :, None] + k).flatten(1)


def block_position_ids(seq_len: int, anchors: torch.Tensor, block_size: int,
                       document_starts: torch.Tensor | None = None) -> torch.Tensor:
    """[b, S + N*B] RoPE positions of the draft's keys: context 0..S-1, then each block's slots.
    In packed rows (`document_starts` [b, S], each position's document start) both count from
    their document's start, as they would in the conversation alone."""
    context = torch.arange(seq_len, device=anchors.device).expand(anchors.shape[0], seq_len)
    blocks = block_positions(anchors, block_size)
    if document_starts is not None:
        context = context - document_starts
        blocks = blocks - document_starts.gather(1, anchors).repeat_interleave(block_size, 1)
    return torch.cat([context, blocks], dim=1)


def block_input_ids(tokens: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor,
                    block_size: int, mask_token_id: int) -> torch.Tensor:
    """[b, N*B] draft input: slot 0 = the token at the anchor, other slots MASK; an unkept block
    is all MASK."""
    b, n = anchors.shape
    ids = torch.full((b, n, block_size), mask_token_id, dtype=tokens.dtype, device=tokens.device)
    ids[:, :, 0] = torch.where(keep, tokens.gather(1, anchors), mask_token_id)
    return ids.flatten(1)


def block_labels(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, N*B] label of slot k of block j: the token at a_j + k (past the end: the last token,
    which `block_loss_mask` excludes)."""
    positions = block_positions(anchors, block_size).clamp(max=tokens.shape[1] - 1)
    return tokens.gather(1, positions)


def block_loss_mask(loss_mask: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """[b, N*B] bool, the supervised slots: keep · (a_j+k < S) · (k > 0) · loss_mask[a_j+k].

    This undecayed mask also counts the accuracy metrics.
    """
    seq_len = loss_mask.shape[1]
    positions = block_positions(anchors, block_size)
    k = torch.arange(block_size, device=anchors.device)
    slot = (keep[:, :, None] & (k > 0)).flatten(1)
    response = loss_mask.bool().gather(1, positions.clamp(max=seq_len - 1))
    return slot & (positions < seq_len) & response


def block_loss_weights(mask: torch.Tensor, block_size: int, gamma: float) -> torch.Tensor:
    """[b, N*B] float32 loss weights: `block_loss_mask` · exp(-(k-1)/gamma); slot 1 weighs 1."""
    k = torch.arange(block_size, device=mask.device)
    decay = torch.exp(-(k - 1).clamp(min=0) / gamma).float()
    return mask.float() * decay.repeat(mask.shape[1] // block_size)


def pad_blocks(anchors: torch.Tensor, keep: torch.Tensor, block_size: int,
               multiple: int, min_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Append unkept blocks (anchor 0, keep False) until there are at least `min_blocks` and
    N * block_size is a multiple of `multiple` (e.g. the FP8 GEMM alignment, fp8.py); they carry
    no loss weight and see no context."""
    n = max(anchors.shape[1], min_blocks)
    step = multiple // math.gcd(multiple, block_size)  # blocks per aligned group
    extra = n - anchors.shape[1] + (-n % step)
    if extra == 0:
        return anchors, keep
    return (torch.cat([anchors, anchors.new_zeros(anchors.shape[0], extra)], dim=1),
            torch.cat([keep, keep.new_zeros(keep.shape[0], extra)], dim=1))
