"""The DFlash objective on whole vocab-parallel logits [Q, b, V/tp]: the reference the training
step's chunked head loss (`head_loss.vocab_head_loss`) is tested against."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.multi_token_prediction import _vocab_parallel_argmax
from megatron.core.utils import get_pg_size

from megatron_dflash.loss import per_token_loss, tp_group_or_default


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor,
                            tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, Q] hard CE of vocab-parallel logits [Q, b, V/tp] against labels [b, Q]."""
    return per_token_loss(logits, labels.t(), tp_group=tp_group).t()


def distillation_per_token(logits: torch.Tensor, target_logits: torch.Tensor,
                           label_positions: torch.Tensor,
                           tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, Q] soft CE of the draft logits [Q, b, V/tp] against the target's logits [S, b, V/tp] at
    `label_positions - 1`, where label_positions [b, Q] = a_j + k (`anchors.block_positions`).
    Slot 0 of a block at position 0 has no teacher row; row 0 stands in (its weight is 0)."""
    return per_token_loss(logits, None, _teacher_logits(target_logits, label_positions),
                          1.0, tp_group).t()


def _teacher_logits(target_logits: torch.Tensor, label_positions: torch.Tensor) -> torch.Tensor:
    """[Q, b, V/tp] the target's logits at a_j+k-1, the position that teaches slot k (slot 0 of a
    block at position 0 has none: row 0 stands in, its weight is 0)."""
    rows = (label_positions - 1).clamp(0, target_logits.shape[0] - 1).t()
    return target_logits[rows, torch.arange(rows.shape[1], device=rows.device)]


def dflash_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
                distill_weight: float = 0.0, target_logits: torch.Tensor | None = None,
                label_positions: torch.Tensor | None = None,
                tp_group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·((1-α)·CE + α·KD), Σ w) with α = `distill_weight`: 0 is the paper's hard CE (the
    default), 1 pure distillation; a term that α zeroes is not computed. Distillation needs
    `target_logits` [S, b, V/tp] and `label_positions` [b, Q]."""
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight={distill_weight!r} must be in [0, 1]")
    if distill_weight > 0 and (target_logits is None or label_positions is None):
        raise ValueError("distill_weight > 0 needs target_logits and label_positions")
    teacher = _teacher_logits(target_logits, label_positions) if distill_weight > 0 else None
    per_token = per_token_loss(logits, labels.t(), teacher, distill_weight, tp_group).t()
    weights = weights.float()
    return (weights * per_token).sum(), weights.sum()


@torch.no_grad()
def target_greedy_labels(target_logits: torch.Tensor, label_positions: torch.Tensor,
                         tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, Q] the target's own greedy token for every block slot: the argmax of its logits
    [S, b, V/tp] at a_j+k-1. Speculative decoding accepts a drafted token when it equals this,
    so accuracy against it estimates acceptance whatever wrote the data."""
    tp_group = tp_group_or_default(tp_group)
    return _vocab_parallel_argmax(_teacher_logits(target_logits, label_positions), tp_group,
                                  get_pg_size(tp_group)).t()


@torch.no_grad()
def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    block_size: int, tp_group: dist.ProcessGroup | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total), each [B-1] int64: for slots k = 1..B-1, the supervised slots (`mask`
    [b, Q], the undecayed `block_loss_mask`) whose vocab-parallel argmax equals the label, and
    all supervised slots."""
    tp_group = tp_group_or_default(tp_group)
    predicted = _vocab_parallel_argmax(logits, tp_group, get_pg_size(tp_group)).t()
    b = labels.shape[0]
    mask = mask.bool().reshape(b, -1, block_size)[..., 1:]
    correct = (predicted == labels).reshape(b, -1, block_size)[..., 1:] & mask
    return correct.sum((0, 1)), mask.sum((0, 1))
