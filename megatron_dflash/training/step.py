"""One DFlash training step as megatron pipeline-schedule micro-batches.

`prepare_microbatch` turns (tokens, loss_mask) into everything a micro-batch needs — anchors,
block inputs, labels, decayed weights, the packed attention mask — from an explicit generator, so
every TP rank draws the same anchors and a resumed run redraws exactly what it drew before.

Normalisation. The objective is the weighted mean Σ w·ℓ / Σ w over the whole global batch (all
micro-batches and data-parallel ranks). The weights are fractional, which megatron's integer
per-token count cannot carry, so the step computes the global Σ w before the schedule runs
(`global_weight_sum`, one all-reduce) and each micro-batch returns Σ_mb w·ℓ · M·DP / Σ w: megatron
divides that by the M micro-batches and DDP averages over the DP ranks, leaving exactly the
global weighted mean's gradient whatever the TP/DP/micro-batch layout.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_dflash.anchors import (block_input_ids, block_labels, block_loss_mask,
                                     block_loss_weights, block_position_ids, block_positions,
                                     sample_anchors)
from megatron_dflash.config import DFlashConfig
from megatron_dflash.fp8 import pad_blocks
from megatron_dflash.loss import accuracy_counts, dflash_loss, target_greedy_labels
from megatron_dflash.masks import dflash_attention_mask
from megatron_dflash.sparse_attention import dflash_block_mask


# The mask each draft attention (`get_dflash_layer_spec(attention=...)`) takes.
MASKS = {"dense": dflash_attention_mask, "sparse": dflash_block_mask}


def anchor_generator(seed: int, sample_position: int) -> torch.Generator:
    """The anchors of a micro-batch depend only on the seed and the global position (in consumed
    samples) of its first sample: re-drawn every step, reproducible on resume and across layouts."""
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_position)


def prepare_microbatch(tokens: torch.Tensor, loss_mask: torch.Tensor, cfg: DFlashConfig,
                       generator: torch.Generator, attention: str = "dense",
                       block_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Anchors, block inputs/labels/weights, positions and the mask for [b, S] tokens.

    `attention` picks the mask the draft's spec takes: the dense tensor, or the per-block
    `DFlashBlockMask` of the sparse attention. `block_multiple`: the number of block tokens
    (N * block_size) is padded with unkept blocks to a multiple of it (FP8 GEMM alignment).
    """
    if attention not in MASKS:
        raise ValueError(f"attention={attention!r} must be one of {tuple(MASKS)}")
    B, seq_len = cfg.block_size, tokens.shape[1]
    anchors, keep = sample_anchors(loss_mask, B, cfg.num_anchors, generator)
    if anchors.shape[1] == 0:  # nothing eligible: one unkept block (weight 0) keeps shapes valid
        anchors = torch.zeros(tokens.shape[0], 1, dtype=torch.long)
        keep = torch.zeros_like(anchors, dtype=torch.bool)
    anchors, keep = pad_blocks(anchors, keep, B, block_multiple)
    supervised = block_loss_mask(loss_mask, anchors, keep, B)
    return dict(
        tokens=tokens,
        position_ids=torch.arange(seq_len).expand_as(tokens),
        block_input_ids=block_input_ids(tokens, anchors, keep, B, cfg.mask_token_id),
        attention_mask=MASKS[attention](anchors, keep, seq_len, B),
        block_position_ids=block_position_ids(seq_len, anchors, B),
        labels=block_labels(tokens, anchors, B),
        label_positions=block_positions(anchors, B),
        weights=block_loss_weights(supervised, B, cfg.loss_gamma),
        supervised=supervised,
    )


def global_weight_sum(microbatches: list[dict], dp_group) -> float:
    """Σ w over the micro-batches of every data-parallel rank (the loss normaliser)."""
    total = torch.stack([mb["weights"].sum() for mb in microbatches]).sum().double()
    dist.all_reduce(total, group=dp_group)
    return float(total)


def _to(mb: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in mb.items()}


def loss_func(mb: dict, target_logits, block_size: int, distill_weight: float, scale: float,
              output: torch.Tensor):
    """megatron loss_func: (scaled Σ w·ℓ, report of summable [numerator, denominator] counts).

    When distilling, accuracy (and so τ̂) is measured against the target's greedy tokens — what
    speculative decoding accepts — since the data were not written by the target.
    """
    target_logits = None if target_logits is None else target_logits.transpose(0, 1)
    loss_sum, weight_sum = dflash_loss(
        output, mb["labels"], mb["weights"], distill_weight=distill_weight,
        target_logits=target_logits, label_positions=mb["label_positions"])
    labels = mb["labels"] if target_logits is None else \
        target_greedy_labels(target_logits, mb["label_positions"])
    correct, total = accuracy_counts(output, labels, mb["supervised"], block_size)
    report = {"loss": torch.stack([loss_sum.detach(), weight_sum]).double(),
              "correct": correct, "total": total}
    return loss_sum * scale, report


def make_forward_step(cfg: DFlashConfig, distill_weight: float, scale: float = 1.0):
    """forward_step_func(data_iterator, model) for megatron's `get_forward_backward_func()`.

    `scale` = M·DP / global Σ w for training; 1 for evaluation (forward only).
    """
    def forward_step(data_iterator, model):
        device = next(model.parameters()).device
        mb = _to(next(data_iterator), device)
        logits, target_logits = model(mb["tokens"], mb["position_ids"], mb["block_input_ids"],
                                      mb["attention_mask"], mb["block_position_ids"])
        return logits, partial(loss_func, mb, target_logits if distill_weight > 0 else None,
                               cfg.block_size, distill_weight, scale)

    return forward_step
