"""Import a reference-format draft as a megatron draft checkpoint (to fine-tune or continue).

    import_reference(ref_dir, ckpt_root, target_dir=...)    HF dir -> megatron checkpoint (this TP)
    load_draft_weights(draft, full)                         full (TP=1) state dict -> a built draft

Every failure is one `ValueError` or `FileNotFoundError` naming the file or field, raised before
anything is written; the checkpoint is written atomically (`checkpoint.save_model_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dflash import state_dict_adapter
from megatron_dflash.checkpoint import save_model_checkpoint
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.draft_reader import read_reference
from megatron_dflash.reference_format import resolve_for_target, target_fields
from megatron_dflash.specs import build_draft


def import_reference(ref_dir: str, root: str, *, target_dir: str | None = None) -> str:
    """Write a reference-format draft as a megatron draft checkpoint (model + extra, iteration 0)
    at this process group's tensor-parallel size, to fine-tune or continue training.

    Collective over the (initialised) megatron model-parallel world. The weights are stored in
    fp32, which holds fp32/bf16/fp16 inputs exactly. With `target_dir`, the draft is checked
    against that target and the target is recorded in `extra` as training records it.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    hf, cfg, tensors = read_reference(ref_dir)
    num_target_layers = target_fields(hf, ref_dir)["num_target_layers"]
    cfg, tcfg, target_json = resolve_for_target(cfg, num_target_layers, hf["vocab_size"],
                                                target_dir, tp, where=ref_dir)
    if os.path.exists(root) and os.listdir(root):
        raise ValueError(f"{root}: exists and is not empty; import writes a new checkpoint")
    draft = build_draft(cfg, draft_transformer_config(cfg, tcfg))
    load_draft_weights(draft, state_dict_adapter.hf_to_megatron(tensors, cfg))
    extra = {"dflash_config": dataclasses.asdict(cfg),
             "target": {"hf_config": target_json,
                        "path": os.path.abspath(target_dir) if target_dir else None},
             "reference_config": hf, "iteration": 0, "consumed_samples": 0,
             "world_size": dist.get_world_size()}
    return save_model_checkpoint(root, draft, extra, iteration=0)


def load_draft_weights(draft, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (TP=1) megatron draft state dict into `draft`, sliced for this TP rank."""
    shard = state_dict_adapter.shard(full, draft.dflash_config,
                                     parallel_state.get_tensor_model_parallel_rank(),
                                     parallel_state.get_tensor_model_parallel_world_size())
    with torch.no_grad():
        for name, param in draft.named_parameters():
            param.copy_(shard[name])
