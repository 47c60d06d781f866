"""Read a draft without building a model: a reference-format directory or a training checkpoint.

    read_reference(ref_dir)              config.json dict, DFlashConfig, reference tensors
    read_checkpoint(root)                extra, resolved DFlashConfig, full (TP=1) state dict
    load_draft_source(source, target)    either of them, resolved against a target

A checkpoint is read with `dist_checkpointing.load_tensors_metadata`, which lists every stored
tensor at its full (TP=1) shape, so one process loads a checkpoint saved at any TP, with either
backend, in its stored dtype (bit-exact). Every failure is one `ValueError` or
`FileNotFoundError` naming the file or field.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_dflash import state_dict_adapter
from megatron_dflash.distributed import distributed
from megatron_dflash.checkpoint import DRAFT_PREFIX, TRACKER, iteration_dir, latest_iteration
from megatron_dflash.config import DFlashConfig
from megatron_dflash.reference_format import (CONFIG_FILE, WEIGHTS_FILE, canonical_name,
                                              check_shapes, config_from_reference,
                                              reference_shapes, resolve_for_target, target_fields)

_TE_FUSED_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")


def read_reference(ref_dir: str) -> tuple[dict, DFlashConfig, dict[str, torch.Tensor]]:
    """(config.json dict, unresolved DFlashConfig, tensors) of a reference-format draft directory,
    after checking that the tensors are exactly those the config implies."""
    path = Path(ref_dir)
    config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; a reference DFlash draft directory holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    cfg = config_from_reference(hf, str(config_file))
    num_target_layers = target_fields(hf, str(config_file))["num_target_layers"]
    resolved = resolve_for_target(cfg, num_target_layers, hf["vocab_size"],
                                  where=str(config_file))[0]
    try:
        with safe_open(weights, framework="pt") as f:
            names = {canonical_name(k): k for k in f.keys()}
            if len(names) < len(f.keys()):
                raise ValueError(f"{weights}: a selector codebook is stored twice (with and "
                                 "without `.weight`)")
            shapes = {k: tuple(f.get_slice(name).get_shape()) for k, name in names.items()}
            check_shapes(shapes, reference_shapes(resolved), str(weights))
            tensors = {k: f.get_tensor(name) for k, name in names.items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return hf, cfg, tensors


def checkpoint_path(root: str, iteration: int | None = None) -> str:
    """The iteration directory of a training checkpoint (default: the latest finished one)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no finished checkpoint ({TRACKER} missing)")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint iteration")
    return path


def read_checkpoint(root: str, iteration: int | None = None
                    ) -> tuple[dict, DFlashConfig, dict[str, torch.Tensor]]:
    """(extra, resolved DFlashConfig, full TP=1 megatron draft state dict) of a checkpoint.

    Reads only the draft ("model") and "extra": optimizer, RNG and scheduler entries may or may
    not be present. Collective when a process group exists (every rank reads the whole draft);
    otherwise a world of one process is made for the read (`distributed`).
    """
    path = checkpoint_path(root, iteration)
    with distributed(backend="gloo"):  # dist_checkpointing reads in a process group
        try:
            common = dist_checkpointing.load_common_state_dict(path)
            extra = common["extra"]
            stored = {k: v for k, v in dist_checkpointing.load_tensors_metadata(path).items()
                      if k.startswith(DRAFT_PREFIX)}
            for tensor in stored.values():  # each rank reads everything: one main replica
                tensor.replica_id = dist.get_rank()
            loaded = dist_checkpointing.load(stored, path) if stored else {}
        except (Exception, CheckpointException) as e:  # many types for a damaged checkpoint
            # torch DCP wraps the cause with its traceback: keep the final line
            cause = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise ValueError(f"{path}: not a readable megatron draft checkpoint ({cause})"
                             ) from None
    if not isinstance(extra, dict) or not isinstance(extra.get("dflash_config"), dict):
        raise ValueError(f"{path}: the checkpoint's 'extra' has no 'dflash_config'")
    try:
        cfg = DFlashConfig(**extra["dflash_config"])
    except TypeError as e:
        raise ValueError(f"{path}: extra['dflash_config'] is not a DFlashConfig ({e})") from None
    target = target_fields(target_description(extra, path), path)
    cfg = resolve_for_target(cfg, target["num_target_layers"], target["vocab_size"],
                             where=path)[0]
    full = _unstack_layers({k[len(DRAFT_PREFIX):]: v for k, v in loaded.items()
                            if k.startswith(DRAFT_PREFIX)})
    try:
        hf = state_dict_adapter.megatron_to_hf(full, cfg)
        check_shapes({k: tuple(v.shape) for k, v in hf.items()}, reference_shapes(cfg), path)
        unexpected = sorted(full.keys() - state_dict_adapter.hf_to_megatron(hf, cfg).keys())
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: the draft tensors do not match extra['dflash_config'] ({e})"
                         ) from None
    if unexpected:
        raise ValueError(f"{path}: tensor {unexpected[0]!r} is not part of a DFlash draft")
    return extra, cfg, full


def load_draft_source(source: str, target_dir: str, tensor_parallel_size: int = 1
                      ) -> tuple[DFlashConfig, TransformerConfig, dict[str, torch.Tensor]]:
    """A draft for `target_dir`, from a training checkpoint root or a reference HF directory:
    (config resolved against the target, the target's TransformerConfig at this TP size, full
    TP=1 megatron state dict). Raises if the draft does not fit the target."""
    if os.path.isfile(os.path.join(source, CONFIG_FILE)):
        hf, cfg, tensors = read_reference(source)
        num_target_layers = target_fields(hf, source)["num_target_layers"]
        cfg, tcfg, _ = resolve_for_target(cfg, num_target_layers, hf["vocab_size"], target_dir,
                                          tensor_parallel_size, where=source)
        return cfg, tcfg, state_dict_adapter.hf_to_megatron(tensors, cfg)
    extra, cfg, full = read_checkpoint(source)
    target = target_fields(target_description(extra, source), source)
    cfg, tcfg, _ = resolve_for_target(cfg, target["num_target_layers"], target["vocab_size"],
                                      target_dir, tensor_parallel_size, where=source)
    return cfg, tcfg, full


def target_description(extra: dict, where: str) -> dict:
    """The imported reference config (what the draft was published with), else the target's
    config.json as training records it."""
    target = extra.get("reference_config") or (extra.get("target") or {}).get("hf_config")
    if not isinstance(target, dict):
        raise ValueError(f"{where}: the checkpoint describes no target (extra['target']"
                         "['hf_config'] missing)")
    return target


def _unstack_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron stores per-layer tensors stacked along a leading layer axis under
    `decoder.layers.<name>`; split them into `decoder.layers.<i>.<name>` (TE's fused pre-MLP norm
    under the local name)."""
    out = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"decoder\.layers\.(.+)", name)
        if not m:
            out[name] = tensor
            continue
        suffix = _TE_FUSED_NORM[1] if m.group(1) == _TE_FUSED_NORM[0] else m.group(1)
        for i, t in enumerate(tensor.unbind(0)):
            out[f"decoder.layers.{i}.{suffix}"] = t.clone()
    return out
