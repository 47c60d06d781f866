"""--export at the end of training: the draft in the reference HF format, from the run's own
checkpoint, read with its TP/PP shards gathered by every rank and written by rank 0."""
from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megatron_dflash import atomic, checkpoint
from megatron_dflash.draft_export import export_checkpoint

# A target directory holding one of these has a tokenizer to ship with the export.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def export_draft(trainer, directory: str) -> str:
    """Write `trainer`'s draft to `directory` from this iteration's checkpoint in --save (or,
    without one, a temporary checkpoint beside it). Collective. An earlier export in
    `directory` is replaced once the new one is complete."""
    out = os.path.abspath(directory)
    root = trainer.plan.run.checkpoint.save
    if root is None or not os.path.isdir(checkpoint.iteration_dir(root, trainer.iteration)):
        root = out + ".checkpoint-partial"
        trainer.save(root)
    rank0 = dist.get_rank() == 0
    fresh = rank0 and (not os.path.exists(out) or not os.listdir(out))  # rank 0 alone writes
    written = out if fresh else out + ".export-partial"
    if rank0:
        shutil.rmtree(out + ".export-partial", ignore_errors=True)
    target = trainer.plan.target.path
    tokenizer = target if any(os.path.isfile(os.path.join(target, f))
                              for f in _TOKENIZER_MARKERS) else None
    try:
        export_checkpoint(root, written, iteration=trainer.iteration, tokenizer_dir=tokenizer)
        dist.barrier()  # every rank has read the checkpoint
        if rank0 and not fresh:
            atomic.publish(written, out, replace=True)
    finally:
        if rank0 and root != trainer.plan.run.checkpoint.save:
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    return out
