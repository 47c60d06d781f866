"""The reference (z-lab) DFlash draft format: file names, the `config.json` codec, tensor shapes.

The format (spec §8) is `config.json` + one `model.safetensors` holding the draft's un-prefixed
tensors (`layers.{i}.self_attn.q_proj.weight`, ..., `fc.weight`, `hidden_norm.weight`,
`norm.weight`), with no embedding and no LM head: the draft borrows the target's. It loads
unchanged into `dflash.model.DFlashDraftModel.from_pretrained`, vLLM and SGLang. A DFlash2 draft
(`architectures: ["DFlash2DraftModel"]`, `DFlash2DraftModel.from_pretrained`) adds each layer's
two convolutions and the candidate selector, its sizes in `dflash_config` (spec §5-6). No
`auto_map` is written because no modeling file (`dflash.py`, z-lab code) is shipped: HF
`AutoModel` with `trust_remote_code` cannot load the directory, every other consumer can.

    reference_config(cfg, target, dtype)        DFlashConfig -> config.json dict
    config_from_reference(hf, where)             config.json dict -> DFlashConfig (unresolved)
    layer_fields(cfg), layer_config(hf, ...)     the per-layer attention keys, both ways (§7)
    resolve_for_target(cfg, ...)                 validated config + the target it is built on
    reference_shapes(cfg), check_shapes(...)     the tensors a config implies

A bad config is one `ValueError` naming the file or field.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash import rope
from megatron_dflash.config import (FULL_ATTENTION, LAYER_TYPES, SLIDING, DFlashConfig,
                                     build_target_layer_ids)
from megatron_dflash.targets.hf_import import load_hf_config, target_transformer_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "DFlashDraftModel"
# `architectures` of each draft variant (vLLM and SGLang load both).
ARCHITECTURES = {"dflash": ARCHITECTURE, "dflash2": "DFlash2DraftModel"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Never written: vLLM reads eagle_aux_hidden_state_layer_ids without DFlash's +1 offset (spec §3.2);
# auto_map would point at a dflash.py that is not shipped.
_NEVER_EXPORTED = ("eagle_aux_hidden_state_layer_ids", "auto_map")
# vLLM's own dflash_config spellings of the per-layer attention (spec §7.4): the export states
# causality and window once, at the top level, where the reference, vLLM and SGLang all read them.
_VLLM_LAYER_KEYS = ("causal", "use_swa", "swa_window_size")
# transformers' Qwen3Config default: with no `layer_types`, layers from this index on slide.
_MAX_WINDOW_LAYERS = 28
# The draft's logit and embedding scales (both variants; written to dflash_config for DFlash2 or
# when not the default) and DFlash2's keys, all in dflash_config (dflash2_and_swa_spec.md §5).
_SCALES = {"output_multiplier": 1.0, "final_logit_softcapping": None, "input_embedding_scale": 1.0}
_DFLASH2_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
_CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


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
        if cfg.draft_variant == "dflash2":
            taps = 2 * cfg.conv_kernel_size * (h // cfg.conv_group_size)
            for conv in ("attention_conv", "mlp_conv"):
                shapes.update({f"{p}{conv}.base_kernel": (2, cfg.conv_kernel_size, h),
                               f"{p}{conv}.kernel_projection.weight": (taps, h)})
    if cfg.draft_variant == "dflash2":
        r = cfg.selector_rank
        shapes.update({"candidate_selector.hidden_projection.weight": (r, h),
                       **{name: (cfg.vocab_size, r) for name in _CODEBOOKS}})
    return shapes


def canonical_name(name: str) -> str:
    """A tensor's name in the format. The selector's codebooks are stored without `.weight`
    (spec §6: what vLLM, SGLang, SpecForge and the MLX reference read); the reference's own
    `save_pretrained` of a model it did not load from such a file writes them with it."""
    stem = name.removesuffix(".weight")
    return stem if stem in _CODEBOOKS else name


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
    dflash = {k: v for k, v in (out.get("dflash_config") or {}).items()
              if k not in _VLLM_LAYER_KEYS}
    dflash.update(mask_token_id=cfg.mask_token_id, target_layer_ids=list(cfg.target_layer_ids))
    dflash2 = cfg.draft_variant == "dflash2"
    if "block_size" in dflash or dflash2:
        dflash["block_size"] = cfg.block_size
    for key, default in _SCALES.items():
        if dflash2 or key in dflash or getattr(cfg, key) != default:
            dflash[key] = getattr(cfg, key)
    if dflash2:
        dflash.update({key: getattr(cfg, key) for key in _DFLASH2_KEYS})
    n = cfg.num_draft_layers
    out.update(
        architectures=[ARCHITECTURES[cfg.draft_variant]], model_type="qwen3",
        block_size=cfg.block_size,
        dflash_config=dflash, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=n, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.norm_eps, attention_bias=False, attention_dropout=0.0,
        **rope.reference_fields(cfg.rope_scaling, cfg.rope_theta),
        **layer_fields(cfg), tie_word_embeddings=False, dtype=_DTYPE_NAMES[dtype], **target)
    if "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return dict(sorted(out.items()))


def layer_fields(cfg: DFlashConfig) -> dict:
    """The per-layer attention of a resolved draft as the reference, vLLM and SGLang read it
    (spec §7): explicit `layer_types`; `sliding_window` with `use_sliding_window: true` (else
    transformers' Qwen3Config drops the window); `is_causal` true/false when every layer agrees,
    null when the layers follow the reference default of different types (sliding causal, full
    not), which every loader then reads from `layer_types`."""
    kinds = cfg.layer_attentions()
    types = [FULL_ATTENTION if kind.window is None else SLIDING for kind in kinds]
    sliding = SLIDING in types
    causal = {kind.causal for kind in kinds}
    return dict(layer_types=types, sliding_window=cfg.sliding_window if sliding else None,
                use_sliding_window=sliding,
                is_causal=causal.pop() if len(causal) == 1 else None)


def layer_config(hf: dict, num_layers: int, where: str) -> dict:
    """`layer_types`, `sliding_window`, `is_causal` of a DFlashConfig from a reference config, as
    the reference resolves them (a window only with `use_sliding_window`; `layer_types` from
    `max_window_layers` when absent). Raises, naming the key, where the reference, vLLM and
    SGLang would read different per-layer attention."""
    use = hf.get("use_sliding_window", False)
    window = hf.get("sliding_window") if use else None
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", _MAX_WINDOW_LAYERS)
        types = [SLIDING if window is not None and i >= first else FULL_ATTENTION
                 for i in range(num_layers)]
    if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"{where}: layer_types={types!r}: each must be one of {LAYER_TYPES}")
    is_causal = hf.get("is_causal")
    if is_causal is not None and not isinstance(is_causal, bool):
        raise ValueError(f"{where}: is_causal={is_causal!r} must be true, false or null")
    sliding = SLIDING in types
    if sliding and window is None:
        raise ValueError(
            f"{where}: layer_types has sliding_attention layers but use_sliding_window={use!r}, "
            f"sliding_window={hf.get('sliding_window')!r}: transformers drops the window unless "
            "use_sliding_window is true (the reference then runs those layers unwindowed, vLLM "
            "and SGLang refuse them)")
    out = dict(layer_types=list(types), sliding_window=window if sliding else None,
               is_causal=is_causal)
    causal, use_swa, swa = ((hf.get("dflash_config") or {}).get(k) for k in _VLLM_LAYER_KEYS)
    kinds = (DFlashConfig(num_draft_layers=len(types), **out).layer_attentions()
             if is_causal is None and causal is not None else [])
    if any(kind.causal != causal for kind in kinds):
        raise ValueError(f"{where}: dflash_config.causal={causal!r}: vLLM makes every layer so, "
                         "the reference and SGLang make sliding layers causal and full ones not; "
                         "set the top-level is_causal")
    if use_swa and not all(t == SLIDING for t in types):
        raise ValueError(f"{where}: dflash_config.use_swa={use_swa!r}: vLLM slides every layer, "
                         f"the reference only the sliding_attention ones of layer_types={types}")
    if swa is not None and sliding and swa != window:
        raise ValueError(f"{where}: dflash_config.swa_window_size={swa!r}: vLLM's window; the "
                         f"reference's and SGLang's is sliding_window={window!r}")
    return out


def target_fields(hf_config: dict, where: str) -> dict:
    """What the reference config records about the target, from the target's config.json or
    from a reference draft config (which names the target's layer count `num_target_layers`)."""
    is_draft = _variant(hf_config) is not None
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
    variant = _variant(hf)
    if variant is None:
        expected = " or ".join(f"[{a!r}]" for a in ARCHITECTURES.values())
        problems.append(f"architectures={hf.get('architectures')!r} (expected {expected})")
    if hf.get("model_type") != "qwen3":
        problems.append(f"model_type={hf.get('model_type')!r} (expected 'qwen3')")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) not in (ok, None):
            problems.append(f"{key}={hf[key]!r}")
    dflash = hf.get("dflash_config") or {}
    if not isinstance(dflash, dict):
        raise ValueError(f"{where}: dflash_config={dflash!r} must be an object")
    rope_theta, rope_scaling = rope.from_reference(hf)
    problems += rope.problems(rope_scaling)
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
    dflash2 = {}
    if variant == "dflash2":
        missing = [key for key in _DFLASH2_KEYS if value(key) is None]
        if missing:
            raise ValueError(f"{where}: a DFlash2 draft needs dflash_config.{missing[0]} "
                             f"({', '.join(missing)} missing)")
        dflash2 = {key: value(key) for key in _DFLASH2_KEYS}
        dflash2.update(draft_variant="dflash2", vocab_size=hf.get("vocab_size"))
    softcap = value("final_logit_softcapping")
    scales = dict(output_multiplier=value("output_multiplier", 1.0),
                  input_embedding_scale=value("input_embedding_scale", 1.0),
                  # the reference turns a cap <= 0 off
                  final_logit_softcapping=(None if isinstance(softcap, (int, float))
                                           and softcap <= 0 else softcap))
    return DFlashConfig(**dflash2, **scales, **layer_config(hf, num_layers, where),
        block_size=value("block_size", 16), num_draft_layers=num_layers,
        target_layer_ids=list(layer_ids) if isinstance(layer_ids, (list, tuple)) else layer_ids,
        mask_token_id=value("mask_token_id"), num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"], rope_theta=rope_theta, rope_scaling=rope_scaling,
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
        target_json = hf.to_dict()  # the text model's (a VLM wrapper's `text_config`)
    try:
        resolved = cfg.resolve(tcfg, vocab_size=vocab, target_rope_theta=cfg.rope_theta)
    except ValueError as e:
        fit = f" does not fit the target at {target_dir}" if target_dir else ""
        raise ValueError(f"{where}{fit}: {e}") from None
    return resolved, tcfg, target_json


def check_shapes(found: dict, expected: dict, where: str) -> None:
    """Raise unless the shapes `found` are exactly the `expected` ones (`reference_shapes`)."""
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


def _variant(hf: dict) -> str | None:
    """The draft variant a config.json's `architectures` names (None: not a DFlash draft)."""
    return next((v for v, a in ARCHITECTURES.items() if hf.get("architectures") == [a]), None)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
