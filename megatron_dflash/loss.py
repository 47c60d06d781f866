"""The DFlash objective on vocab-parallel logits, never gathering the vocabulary (spec §6.4).

Logits are megatron's [Q, b, V/tp] (Q = N*B block slots, this rank's vocabulary slice); labels,
weights and masks are [b, Q] from `megatron_dflash.anchors`.

Loss contract. The step sums Σ w·loss and Σ w rather than taking a mean, so that the reference's
weighted mean Σ w·ℓ / Σ w can be taken over a whole optimizer step (all micro-batches and
data-parallel ranks) rather than as a mean of per-micro-batch means. The weights are fractional,
which megatron's integer per-token count cannot carry; `training.step` therefore normalises by the
global Σ w itself.

Distillation (optional, ModelOpt's `dflash_self_logit_distillation`) replaces the hard label of
slot k by the target's own next-token distribution for that token: the target's logits at
position a_j+k-1, the position whose next token is a_j+k.

Metrics count, per slot k = 1..B-1, how often the draft's argmax equals the label, under the
undecayed `block_loss_mask`, and each block's acceptance length (`block_acceptance_lengths`);
counts and sums add across micro-batches and ranks, and only then become per-position accuracies
and τ̂. Training computes all of this through `head_loss.vocab_head_loss` in chunks of rows (the
whole-logits reference it is tested against lives in the tests).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.multi_token_prediction import _vocab_parallel_argmax
from megatron.core.utils import get_pg_size


def tp_group_or_default(tp_group):
    """`tp_group`, or megatron's tensor-parallel group."""
    return parallel_state.get_tensor_model_parallel_group() if tp_group is None else tp_group


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
                                                tp_group_or_default(tp_group))


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                   teacher_logits: torch.Tensor | None = None, distill_weight: float = 0.0,
                   tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(1-α)·CE + α·KD per row of vocab-parallel logits [..., V/tp], with labels [...] and the
    teacher's logits for the same rows [..., V/tp]; a term that α zeroes is not computed."""
    per_token = 0.0
    if distill_weight < 1:
        # megatron's CE subtracts and exponentiates fp32 logits in place: work on a copy.
        per_token = (1 - distill_weight) * tensor_parallel.vocab_parallel_cross_entropy(
            logits.to(torch.float32, copy=True), labels.contiguous(), tp_group=tp_group_or_default(tp_group))
    if distill_weight > 0:
        per_token = per_token + distill_weight * vocab_parallel_soft_cross_entropy(
            logits, teacher_logits, tp_group)
    return per_token


def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Global argmax ids of vocab-parallel logits [..., V/tp] (megatron's, which gathers one
    value and id per row and rank, never the vocabulary)."""
    tp_group = tp_group_or_default(tp_group)
    return _vocab_parallel_argmax(logits, tp_group, get_pg_size(tp_group))


def unary_logits(logits: torch.Tensor, multiplier: float = 1.0,
                 softcap: float | None = None) -> torch.Tensor:
    """The draft's logits as the reference proposes from them (`compute_logits`): scaled by
    `output_multiplier`, then softcapped c·tanh(x / c); elementwise, so vocab-parallel slices
    transform alone. Identity (the tensor itself) at the defaults."""
    if multiplier == 1.0 and softcap is None:
        return logits
    logits = logits.float() * multiplier
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def block_acceptance_lengths(correct: torch.Tensor) -> torch.Tensor:
    """[...] the acceptance length of each block from `correct` [..., B-1] (slot k's draft token
    equals what decoding accepts; an unsupervised slot counts as wrong): 1 (the bonus token) +
    the length of the leading run of correct slots, 1 + Σ_k Π_{j<=k} correct_j. Averaged over
    kept blocks this is the expected acceptance length τ̂ exactly — slots of one block are
    correlated, so the product of per-slot marginal accuracies is not."""
    return 1 + correct.long().cumprod(-1).sum(-1)
