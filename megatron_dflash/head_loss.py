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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.multi_token_prediction import _vocab_parallel_argmax
from megatron.core.utils import get_pg_size

from megatron_dflash.loss import per_token_loss, tp_group_or_default

# Rows per chunk: its transient memory is about 20 bytes x rows x V/tp (logits, their fp32 working
# copy and gradient, teacher distribution), ~1.5 GB at 512 rows and V = 152k on one rank.
DEFAULT_CHUNK_ROWS = 512


class _ChunkedHeadLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows, weight, labels, weights, teacher_rows, distill_weight, chunk_rows,
                tp_group):
        needs_grad = ctx.needs_input_grad[0]
        tp_size = get_pg_size(tp_group)
        row_grad = torch.empty_like(rows) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=rows.device)
        predicted = torch.empty_like(labels)
        teacher_predicted = None if teacher_rows is None else torch.empty_like(labels)
        for start in range(0, rows.shape[0], chunk_rows):
            chunk = slice(start, start + chunk_rows)
            logits = F.linear(rows[chunk], weight)
            predicted[chunk] = _vocab_parallel_argmax(logits, tp_group, tp_size)
            teacher_logits = None
            if teacher_rows is not None:
                teacher_logits = F.linear(teacher_rows[chunk], weight)
                teacher_predicted[chunk] = _vocab_parallel_argmax(teacher_logits, tp_group, tp_size)
            with torch.enable_grad():
                logits.requires_grad_(needs_grad)
                per_token = per_token_loss(logits, labels[chunk], teacher_logits, distill_weight,
                                           tp_group)
                chunk_loss = (weights[chunk] * per_token).sum()
                if needs_grad:
                    (logits_grad,) = torch.autograd.grad(chunk_loss, logits)
                    row_grad[chunk] = logits_grad.to(weight.dtype) @ weight
            loss += chunk_loss.detach()
        ctx.save_for_backward(row_grad)
        ctx.mark_non_differentiable(*(t for t in (predicted, teacher_predicted) if t is not None))
        return loss, predicted, teacher_predicted

    @staticmethod
    def backward(ctx, loss_grad, *_):
        (row_grad,) = ctx.saved_tensors
        return (row_grad * loss_grad.to(row_grad.dtype),) + (None,) * 7


def vocab_head_loss(rows: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor, *, teacher_rows: torch.Tensor | None = None,
                    distill_weight: float = 0.0, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    tp_group: dist.ProcessGroup | None = None):
    """(Σ w·loss, draft argmax [M], teacher argmax [M] or None) for M rows.

    Args:
        rows: [M, H] final-norm draft hidden states of the supervised slots (TP-replicated).
        weight: [V/tp, H] the frozen vocab-parallel output weight.
        labels, weights: [M] the slots' labels and loss weights.
        teacher_rows: [M, H] the target's final-norm hidden states at the positions whose next
            token each slot predicts (distillation); None without distillation.
        distill_weight: α as in `loss.dflash_loss`.
    """
    if distill_weight > 0 and teacher_rows is None:
        raise ValueError("distill_weight > 0 needs teacher_rows")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    return _ChunkedHeadLoss.apply(rows, weight, labels, weights.float(), teacher_rows,
                                  distill_weight, chunk_rows, tp_group_or_default(tp_group))
