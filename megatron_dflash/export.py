"""Move drafts between megatron checkpoints and the reference (z-lab) Hugging Face format.

    export_checkpoint(ckpt_root, out_dir, dtype="bf16")     training checkpoint (any TP) -> HF dir
    import_reference(ref_dir, ckpt_root, target_dir=...)    HF dir -> megatron checkpoint (this TP)

The reference format (spec §8) is `config.json` + one `model.safetensors` holding the draft's
un-prefixed tensors (`layers.{i}.self_attn.q_proj.weight`, ..., `fc.weight`, `hidden_norm.weight`,
`norm.weight`), with no embedding and no LM head: the draft borrows the target's. It loads
unchanged into `dflash.model.DFlashDraftModel.from_pretrained`, vLLM and SGLang. No `auto_map` is
written because no modeling file (`dflash.py`, z-lab code) is shipped: HF `AutoModel` with
`trust_remote_code` cannot load the directory, every other consumer can.

A checkpoint is read without building a model: `dist_checkpointing.load_tensors_metadata` lists
every stored tensor at its full (TP=1) shape, so one process loads a checkpoint saved at any TP,
with either backend, in its stored dtype (bit-exact). Every failure is one `ValueError` or
`FileNotFoundError` naming the file or field, raised before anything is written; outputs are
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from safetensors.torch import save_file

from megatron_dflash import state_dict_adapter
from megatron_dflash.checkpoint import TRACKER, iteration_dir, latest_iteration
from megatron_dflash.config import DFlashConfig, build_target_layer_ids, draft_transformer_config
from megatron_dflash.specs import get_dflash_model_spec
from megatron_dflash.target.hf_import import load_hf_config, target_transformer_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "DFlashDraftModel"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Never written: vLLM reads eagle_aux_hidden_state_layer_ids without DFlash's +1 offset (spec §3.2);
# auto_map would point at a dflash.py that is not shipped.
_NEVER_EXPORTED = ("eagle_aux_hidden_state_layer_ids", "auto_map")
# Reference-config keys of variants the megatron draft does not implement (spec §4.4, [ZLpypi]).
_UNSUPPORTED_DFLASH_KEYS = {"use_swa": False, "causal": False, "input_embedding_scale": 1.0,
                            "output_multiplier": 1.0, "final_logit_softcapping": None}
_TE_FUSED_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
_PREFIX = "draft."


# ------------------------------------------------------------------------------------------------
# Reference format: shapes and config.json
# ------------------------------------------------------------------------------------------------

def reference_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the reference format and its shape, from a resolved config."""
    h, hd, ffn = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"fc.weight": (h, len(cfg.target_layer_ids) * h), "hidden_norm.weight": (h,),
              "norm.weight": (h,)}
    for i in range(cfg.num_draft_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn)})
    return shapes


def reference_config(cfg: DFlashConfig, target: dict, dtype: torch.dtype,
                     base: dict | None = None) -> dict:
    """The reference `config.json` of a resolved draft.

    Args:
        target: the target's `num_target_layers`, `vocab_size`, `max_position_embeddings`,
            `bos_token_id`, `eos_token_id` (`target_fields`).
        base: the reference config the draft was imported from; its other keys are kept, so an
            imported draft exports to the same file.
    """
    out = {k: v for k, v in (base or {}).items() if k not in _NEVER_EXPORTED}
    dflash = dict(out.get("dflash_config") or {})
    dflash.update(mask_token_id=cfg.mask_token_id, target_layer_ids=list(cfg.target_layer_ids))
    if "block_size" in dflash:
        dflash["block_size"] = cfg.block_size
    n = cfg.num_draft_layers
    out.update(
        architectures=[ARCHITECTURE], model_type="qwen3", block_size=cfg.block_size,
        dflash_config=dflash, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=n, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.norm_eps, attention_bias=False, attention_dropout=0.0,
        # rope_theta/rope_scaling for transformers 4, vLLM and SGLang; rope_parameters for 5.
        rope_theta=cfg.rope_theta, rope_scaling=None,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        layer_types=["full_attention"] * n, sliding_window=None, use_sliding_window=False,
        tie_word_embeddings=False, dtype=_DTYPE_NAMES[dtype], **target)
    if "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return dict(sorted(out.items()))


def target_fields(hf_config: dict, where: str) -> dict:
    """What the reference config records about the target, from the target's config.json or
    from a reference draft config (which names the target's layer count `num_target_layers`)."""
    is_draft = hf_config.get("architectures") == [ARCHITECTURE]
    layers_key = "num_target_layers" if is_draft else "num_hidden_layers"
    out = {"num_target_layers": hf_config.get(layers_key), "vocab_size": hf_config.get("vocab_size"),
           "max_position_embeddings": hf_config.get("max_position_embeddings"),
           "bos_token_id": hf_config.get("bos_token_id"),
           "eos_token_id": hf_config.get("eos_token_id")}
    for key in ("num_target_layers", "vocab_size", "max_position_embeddings"):
        if not _is_int(out[key]) or out[key] < 1:
            raise ValueError(f"{where}: {key}={out[key]!r} is missing or not a positive integer")
    return out


def config_from_reference(hf: dict, where: str) -> DFlashConfig:
    """The (unresolved) DFlashConfig a reference config.json describes; rejects the variants the
    megatron draft does not implement. Values in `dflash_config` win over top-level ones, as in
    the reference loader."""
    problems = []
    if hf.get("architectures") != [ARCHITECTURE]:
        problems.append(f"architectures={hf.get('architectures')!r} (expected [{ARCHITECTURE!r}])")
    if hf.get("model_type") != "qwen3":
        problems.append(f"model_type={hf.get('model_type')!r} (expected 'qwen3')")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("use_sliding_window", False), ("is_causal", False)):
        if hf.get(key, ok) not in (ok, None):
            problems.append(f"{key}={hf[key]!r}")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        problems.append(f"layer_types={hf['layer_types']}")
    dflash = hf.get("dflash_config") or {}
    if not isinstance(dflash, dict):
        raise ValueError(f"{where}: dflash_config={dflash!r} must be an object")
    problems += [f"dflash_config.{k}={dflash[k]!r}" for k, ok in _UNSUPPORTED_DFLASH_KEYS.items()
                 if dflash.get(k, ok) != ok]
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta"),
                                         "rope_type": (hf.get("rope_scaling") or {}).get(
                                             "rope_type", "default")}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope}")
    if problems:
        raise ValueError(f"{where}: not supported by the megatron draft: {', '.join(problems)}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not _is_int(hf.get(key)):
            raise ValueError(f"{where}: {key}={hf.get(key)!r} is missing or not an integer")

    def value(name, default=None):
        return dflash.get(name, hf.get(name, default))

    num_layers = hf["num_hidden_layers"]
    layer_ids = value("target_layer_ids")
    if layer_ids is None:
        layer_ids = build_target_layer_ids(target_fields(hf, where)["num_target_layers"], num_layers)
    return DFlashConfig(
        block_size=value("block_size", 16), num_draft_layers=num_layers,
        target_layer_ids=list(layer_ids) if isinstance(layer_ids, (list, tuple)) else layer_ids,
        mask_token_id=value("mask_token_id"), num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"], rope_theta=rope.get("rope_theta"),
        norm_eps=hf.get("rms_norm_eps"), hidden_size=hf["hidden_size"])


def draft_only_target_config(cfg: DFlashConfig, num_target_layers: int,
                             tensor_parallel_size: int = 1) -> TransformerConfig:
    """A stand-in target TransformerConfig for when only the draft is known: it carries the
    fields `DFlashConfig.resolve` checks (layers, hidden size) and the dtype/parallel fields the
    draft inherits (fp32, CPU allocation, no initialisation: weights are always loaded)."""
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "ffn_hidden_size"):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be a positive integer")
    return TransformerConfig(
        num_layers=num_target_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_hidden_size,
        layernorm_epsilon=cfg.norm_eps or 1e-6, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size, use_cpu_initialization=True,
        perform_initialization=False)


def resolve_for_target(cfg: DFlashConfig, num_target_layers: int, vocab_size: int,
                       target_dir: str | None = None, tensor_parallel_size: int = 1,
                       where: str = "draft") -> tuple[DFlashConfig, TransformerConfig, dict | None]:
    """Validate a draft config, against the target checkpoint at `target_dir` when given.

    Returns (resolved config, the target TransformerConfig the draft is built on, the target's
    config.json dict or None). With a target, its hidden size, layer count and vocabulary (the
    mask id must be a row of its embedding) must fit the draft.
    """
    if target_dir is None:
        tcfg, vocab, target_json = (draft_only_target_config(cfg, num_target_layers,
                                                             tensor_parallel_size), vocab_size, None)
    else:
        hf = load_hf_config(target_dir)
        if hf.num_hidden_layers != num_target_layers:
            raise ValueError(f"{where} was trained on a {num_target_layers}-layer target; the "
                             f"target at {target_dir} has {hf.num_hidden_layers} layers")
        tcfg = target_transformer_config(hf, tensor_parallel_size=tensor_parallel_size)
        vocab = hf.vocab_size
        target_json = json.loads((Path(target_dir) / CONFIG_FILE).read_text())
    try:
        resolved = cfg.resolve(tcfg, vocab_size=vocab, target_rope_theta=cfg.rope_theta)
    except ValueError as e:
        fit = f" does not fit the target at {target_dir}" if target_dir else ""
        raise ValueError(f"{where}{fit}: {e}") from None
    return resolved, tcfg, target_json


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

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
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            _check_shapes(shapes, reference_shapes(resolved), str(weights))
            tensors = {k: f.get_tensor(k) for k in shapes}
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
    otherwise a world of one process is created for the read.
    """
    path = checkpoint_path(root, iteration)
    with _process_group():
        try:
            common = dist_checkpointing.load_common_state_dict(path)
            extra = common["extra"]
            stored = {k: v for k, v in dist_checkpointing.load_tensors_metadata(path).items()
                      if k.startswith(_PREFIX)}
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
    target = target_fields(_target_description(extra, path), path)
    cfg = resolve_for_target(cfg, target["num_target_layers"], target["vocab_size"],
                             where=path)[0]
    full = _unstack_layers({k[len(_PREFIX):]: v for k, v in loaded.items()
                            if k.startswith(_PREFIX)})
    try:
        hf = state_dict_adapter.megatron_to_hf(full, cfg)
        _check_shapes({k: tuple(v.shape) for k, v in hf.items()}, reference_shapes(cfg), path)
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
    target = target_fields(_target_description(extra, source), source)
    cfg, tcfg, _ = resolve_for_target(cfg, target["num_target_layers"], target["vocab_size"],
                                      target_dir, tensor_parallel_size, where=source)
    return cfg, tcfg, full


# ------------------------------------------------------------------------------------------------
# Export / import
# ------------------------------------------------------------------------------------------------

def export_checkpoint(root: str, out_dir: str, *, iteration: int | None = None,
                      dtype: str | None = None, tokenizer_dir: str | None = None) -> str:
    """Write a training checkpoint's draft as a reference-format directory `out_dir`.

    Args:
        dtype: "fp32", "bf16" or "fp16"; default: the stored dtype (fp32 if mixed).
        tokenizer_dir: copy the tokenizer files found there (the target's) into `out_dir`.
    """
    _check_new_output(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    extra, cfg, full = read_checkpoint(root, iteration)
    tensors = state_dict_adapter.megatron_to_hf(full, cfg)
    stored = {t.dtype for t in tensors.values()}
    out_dtype = DTYPES[dtype] if dtype else (stored.pop() if len(stored) == 1 else torch.float32)
    base = extra.get("reference_config")
    target = target_fields(_target_description(extra, root), root)
    config = reference_config(cfg, target, out_dtype, base)
    with _atomic_dir(out_dir) as tmp:
        save_file({k: v.to(out_dtype).contiguous() for k, v in sorted(tensors.items())},
                  os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        for src in tokenizer_files:
            shutil.copy2(src, tmp)
    return out_dir


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
    draft = build_module(get_dflash_model_spec(cfg.num_draft_layers),
                         config=draft_transformer_config(cfg, tcfg), dflash_config=cfg)
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


def save_model_checkpoint(root: str, draft, extra: dict, iteration: int = 0) -> str:
    """A draft-only checkpoint in the training layout ("model" = the draft's sharded state dict
    under "draft.", plus "extra"; no optimizer), written under `.partial` and renamed, then the
    tracker. Collective; `root` must not hold a checkpoint yet."""
    final = iteration_dir(root, iteration)
    partial = final + ".partial"
    created = not os.path.exists(root)
    dist.barrier()
    try:
        if dist.get_rank() == 0:
            os.makedirs(partial)
        dist.barrier()
        dist_checkpointing.save({"model": draft.sharded_state_dict(prefix=_PREFIX),
                                 "extra": dict(extra, iteration=iteration)}, partial)
        dist.barrier()
        if dist.get_rank() == 0:
            os.replace(partial, final)
            tmp = os.path.join(root, TRACKER + ".tmp")
            with open(tmp, "w") as f:
                f.write(str(iteration))
            os.replace(tmp, os.path.join(root, TRACKER))
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(root if created else partial, ignore_errors=True)
        raise
    dist.barrier()
    return final


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shapes(found: dict, expected: dict, where: str) -> None:
    missing = sorted(expected.keys() - found.keys())
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing (expected shape "
                         f"{list(expected[missing[0]])}; {len(missing)} missing in all)")
    unexpected = sorted(found.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{where}: tensor {unexpected[0]!r} is not part of the DFlash draft "
                         "format (it has no embedding or LM head of its own)")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {list(found[name])}, the "
                             f"config implies {list(shape)}")


def _target_description(extra: dict, where: str) -> dict:
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


def _tokenizer_files(tokenizer_dir: str) -> list[str]:
    files = [os.path.join(tokenizer_dir, f) for f in TOKENIZER_FILES
             if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if not files:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return files


def _check_new_output(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: exists and is not an empty directory; choose a new output")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: no such directory for the output")


@contextlib.contextmanager
def _atomic_dir(out_dir: str):
    """A temporary directory beside `out_dir`, renamed to it on success, removed on failure."""
    tmp = f"{os.path.abspath(out_dir)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _process_group():
    """dist_checkpointing needs a default process group: create a world of one process when none
    exists (and only then tear it down)."""
    if dist.is_initialized():
        yield
        return
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=10))
    try:
        yield
    finally:
        dist.destroy_process_group()
