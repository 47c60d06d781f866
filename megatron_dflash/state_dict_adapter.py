"""How the draft's megatron state dict maps to the reference HF format, and how it splits over TP.

Reference names (z-lab `DFlashDraftModel`, no prefix): `layers.{i}.self_attn.{q,k,v,o}_proj`,
`self_attn.{q,k}_norm`, `mlp.{gate,up,down}_proj`, `{input,post_attention}_layernorm`, `norm`,
`fc`, `hidden_norm` (all `.weight`); DFlash2 adds `layers.{i}.{attention,mlp}_conv.base_kernel`,
`...kernel_projection.weight` and `candidate_selector.hidden_projection.weight`, and the
codebooks `candidate_selector.{predecessor,successor}_codebook` without `.weight` (spec §6).
Megatron fuses q/k/v into `linear_qkv` (per query group) and gate/up into `linear_fc1`;
`megatron_dflash.weights` holds those layouts. "Full" below means the tensor-parallel size 1
megatron state dict; `shard` cuts it into a TP rank's (the codebooks split over the vocabulary
like the embedding; `split_kind` says how each tensor splits).
"""
from __future__ import annotations

import re

import torch

from megatron_dflash import weights as W
from megatron_dflash.config import DFlashConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# megatron suffix inside a layer -> reference suffix (unfused tensors only)
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"fc.weight": "fc.weight", "hidden_norm.weight": "hidden_norm.weight",
            "decoder.final_layernorm.weight": "norm.weight"}
_QKV, _FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
# DFlash2: the same names in both formats, but for the codebooks' missing `.weight` in the file.
_CONV = tuple(f"{conv}.{name}" for conv in ("attention_conv", "mlp_conv")
              for name in ("base_kernel", "kernel_projection.weight"))
_SELECTOR = {f"candidate_selector.{name}.weight": f"candidate_selector.{name}"
             for name in ("predecessor_codebook", "successor_codebook")}
_SELECTOR["candidate_selector.hidden_projection.weight"] = \
    "candidate_selector.hidden_projection.weight"


def _dflash2_names(cfg: DFlashConfig) -> dict[str, str]:
    """megatron -> reference names of a DFlash2 draft's convolutions and selector (none for
    DFlash)."""
    if cfg.draft_variant != "dflash2":
        return {}
    names = dict(_SELECTOR)
    for i in range(cfg.num_draft_layers):
        names.update({f"decoder.layers.{i}.{n}": f"layers.{i}.{n}" for n in _CONV})
    return names


def hf_to_megatron(hf: dict[str, torch.Tensor], cfg: DFlashConfig) -> dict[str, torch.Tensor]:
    """Reference HF tensors -> the full megatron draft state dict. Raises KeyError naming a
    missing reference tensor."""
    out = {m: hf[h] for m, h in (_TOP_MAP | _dflash2_names(cfg)).items()}
    for i in range(cfg.num_draft_layers):
        pre, hpre = f"decoder.layers.{i}.", f"layers.{i}."
        for m, h in _LAYER_MAP.items():
            out[pre + m] = hf[hpre + h]
        out[pre + _QKV] = W.merge_qkv(*(hf[f"{hpre}self_attn.{x}_proj.weight"] for x in "qkv"),
                                      num_query_groups=cfg.num_key_value_heads)
        out[pre + _FC1] = W.merge_fc1(hf[hpre + "mlp.gate_proj.weight"], hf[hpre + "mlp.up_proj.weight"])
    return out


def megatron_to_hf(full: dict[str, torch.Tensor], cfg: DFlashConfig) -> dict[str, torch.Tensor]:
    """The full megatron draft state dict -> reference HF tensors (inverse of `hf_to_megatron`)."""
    out = {h: full[m] for m, h in (_TOP_MAP | _dflash2_names(cfg)).items()}
    for i in range(cfg.num_draft_layers):
        pre, hpre = f"decoder.layers.{i}.", f"layers.{i}."
        for m, h in _LAYER_MAP.items():
            out[hpre + h] = full[pre + m]
        q, k, v = W.split_qkv(full[pre + _QKV], cfg.num_attention_heads, cfg.num_key_value_heads)
        out.update({f"{hpre}self_attn.q_proj.weight": q, f"{hpre}self_attn.k_proj.weight": k,
                    f"{hpre}self_attn.v_proj.weight": v})
        out[hpre + "mlp.gate_proj.weight"], out[hpre + "mlp.up_proj.weight"] = W.split_fc1(full[pre + _FC1])
    return out


def split_kind(name: str) -> str:
    """How a draft tensor is split over TP: qkv, fc1, columns (the vocabulary-parallel
    codebooks), rows or replicated."""
    if name in _SELECTOR and "codebook" in name:
        return "columns"
    m = _LAYER.match(name)
    suffix = m.group(2) if m else name
    if suffix == _QKV:
        return "qkv"
    if suffix == _FC1:
        return "fc1"
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "rows"
    return "replicated"  # norms, fc (duplicated on every rank)


def shard(full: dict[str, torch.Tensor], cfg: DFlashConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s draft state dict from the full one."""
    out = {}
    for name, t in full.items():
        kind = split_kind(name)
        out[name] = (W.shard_qkv(t, cfg.num_key_value_heads, rank, size) if kind == "qkv" else
                     W.shard_fc1(t, rank, size) if kind == "fc1" else
                     W.shard_rows(t, rank, size) if kind == "rows" else
                     W.shard_columns(t, rank, size) if kind == "columns" else t)
    return out
