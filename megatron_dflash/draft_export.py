"""Export a training checkpoint's draft (any TP, either backend) as a reference-format directory.

    export_checkpoint(ckpt_root, out_dir, dtype="bf16")     training checkpoint -> HF dir

The directory (`reference_format`: config.json + model.safetensors, and the target's tokenizer
as `save_pretrained` writes it, when asked) loads in the z-lab reference, vLLM and SGLang. Every failure is one
`ValueError` or `FileNotFoundError`, raised before anything is written; the directory is written
under a temporary name and renamed when complete, 0755 with 0644 files (readable by others).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_dflash import atomic, state_dict_adapter
from megatron_dflash.draft_reader import read_checkpoint, target_description
from megatron_dflash.reference_format import (ARCHITECTURES, CONFIG_FILE, DTYPES, WEIGHTS_FILE,
                                              reference_config, target_fields)


def export_checkpoint(root: str, out_dir: str, *, iteration: int | None = None,
                      dtype: str | None = None, tokenizer_dir: str | None = None) -> str:
    """Write a training checkpoint's draft as a reference-format directory `out_dir`.

    Collective where a process group exists (inside a training job): every rank reads the
    checkpoint, rank 0 writes; otherwise a world of one process is made for the read.

    Args:
        dtype: "fp32", "bf16" or "fp16"; default: the stored dtype (fp32 if mixed).
        tokenizer_dir: also save the tokenizer found there (the target's) into `out_dir`.
    """
    writes = not dist.is_initialized() or dist.get_rank() == 0
    if writes:
        _check_new_output(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    tokenizer = _tokenizer(tokenizer_dir) if tokenizer_dir else None
    extra, cfg, full = read_checkpoint(root, iteration)
    if not writes:
        return out_dir
    tensors = state_dict_adapter.megatron_to_hf(full, cfg)
    stored = {t.dtype for t in tensors.values()}
    out_dtype = DTYPES[dtype] if dtype else (stored.pop() if len(stored) == 1 else torch.float32)
    base = extra.get("reference_config")
    target = target_fields(target_description(extra, root), root)
    config = reference_config(cfg, target, out_dtype, base)
    # readable by others (0644/0755): safetensors writes through a 0600 temporary file
    with atomic.atomic_dir(out_dir, file_mode=0o644, dir_mode=0o755) as tmp:
        save_file({k: v.to(out_dtype).contiguous() for k, v in sorted(tensors.items())},
                  os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def is_export(path: str) -> bool:
    """Whether `path` holds an earlier export (a reference draft config and its weights)."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict)
            and config.get("architectures") in [[a] for a in ARCHITECTURES.values()]
            and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def _tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # transformers raises many types for files it cannot read
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files (transformers cannot load "
                                f"a tokenizer there: {' '.join(str(e).split())[:200]})") from None


def _check_new_output(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: exists and is not an empty directory; choose a new output")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: no such directory for the output")
