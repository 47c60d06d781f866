"""One DFlash training step as megatron pipeline-schedule micro-batches.

`prepare_microbatch` turns (tokens, loss_mask) into everything a micro-batch needs — anchors,
block inputs, labels, decayed weights, the packed attention mask — from an explicit generator, so
every TP rank draws the same anchors and a resumed run redraws exactly what it drew before.

Normalisation. The objective is the weighted mean Σ w·ℓ / Σ w over the whole global batch (all
micro-batches and data-parallel ranks). The weights are fractional, which megatron's integer
per-token count cannot carry, so the step computes the global Σ w before the schedule runs
(`global_weight_sum`, one all-reduce) and each micro-batch returns Σ_mb w·ℓ · M·DP / Σ w: megatron
divides that by the M micro-batches and DDP averages over the DP ranks, leaving exactly the
global weighted mean's gradient whatever the TP/DP/micro-batch layout. Under context parallelism
each CP rank holds its share of the blocks: Σ w is summed over DP x CP, megatron multiplies the
loss by CP and DDP averages over DP x CP, which leaves the same gradient.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron.core import tensor_parallel
from megatron.core.utils import get_attr_wrapped_model

from megatron_dflash import context_parallel
from megatron_dflash.anchors import (block_input_ids, block_labels, block_loss_mask,
                                     block_loss_weights, block_position_ids, block_positions,
                                     sample_anchors)
from megatron_dflash.config import DFlashConfig
from megatron_dflash.anchors import pad_blocks
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS, vocab_head_loss
from megatron_dflash.loss import block_acceptance_lengths
from megatron_dflash.masks import block_context_starts, dflash_attention_mask
from megatron_dflash.packed_sequences import document_boundaries, document_bounds
from megatron_dflash.sparse_attention import dflash_block_mask


# The mask each draft attention (`get_dflash_layer_spec(attention=...)`) takes.
MASKS = {"dense": dflash_attention_mask, "sparse": dflash_block_mask}


def anchor_generator(seed: int, sample_position: int) -> torch.Generator:
    """The anchors of a micro-batch depend only on the seed and the global position (in consumed
    samples) of its first sample: re-drawn every step, reproducible on resume and across layouts."""
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_position)


def prepare_microbatch(tokens: torch.Tensor, loss_mask: torch.Tensor, cfg: DFlashConfig,
                       generator: torch.Generator, attention: str = "dense",
                       block_multiple: int = 1,
                       lengths: torch.Tensor | None = None,
                       features: torch.Tensor | None = None,
                       cp_share: tuple[int, int] = (0, 1),
                       documents: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Anchors, block inputs/labels/weights, positions, the mask and the loss rows for [b, S]
    tokens.

    Shapes depend only on (b, S) and the config: N is always min(`cfg.num_anchors`, S - B + 1,
    the most blocks S can hold), unkept blocks filling what the data cannot, so compiled
    attention sees one shape per sequence bucket. `lengths`
    [b]: the samples' own lengths when `tokens` is padded past them; with it, padding changes
    neither the anchors nor the loss.
    `attention` picks the mask the draft's spec takes: the dense tensor, or the per-block
    `DFlashBlockMask` of the sparse attention (per kind of layer: causal, sliding window). `block_multiple`: the number of block tokens
    (N * block_size) is padded with unkept blocks to a multiple of it (FP8 GEMM alignment).

    The loss reads only the supervised slots: `loss_index` holds their flat indices into [b, Q]
    and `teacher_index` those of the target positions that teach them (a_j+k-1) into [b, S];
    their lengths depend on the data, so they are found here, on the host, not in the step.
    Every tensor is contiguous: the prefetcher pins them (`prefetch.check_pinnable`).
    `features` [b, S, K*H]: the target's taps from the offline cache (`feature_cache`), carried
    as `features` [S, b, K*H] (megatron's layout) in place of a target forward.
    `cp_share` = (CP rank, CP size): the anchors are drawn for the whole sequence as
    without CP, padded to whole shares and dealt out (`context_parallel.blocks_of_rank`); the
    micro-batch holds this rank's blocks (N/CP), their mask against the whole context and the
    whole `tokens` (the target takes its chunks of them in the forward).
    `documents`: packed rows (`data/packing.py`), each row's documents' lengths. Anchors are
    then eligible only when their block lies in their document, blocks see their document's
    context only, positions (the target's and the draft's) count from each document's start,
    and `documents` carries the rows' boundaries to the target (`packed_sequences`); not with
    context parallelism.
    """
    if attention not in MASKS:
        raise ValueError(f"attention={attention!r} must be one of {tuple(MASKS)}")
    B, (b, seq_len) = cfg.block_size, tokens.shape
    cp_rank, cp = cp_share
    starts = None
    if documents is not None:
        if cp > 1:
            raise ValueError("packed rows (documents) do not combine with context parallelism")
        starts, lengths = document_bounds(documents, seq_len)  # lengths: each document's end
    anchors, keep = sample_anchors(loss_mask, B, cfg.num_anchors, generator, lengths)
    anchors, keep = pad_blocks(anchors, keep, B,
                               context_parallel.block_multiple(block_multiple, B, cp),
                               min_blocks=min(cfg.num_anchors, max(1, seq_len - B + 1)))
    anchors, keep = context_parallel.blocks_of_rank(anchors, keep, cp_rank, cp)
    supervised = block_loss_mask(loss_mask, anchors, keep, B)
    label_positions = block_positions(anchors, B)
    loss_index = supervised.flatten().nonzero().squeeze(1)
    batch = torch.arange(b).repeat_interleave(label_positions.shape[1])
    teacher_index = (batch * seq_len + label_positions.flatten() - 1)[loss_index]
    position_ids = torch.arange(seq_len).repeat(b, 1)
    context_starts = None
    if starts is not None:
        position_ids -= starts
        context_starts = block_context_starts(starts, anchors, keep)
    out = dict(
        tokens=tokens.contiguous(),
        position_ids=position_ids,
        block_input_ids=block_input_ids(tokens, anchors, keep, B, cfg.mask_token_id),
        attention_mask=MASKS[attention](anchors, keep, seq_len, B, cfg.layer_attentions(),
                                        context_starts=context_starts),
        block_position_ids=block_position_ids(seq_len, anchors, B, starts),
        labels=block_labels(tokens, anchors, B),
        label_positions=label_positions,
        weights=block_loss_weights(supervised, B, cfg.loss_gamma),
        supervised=supervised,
        loss_index=loss_index,
        teacher_index=teacher_index,
    )
    if features is not None:
        out["features"] = features.transpose(0, 1).contiguous()
    if documents is not None:
        out["documents"] = document_boundaries(documents, seq_len)
    return out


def global_weight_sum(microbatches: list[dict], dp_group) -> float:
    """Σ w over the micro-batches of every rank of `dp_group` (the loss normaliser: data- and
    context-parallel ranks, which hold different blocks). The micro-batches must be on the
    training device: an NCCL group reduces CUDA tensors only."""
    total = torch.stack([mb["weights"].sum() for mb in microbatches]).sum().double()
    dist.all_reduce(total, group=dp_group)
    return float(total)


def to_device(mb: dict, device) -> dict:
    """A micro-batch on `device` (asynchronous copies from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in mb.items()}


def loss_rows(hidden: torch.Tensor, index: torch.Tensor, sequence_parallel: bool,
              tp_group, cp_group=None) -> torch.Tensor:
    """[M, H] rows `index` (flat into [b, s]) of megatron [s(/tp), b, H] hidden states, replicated
    over TP: gathered under sequence parallelism; otherwise passed through the TP copy, whose
    backward sums the ranks' partial gradients (each projects its own vocabulary slice).
    `cp_group`: the hidden states are this CP rank's chunks (the target's), gathered first."""
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=tp_group)
    elif hidden.requires_grad:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    if cp_group is not None and cp_group.size() > 1:
        hidden = context_parallel.gather_sequence(hidden, cp_group)
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, index)


def loss_func(mb: dict, module, block_size: int, distill_weight: float, chunk_rows: int,
              scale: float, output):
    """megatron loss_func: (scaled Σ w·ℓ, report of summable [numerator, denominator] counts).

    The draft's supervised rows go through the target's output layer in chunks (`head_loss`);
    a DFlash2 draft's selector adds its cross-entropy there, and its choice is the draft token the
    metrics count (teacher-forced: slot k's predecessor is the data's token a_j+k-1, which is what
    decoding has chosen whenever slots 1..k-1 were accepted, so τ̂ is the selector path's).
    When distilling, the teacher is the target at the rows the loss reads, and accuracy (and so
    τ̂) is measured against the target's greedy tokens — what speculative decoding accepts — since
    the data were not written by the target. Nothing here reads device data on the host (no
    boolean indexing, `bincount` or `.item()`): on CUDA each would stall the step's launch queue.
    """
    draft_hidden, target_hidden = output
    config, tp_group = module.draft.config, module.draft.tp_group
    rows = loss_rows(draft_hidden, mb["loss_index"], config.sequence_parallel, tp_group)
    teacher = None
    if distill_weight > 0:
        teacher = loss_rows(target_hidden, mb["teacher_index"], config.sequence_parallel,
                            tp_group, module.cp_group)
    index = mb["loss_index"]
    labels = mb["labels"].flatten().index_select(0, index)
    draft = module.draft
    cfg = draft.dflash_config
    selector = {}
    if draft.candidate_selector is not None:  # slot k's predecessor: the token at a+k-1
        selector = dict(selector=draft.candidate_selector, selector_weight=cfg.selector_loss_weight,
                        predecessors=mb["labels"].flatten().index_select(0, index - 1))
    loss_sum, predicted, teacher_predicted = vocab_head_loss(
        rows, module.output_weight(), labels, mb["weights"].flatten().index_select(0, index),
        teacher_rows=teacher, distill_weight=distill_weight, chunk_rows=chunk_rows,
        tp_group=tp_group, output_multiplier=cfg.output_multiplier,
        softcap=cfg.final_logit_softcapping, **selector)
    reference = labels if teacher_predicted is None else teacher_predicted
    # Per block slot ([b*N, B]): whether the draft got it right (unsupervised slots: no). The
    # metrics then reduce over fixed shapes, never reading device data on the host.
    supervised = mb["supervised"].reshape(-1, block_size)
    hit = supervised.new_zeros(supervised.numel()).scatter_(0, index, predicted == reference)
    hit = hit.view(-1, block_size)
    kept = supervised.any(1)  # the blocks that have a supervised slot
    lengths = block_acceptance_lengths(hit[:, 1:])
    report = {"loss": torch.stack([loss_sum.detach(), mb["weights"].sum()]).double(),
              "correct": hit.sum(0)[1:], "total": supervised.sum(0)[1:],
              "tau": torch.stack([(lengths * kept).sum(), kept.sum()]).double()}
    return loss_sum * scale, report


def make_forward_step(cfg: DFlashConfig, distill_weight: float, scale: float = 1.0,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """forward_step_func(data_iterator, model) for megatron's `get_forward_backward_func()`.

    `scale` = M·DP / global Σ w for training; 1 for evaluation (forward only). Micro-batches
    arrive on the training device. The outputs stay in model precision (no fp32 copy).
    """
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        half = {"fp32_output": False} if model.config.bf16 or model.config.fp16 else {}
        extra = {k: mb[k] for k in ("features", "documents") if k in mb}
        output = model(mb["tokens"], mb["position_ids"], mb["block_input_ids"],
                       mb["attention_mask"], mb["block_position_ids"], **extra, **half)
        module = get_attr_wrapped_model(model, "output_weight", return_model_obj=True)
        return output, partial(loss_func, mb, module, cfg.block_size, distill_weight, chunk_rows,
                               scale)

    return forward_step
