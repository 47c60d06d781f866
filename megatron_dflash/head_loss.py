"""The draft's LM head and the DFlash loss in chunks of rows, never materialising [N·B, V].

At N·B = 8192 block slots and V ≈ 152k the draft's logits alone are 2.5 GB in bf16, and the fp32
softmax, its gradient and a teacher distribution as many again. `vocab_head_loss` instead takes
only the rows the loss reads (supervised slots: never slot 0, unkept blocks or prompt positions)
and, `chunk_rows` rows at a time, projects them through the target's frozen vocab-parallel output
weight, computes the loss (`loss.per_token_loss`: megatron's vocab-parallel CE and/or the
distillation soft CE), the argmax metrics and at once the gradient w.r.t. those rows (autograd on
the chunk's logits), then drops the chunk. Backward only scales the stored [M, H] row gradient:
logits are neither kept nor recomputed, so the FLOPs are exactly those of an unchunked forward and
input gradient (the output weight is frozen: it has no gradient).

The rows must be replicated over the tensor-parallel group (each rank holds a vocabulary slice of
the weight); the row gradient it returns is this rank's partial sum, which the caller's
`copy_to`/`gather_from_sequence_parallel_region` reduces over TP in backward, as a
ColumnParallelLinear's input gradient would be.

DFlash2 (`HeadLossSettings.selector`): each chunk also adds α × the candidate selector's K-way
cross-entropy (`selector.selector_cross_entropy`, the same weights w), and the metrics' token is
the selector's choice (what decoding proposes). The selector's gradients (its weights', and the
rows' through its hidden projection) come out of the same chunk autograd; the rows' part is the
same on every rank (the selector's computation is replicated), so TP rank 0 alone adds it to its
partial sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.utils import get_pg_rank

from megatron_dflash.loss import (per_token_loss, tp_group_or_default, unary_logits,
                                  vocab_parallel_argmax)
from megatron_dflash.selector import CandidateSelector, selector_cross_entropy

# Rows per chunk: its transient memory is about 20 bytes x rows x V/tp (logits, their fp32 working
# copy and gradient, teacher distribution), ~1.5 GB at 512 rows and V = 152k on one rank.
DEFAULT_CHUNK_ROWS = 512


@dataclass(frozen=True)
class HeadLossSettings:
    """The non-tensor inputs of `vocab_head_loss` (see there)."""

    distill_weight: float
    chunk_rows: int
    tp_group: dist.ProcessGroup
    output_multiplier: float = 1.0
    softcap: float | None = None
    selector: CandidateSelector | None = None
    selector_weight: float = 1.0


class _ChunkedHeadLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows, weight, labels, weights, teacher_rows, predecessors,
                s: HeadLossSettings, *selector_params):
        needs = ctx.needs_input_grad
        needs_grad = needs[0]
        selector_grads = [torch.zeros_like(p, dtype=torch.float32) if need else None
                          for p, need in zip(selector_params, needs[7:])]  # summed in fp32
        row_grad = torch.empty_like(rows) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=rows.device)
        predicted = torch.empty_like(labels)
        teacher_predicted = None if teacher_rows is None else torch.empty_like(labels)
        selector_rows_grad = s.selector is not None and get_pg_rank(s.tp_group) == 0
        for start in range(0, rows.shape[0], s.chunk_rows):
            chunk = slice(start, start + s.chunk_rows)
            logits = F.linear(rows[chunk], weight)
            predicted[chunk] = vocab_parallel_argmax(logits, s.tp_group)
            teacher_logits = None
            if teacher_rows is not None:
                teacher_logits = F.linear(teacher_rows[chunk], weight)
                teacher_predicted[chunk] = vocab_parallel_argmax(teacher_logits, s.tp_group)
            with torch.enable_grad():
                logits.requires_grad_(needs_grad)
                unary = unary_logits(logits, s.output_multiplier, s.softcap)
                per_token = per_token_loss(unary, labels[chunk], teacher_logits, s.distill_weight,
                                           s.tp_group)
                chunk_loss = (weights[chunk] * per_token).sum()
                inputs = [logits]
                if s.selector is not None:
                    hidden = rows[chunk].detach().requires_grad_(needs_grad)
                    gold = labels[chunk] if teacher_predicted is None else teacher_predicted[chunk]
                    cross_entropy, predicted[chunk] = selector_cross_entropy(
                        s.selector, unary, hidden, predecessors[chunk], gold)
                    chunk_loss = chunk_loss + s.selector_weight * (weights[chunk]
                                                                   * cross_entropy).sum()
                    inputs += [hidden] + [p for p, g in zip(selector_params, selector_grads)
                                          if g is not None]
                if needs_grad:
                    grads = list(torch.autograd.grad(chunk_loss, inputs))
                    row_grad[chunk] = grads.pop(0).to(weight.dtype) @ weight
                    if s.selector is not None:
                        hidden_grad = grads.pop(0)
                        if selector_rows_grad:
                            row_grad[chunk] += hidden_grad.to(row_grad.dtype)
                        for g, new in zip((g for g in selector_grads if g is not None), grads):
                            g += new.float()
            loss += chunk_loss.detach()
        ctx.save_for_backward(row_grad, *(g for g in selector_grads if g is not None))
        ctx.selector_dtypes = [None if g is None else p.dtype
                               for p, g in zip(selector_params, selector_grads)]
        ctx.mark_non_differentiable(*(t for t in (predicted, teacher_predicted) if t is not None))
        return loss, predicted, teacher_predicted

    @staticmethod
    def backward(ctx, loss_grad, *_):
        row_grad, *selector_grads = ctx.saved_tensors
        selector_grads = iter(selector_grads)
        params = tuple(None if dtype is None else (next(selector_grads) * loss_grad).to(dtype)
                       for dtype in ctx.selector_dtypes)
        return (row_grad * loss_grad.to(row_grad.dtype),) + (None,) * 6 + params


def vocab_head_loss(rows: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor, *, teacher_rows: torch.Tensor | None = None,
                    distill_weight: float = 0.0, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    tp_group: dist.ProcessGroup | None = None, output_multiplier: float = 1.0,
                    softcap: float | None = None, selector: CandidateSelector | None = None,
                    predecessors: torch.Tensor | None = None, selector_weight: float = 1.0):
    """(Σ w·loss, draft token [M], teacher argmax [M] or None) for M rows.

    Args:
        rows: [M, H] final-norm draft hidden states of the supervised slots (TP-replicated).
        weight: [V/tp, H] the frozen vocab-parallel output weight.
        labels, weights: [M] the slots' labels and loss weights.
        teacher_rows: [M, H] the target's final-norm hidden states at the positions whose next
            token each slot predicts (distillation); None without distillation.
        distill_weight: α as in `loss.dflash_loss`.
        output_multiplier, softcap: the draft's logit transform (`loss.unary_logits`); the
            teacher's logits are the target's own, untransformed.
        selector: DFlash2's candidate selector: adds `selector_weight` × its cross-entropy to
            the gold token (the label, or the target's greedy token when distilling), and the
            draft token is its choice instead of the argmax.
        predecessors: [M] the token before each slot (teacher forcing), with `selector`.
    """
    if distill_weight > 0 and teacher_rows is None:
        raise ValueError("distill_weight > 0 needs teacher_rows")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    if selector is not None and predecessors is None:
        raise ValueError("a selector needs the rows' predecessors")
    settings = HeadLossSettings(distill_weight, chunk_rows, tp_group_or_default(tp_group),
                                output_multiplier, softcap, selector, selector_weight)
    params = () if selector is None else tuple(selector.parameters())
    return _ChunkedHeadLoss.apply(rows, weight, labels, weights.float(), teacher_rows,
                                  predecessors, settings, *params)
