"""RoPE scaling as a Hugging Face config declares it, on megatron-core's own rotary modules.

The target and the draft rotate the same positions, so the draft takes the target's scaling (with
its own head_dim, as the reference draft's `Qwen3RotaryEmbedding` does with the `rope_scaling` its
config.json declares). A *scaling* is HF's `rope_parameters` without `rope_theta` and
`partial_rotary_factor` (the target's own business): `{"rope_type": "default"}` (none) or

  * `linear` (factor f): every position divided by f — megatron's `seq_len_interpolation_factor`;
  * `llama3` with Llama 3.1's constants (low/high frequency factors 1/4, original context 8192):
    megatron's `rope_scaling` (only the factor is configurable there);
  * `yarn`: megatron's `YarnRotaryEmbedding` (GPTModel `position_embedding_type='yarn'`), which
    reads the `yarn_*` fields of the TransformerConfig (`YarnTransformerConfig`); the attention
    scales cos/sin by the same concentration factor as HF's `attention_factor`. HF's
    `truncate` is megatron's `yarn_correction_range_round_to_int`; HF uses (mscale,
    mscale_all_dim) only when both are set, which megatron computes from (1, 0).

Anything else (dynamic, longrope, YaRN on a partial rotary, an explicit attention factor other
than the derived one) is refused naming its field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

NONE = {"rope_type": "default"}
SUPPORTED = ("supported: default, linear, llama3 (Llama 3.1's low_freq_factor 1, "
             "high_freq_factor 4, original_max_position_embeddings 8192), yarn")
_LLAMA31 = {"low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}
_TARGET_ONLY = ("rope_theta", "partial_rotary_factor")


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """A TransformerConfig with the YaRN fields GPTModel and the attention read by name."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True


def scaling_of(rope_parameters: dict | None, max_position_embeddings: int) -> dict:
    """The scaling of an HF config's `rope_parameters`, YaRN's implicit factor made explicit
    (transformers: max_position_embeddings / original_max_position_embeddings)."""
    scaling = {k: v for k, v in (rope_parameters or {}).items() if k not in _TARGET_ONLY}
    scaling.setdefault("rope_type", "default")
    if scaling["rope_type"] == "yarn" and scaling.get("factor") is None:
        original = scaling.get("original_max_position_embeddings")
        if original:
            scaling["factor"] = max_position_embeddings / original
    return scaling


def kind(scaling: dict | None) -> str:
    return (scaling or NONE).get("rope_type", "default")


def problems(scaling: dict | None, rotary_percent: float = 1.0) -> list[str]:
    """The fields of a scaling megatron cannot reproduce, each named (empty when it can)."""
    scaling = scaling or NONE
    rope_type = kind(scaling)
    if rope_type == "default":
        return []
    if rope_type not in ("linear", "llama3", "yarn"):
        return [f"rope_parameters.rope_type={rope_type!r}"]
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        return [f"rope_parameters.factor={factor!r} (rope_type {rope_type!r} needs a factor > 0)"]
    if rope_type == "llama3":
        return [f"rope_parameters.{k}={scaling.get(k)!r} (megatron's llama3 scaling has {v})"
                for k, v in _LLAMA31.items() if scaling.get(k) != v]
    if rope_type == "yarn":
        found = []
        if rotary_percent != 1.0:
            found.append(f"partial_rotary_factor={rotary_percent} with rope_type 'yarn' "
                         "(megatron's YaRN rotates every head dim)")
        if not scaling.get("original_max_position_embeddings"):
            found.append("rope_parameters.original_max_position_embeddings="
                         f"{scaling.get('original_max_position_embeddings')!r} (YaRN needs it)")
        explicit = scaling.get("attention_factor")
        if explicit is not None and not math.isclose(explicit, attention_factor(scaling)):
            found.append(f"rope_parameters.attention_factor={explicit} (megatron derives "
                         f"{attention_factor(scaling):.6g} from factor, mscale, mscale_all_dim)")
        return found
    return []


def gpt_model_kwargs(scaling: dict | None, rotary_base: float,
                     rotary_percent: float = 1.0) -> dict:
    """GPTModel's position-embedding arguments (the target's); `problems` must be empty."""
    scaling = scaling or NONE
    kwargs = dict(position_embedding_type="rope", rotary_base=rotary_base,
                  rotary_percent=rotary_percent)
    rope_type = kind(scaling)
    if rope_type == "linear":
        kwargs["seq_len_interpolation_factor"] = float(scaling["factor"])
    elif rope_type == "llama3":
        kwargs |= dict(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    elif rope_type == "yarn":
        kwargs["position_embedding_type"] = "yarn"
    return kwargs


def config_fields(scaling: dict | None) -> dict:
    """The `YarnTransformerConfig` fields of a YaRN scaling (none otherwise): the target's and
    the draft's attention take their cos/sin factor from them."""
    if kind(scaling) != "yarn":
        return {}
    mscale, mscale_all_dim = _mscales(scaling)
    return dict(
        yarn_rotary_scaling_factor=float(scaling["factor"]),
        yarn_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
        yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
        yarn_mscale=mscale,
        yarn_mscale_all_dim=mscale_all_dim,
        yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)),
    )


def config_class(scaling: dict | None, base: type = TransformerConfig) -> type:
    """`base`, or `YarnTransformerConfig` for a YaRN scaling on a plain TransformerConfig."""
    return YarnTransformerConfig if kind(scaling) == "yarn" and base is TransformerConfig else base


def draft_rotary_embedding(scaling: dict | None, *, kv_channels: int, rotary_base: float,
                           use_cpu_initialization: bool) -> RotaryEmbedding:
    """megatron's rotary module of this scaling for the draft, whose `inv_freq` is set to the
    angle per position it applies (the draft rotates explicit positions, `position * inv_freq`:
    linear's divided positions and YaRN's blended frequencies included, read off the module at
    position 1). YaRN's cos/sin factor comes from the draft config (`config_fields`)."""
    scaling = scaling or NONE
    common = dict(kv_channels=kv_channels, rotary_percent=1.0, rotary_interleaved=False,
                  rotary_base=rotary_base, use_cpu_initialization=use_cpu_initialization)
    if kind(scaling) == "yarn":
        fields = config_fields(scaling)
        module = YarnRotaryEmbedding(
            **common, scaling_factor=fields["yarn_rotary_scaling_factor"],
            original_max_position_embeddings=fields["yarn_original_max_position_embeddings"],
            beta_fast=fields["yarn_beta_fast"], beta_slow=fields["yarn_beta_slow"],
            mscale=fields["yarn_mscale"], mscale_all_dim=fields["yarn_mscale_all_dim"],
            correction_range_round_to_int=fields["yarn_correction_range_round_to_int"])
        angles = module.get_emb(2)[0]
    else:
        kwargs = gpt_model_kwargs(scaling, rotary_base)
        module = RotaryEmbedding(**common,
                                 seq_len_interpolation_factor=kwargs.get(
                                     "seq_len_interpolation_factor"),
                                 rope_scaling=kwargs.get("rope_scaling", False),
                                 rope_scaling_factor=kwargs.get("rope_scaling_factor", 8.0))
        angles = module.get_emb(2)
    module.inv_freq = angles[1, 0, 0, :kv_channels // 2].float().cpu().clone()
    return module


def reference_fields(scaling: dict | None, rotary_base: float) -> dict:
    """The reference draft config.json's rope keys: `rope_theta` and `rope_scaling` (None for
    none) for transformers 4, vLLM and SGLang, `rope_parameters` for transformers 5."""
    scaling = dict(scaling or NONE)
    declared = None if kind(scaling) == "default" else scaling
    return dict(rope_theta=rotary_base, rope_scaling=declared,
                rope_parameters={"rope_theta": rotary_base, **scaling})


def from_reference(config: dict) -> tuple[float | None, dict]:
    """(rope_theta, scaling) a reference draft config.json declares (either form)."""
    rope = config.get("rope_parameters")
    if not rope:
        rope = dict(config.get("rope_scaling") or NONE)
        if "type" in rope:  # transformers 4's older key
            rope.setdefault("rope_type", rope.pop("type"))
        rope["rope_theta"] = config.get("rope_theta")
    return rope.get("rope_theta"), scaling_of(rope, config.get("max_position_embeddings") or 0)


def attention_factor(scaling: dict) -> float:
    """HF's YaRN attention factor (megatron's concentration factor) of a scaling."""
    factor = float(scaling["factor"])
    if factor <= 1:
        return 1.0
    mscale, mscale_all_dim = _mscales(scaling)
    return (0.1 * mscale * math.log(factor) + 1) / (
        0.1 * mscale_all_dim * math.log(factor) + 1 if mscale_all_dim else 1.0)


def _mscales(scaling: dict) -> tuple[float, float]:
    """megatron's (mscale, mscale_all_dim): HF's pair when both are set, else (1, 0), which
    gives HF's plain attention factor."""
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(scaling["mscale"]), float(scaling["mscale_all_dim"])
    return 1.0, 0.0
