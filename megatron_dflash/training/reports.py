"""The step's reports (summed [numerator, denominator] counts from `step.loss_func`) reduced
over micro-batches, data-parallel ranks and pipeline stages, and what they measure."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def reduce_reports(reports: list[dict]) -> dict[str, torch.Tensor]:
    """Sum the micro-batch reports, then over data- and context-parallel ranks (each holds its
    own blocks). Only the last pipeline stage has reports (the loss lives there); the other
    stages receive its sums."""
    out = None
    if parallel_state.is_pipeline_last_stage():
        out = {k: sum(r[k].double() for r in reports) for k in ("loss", "correct", "total", "tau")}
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for v in out.values():
            dist.all_reduce(v, group=group)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [None if out is None else {k: v.cpu() for k, v in out.items()}]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        out = box[0]
    return out


def tau_and_accuracy(r: dict) -> tuple[float, list[float]]:
    """τ̂ (mean acceptance length over the blocks with a supervised slot; 1.0 when there are
    none) and per-position accuracy from summed reports."""
    tau = float(r["tau"][0] / r["tau"][1]) if r["tau"][1] > 0 else 1.0
    return tau, (r["correct"] / r["total"].clamp(min=1)).tolist()
