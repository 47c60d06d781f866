"""The DFlash objective on vocab-parallel logits, never gathering the vocabulary (spec §6.4).

Logits are megatron's [Q, b, V/tp] (Q = N*B block slots, this rank's vocabulary slice); labels,
weights and masks are [b, Q] from `megatron_dflash.anchors`.

Loss contract. `dflash_loss` returns `(loss_sum, weight_sum)` = (Σ w·loss, Σ w), not a mean, so
that the reference's weighted mean Σ w·ℓ / Σ w can be taken over a whole optimizer step (all
micro-batches and data-parallel ranks) rather than as a mean of per-micro-batch means. The weights
are fractional, which megatron's integer per-token count cannot carry; `training.step` therefore
normalises by the global Σ w itself.

Distillation (optional, ModelOpt's `dflash_self_logit_distillation`) replaces the hard label of
slot k by the target's own next-token distribution for that token: the target's logits at
position a_j+k-1, the position whose next token is a_j+k.

Metrics count, per slot k = 1..B-1, how often the draft's argmax equals the label, under the
undecayed `block_loss_mask`, and each block's acceptance length (`block_acceptance_lengths`);
counts and sums add across micro-batches and ranks, and only then become per-position accuracies
and τ̂. Training computes all of this through `head_loss.vocab_head_loss` in chunks of rows; the
functions here on whole logits are the reference it is tested against.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.multi_token_prediction import _vocab_parallel_argmax
from megatron.core.utils import get_pg_size


def _tp(tp_group):
    return parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor,
                            tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, Q] hard CE of vocab-parallel logits [Q, b, V/tp] against labels [b, Q]."""
    return per_token_loss(logits, labels.t(), tp_group=tp_group).t()


class _VocabParallelSoftCrossEntropy(torch.autograd.Function):
    """-Σ_v p_teacher(v)·log p_student(v) per row, vocabulary split over `tp_group`.

    Each rank all-reduces the max and the sum of exponentials of both distributions and the sum
    of its shard-local p_teacher·(student - max). The gradient w.r.t. the student shard,
    softmax(student) - p_teacher, is shard-local; the teacher gets none.
    """

    @staticmethod
    def forward(ctx, student, teacher, tp_group):
        def global_max(x):
            m = x.max(dim=-1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            return m[..., None]

        def global_sum(x):
            s = x.sum(dim=-1)
            dist.all_reduce(s, group=tp_group)
            return s

        teacher, student = teacher.float(), student.float()
        p_teacher = (teacher - global_max(teacher)).exp_()
        p_teacher /= global_sum(p_teacher)[..., None]
        shifted = student - global_max(student)
        cross = global_sum(p_teacher * shifted)
        p_student = shifted.exp_()
        sum_exp = global_sum(p_student)
        p_student /= sum_exp[..., None]
        ctx.save_for_backward(p_student.sub_(p_teacher))
        return sum_exp.log() - cross

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output[..., None], None, None


def vocab_parallel_soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                      tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Soft CE per row of two same-shaped vocab-parallel logits [..., V/tp], computed in fp32;
    gradients reach only the student."""
    return _VocabParallelSoftCrossEntropy.apply(student_logits, teacher_logits.detach(),
                                                _tp(tp_group))


def distillation_per_token(logits: torch.Tensor, target_logits: torch.Tensor,
                           label_positions: torch.Tensor,
                           tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[b, Q] soft CE of the draft logits [Q, b, V/tp] against the target's logits [S, b, V/tp] at
    `label_positions - 1`, where label_positions [b, Q] = a_j + k (`anchors.block_positions`).
    Slot 0 of a block at position 0 has no teacher row; row 0 stands in (its weight is 0)."""
    return per_token_loss(logits, None, _teacher_logits(target_logits, label_positions),
                          1.0, tp_group).t()


def _teacher_logits(target_logits: torch.Tensor, label_positions: torch.Tensor) -> torch.Tensor:
    """[Q, b, V/tp] the target's logits aligned with the slots (see `_teacher_rows`)."""
    rows = _teacher_rows(label_positions, target_logits.shape[0])
    return target_logits[rows, torch.arange(rows.shape[1], device=rows.device)]


def _teacher_rows(label_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[Q, b] the target position whose next-token distribution teaches each slot: a_j+k-1."""
    return (label_positions - 1).clamp(0, seq_len - 1).t()


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                   teacher_logits: torch.Tensor | None = None, distill_weight: float = 0.0,
                   tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(1-α)·CE + α·KD per row of vocab-parallel logits [..., V/tp], with labels [...] and the
    teacher's logits for the same rows [..., V/tp]; a term that α zeroes is not computed."""
    per_token = 0.0
    if distill_weight < 1:
        # megatron's CE subtracts and exponentiates fp32 logits in place: work on a copy.
        per_token = (1 - distill_weight) * tensor_parallel.vocab_parallel_cross_entropy(
            logits.to(torch.float32, copy=True), labels.contiguous(), tp_group=_tp(tp_group))
    if distill_weight > 0:
        per_token = per_token + distill_weight * vocab_parallel_soft_cross_entropy(
            logits, teacher_logits, tp_group)
    return per_token


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
    tp_group = _tp(tp_group)
    return _vocab_parallel_argmax(_teacher_logits(target_logits, label_positions), tp_group,
                                  get_pg_size(tp_group)).t()


@torch.no_grad()
def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    block_size: int, tp_group: dist.ProcessGroup | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total), each [B-1] int64: for slots k = 1..B-1, the supervised slots (`mask`
    [b, Q], the undecayed `block_loss_mask`) whose vocab-parallel argmax equals the label, and
    all supervised slots."""
    tp_group = _tp(tp_group)
    predicted = _vocab_parallel_argmax(logits, tp_group, get_pg_size(tp_group)).t()
    b = labels.shape[0]
    mask = mask.bool().reshape(b, -1, block_size)[..., 1:]
    correct = (predicted == labels).reshape(b, -1, block_size)[..., 1:] & mask
    return correct.sum((0, 1)), mask.sum((0, 1))


def block_acceptance_lengths(correct: torch.Tensor) -> torch.Tensor:
    """[...] the acceptance length of each block from `correct` [..., B-1] (slot k's draft token
    equals what decoding accepts; an unsupervised slot counts as wrong): 1 (the bonus token) +
    the length of the leading run of correct slots, 1 + Σ_k Π_{j<=k} correct_j. Averaged over
    kept blocks this is the expected acceptance length τ̂ exactly — slots of one block are
    correlated, so the product of per-slot marginal accuracies is not."""
    return 1 + correct.long().cumprod(-1).sum(-1)
