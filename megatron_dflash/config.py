"""DFlash configuration: what the draft is, checked against its target before any tensor exists.

`DFlashConfig` holds the DFlash-specific choices (block size, tapped target layers, mask token,
loss decay, per-layer sliding window and causality) and optional draft-architecture overrides;
everything left `None` is inherited from the target. `resolve()` fills those defaults and
validates every field at once, raising one `ValueError` that names the field and its allowed
range. `draft_transformer_config()` then turns the resolved config into the megatron
`TransformerConfig` the draft layers are built from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash import rope
from megatron_dflash.masks import LayerAttention

# Loss decay gamma of the paper (App. A.1) for the block sizes it trained.
_PAPER_GAMMA = ((8, 4.0), (10, 5.0), (16, 7.0))


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference layer choice: `num_draft_layers` ids spread over [1, L-3] (z-lab `model.py`).

    Python's `round` is banker's rounding, as in the reference, so 7.5 -> 8 and 20.5 -> 20.
    """
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [round(start + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def default_loss_gamma(block_size: int) -> float:
    """gamma of the loss weights exp(-(k-1)/gamma): the paper's 4/5/7 for blocks 8/10/16, and a
    linear interpolation through those points (extended past the ends, at least 1) otherwise."""
    pts = _PAPER_GAMMA
    if block_size <= pts[0][0]:
        (b0, g0), (b1, g1) = pts[0], pts[1]
    elif block_size >= pts[-1][0]:
        (b0, g0), (b1, g1) = pts[-2], pts[-1]
    else:
        (b0, g0), (b1, g1) = next((p, q) for p, q in zip(pts, pts[1:]) if p[0] <= block_size <= q[0])
    return max(1.0, g0 + (g1 - g0) * (block_size - b0) / (b1 - b0))


@dataclass
class DFlashConfig:
    """DFlash drafter settings. `None` means "inherit from the target" (or the reference default)."""

    block_size: int = 16
    """Tokens per draft block: the anchor plus block_size-1 MASK slots predicted in one forward."""
    num_draft_layers: int = 5
    """Number of draft transformer layers."""
    target_layer_ids: list[int] | None = None
    """0-based target layers whose outputs feed the draft; default `build_target_layer_ids`."""
    mask_token_id: int | None = None
    """Token id embedded (with the target's frozen embedding) at every MASK slot. Required."""
    num_attention_heads: int | None = None
    """Draft query heads (default: target's)."""
    num_key_value_heads: int | None = None
    """Draft key/value heads for GQA (default: target's query groups; a multi-latent-attention
    target such as DeepSeek-V3 has one key per head, so there: its num_attention_heads)."""
    head_dim: int | None = None
    """Draft head dimension; may differ from hidden/heads (default: target's kv_channels; an MLA
    target's is its v_head_dim, so the draft's heads x head_dim is the target's attention width)."""
    ffn_hidden_size: int | None = None
    """Draft SwiGLU intermediate size (default: the target's dense FFN size, its TransformerConfig's
    `ffn_hidden_size` = HF `intermediate_size`, also for MoE targets: never the per-expert one)."""
    rope_theta: float | None = None
    """Draft RoPE base (default: target's)."""
    rope_scaling: dict | None = None
    """Draft RoPE scaling as HF declares it, without rope_theta (`rope`: `{"rope_type":
    "default"}` is none); default: the target's, so both rotate the same positions alike."""
    norm_eps: float | None = None
    """RMSNorm epsilon of every draft norm (default: target's)."""
    hidden_size: int | None = None
    """Must equal the target's hidden size (shared embedding and LM head); default: target's."""
    loss_gamma: float | None = None
    """Decay of the per-position loss weight exp(-(k-1)/gamma); default by block size (7/5/4 for 16/10/8)."""
    num_anchors: int = 512
    """Anchors (blocks) sampled per sequence per step."""
    draft_variant: str = "dflash"
    """`dflash`, or `dflash2`: the same layers with a grouped dynamic causal convolution around
    each attention and MLP, plus a candidate selector that re-ranks the top-K tokens per slot."""
    conv_kernel_size: int | None = None
    """DFlash2: taps of each convolution (the token and its predecessors in its block), at most
    block_size; default 2."""
    conv_group_size: int | None = None
    """DFlash2: channels sharing one dynamic tap; divides hidden_size; default 16."""
    selector_rank: int | None = None
    """DFlash2: rank r of the selector's [V, r] codebooks; default 256."""
    selector_top_k: int | None = None
    """DFlash2: candidates K the selector re-ranks per slot, in [1, vocab_size]; default 16."""
    selector_loss_weight: float = 1.0
    """DFlash2: weight α of the selector's K-way cross-entropy in the loss (0: it does not learn)."""
    output_multiplier: float = 1.0
    """Scale of the draft's logits, before the softcap (reference `output_multiplier`)."""
    final_logit_softcapping: float | None = None
    """c·tanh(logits / c) of the scaled logits (reference `final_logit_softcapping`; None: off)."""
    input_embedding_scale: float = 1.0
    """Scale of the block tokens' target embedding (reference `input_embedding_scale`)."""
    vocab_size: int | None = None
    """DFlash2: rows of the selector's codebooks, the target's vocabulary (its default)."""
    layer_types: list[str] | None = None
    """Per draft layer, `full_attention` or `sliding_attention` (reference `layer_types`);
    default: every layer sliding with a `sliding_window`, else every layer full."""
    sliding_window: int | None = None
    """W of the sliding layers: a query at position P sees keys at P-W+1..P, context and block
    alike (reference `sliding_window`); at least block_size, so it never cuts a block."""
    is_causal: bool | None = None
    """Causal within the block on every layer (True) or on none (False); None: the reference's
    default, sliding layers causal and full ones not (reference top-level `is_causal`)."""

    def layer_attentions(self) -> list[LayerAttention]:
        """What each layer sees beyond the DFlash rule, as the reference resolves it per layer
        (spec §7.1): causal = `is_causal` if set, else sliding; window = W on sliding layers."""
        default = SLIDING if self.sliding_window is not None else FULL_ATTENTION
        types = self.layer_types or [default] * self.num_draft_layers
        return [LayerAttention(causal=t == SLIDING if self.is_causal is None else self.is_causal,
                               window=self.sliding_window if t == SLIDING else None)
                for t in types]

    def resolve(self, target_config: TransformerConfig, *, vocab_size: int,
                target_rope_theta: float,
                target_rope_scaling: dict | None = None) -> "DFlashConfig":
        """Return a copy with every default filled from the target, after validating all fields."""
        t = target_config
        r = dataclasses.replace(
            self,
            target_layer_ids=(list(self.target_layer_ids) if self.target_layer_ids is not None
                              else None),
            num_attention_heads=_default(self.num_attention_heads, t.num_attention_heads),
            num_key_value_heads=_default(self.num_key_value_heads,
                                         t.num_query_groups or t.num_attention_heads),
            head_dim=_default(self.head_dim, t.kv_channels),
            ffn_hidden_size=_default(self.ffn_hidden_size, t.ffn_hidden_size),
            rope_theta=_default(self.rope_theta, target_rope_theta),
            rope_scaling=dict(_default(self.rope_scaling, target_rope_scaling or rope.NONE)),
            norm_eps=_default(self.norm_eps, t.layernorm_epsilon),
            hidden_size=_default(self.hidden_size, t.hidden_size),
        )
        _check_int(r, "block_size", lo=2)
        _check_int(r, "num_draft_layers", lo=1)
        if r.target_layer_ids is None:
            if r.num_draft_layers > t.num_layers:
                raise ValueError(
                    f"num_draft_layers={r.num_draft_layers}: the default target_layer_ids need "
                    f"num_draft_layers <= the target's {t.num_layers} layers; pass target_layer_ids")
            r.target_layer_ids = build_target_layer_ids(t.num_layers, r.num_draft_layers)
        check_layer_ids(r.target_layer_ids, t.num_layers)
        if r.mask_token_id is None:
            raise ValueError(f"mask_token_id is required: an id in [0, {vocab_size - 1}] that the "
                             "target's embedding holds and your data never uses")
        _check_int(r, "mask_token_id", lo=0, hi=vocab_size - 1)
        if r.hidden_size != t.hidden_size:
            raise ValueError(f"hidden_size={r.hidden_size} must equal the target's hidden size "
                             f"{t.hidden_size} (the draft shares its embedding and LM head)")
        tp = t.tensor_model_parallel_size
        _check_int(r, "num_attention_heads", lo=1)
        _check_int(r, "num_key_value_heads", lo=1, hi=r.num_attention_heads)
        if r.num_attention_heads % r.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={r.num_key_value_heads} must divide "
                             f"num_attention_heads={r.num_attention_heads}")
        if r.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={r.num_attention_heads} must be divisible by the "
                             f"tensor-parallel size {tp}")
        if r.num_key_value_heads % tp and tp % r.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={r.num_key_value_heads} must divide or be divisible "
                             f"by the tensor-parallel size {tp}")
        _check_int(r, "head_dim", lo=2)
        if r.head_dim % 2:
            raise ValueError(f"head_dim={r.head_dim} must be even (rotary embedding)")
        _check_int(r, "ffn_hidden_size", lo=1)
        if r.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={r.ffn_hidden_size} must be divisible by the "
                             f"tensor-parallel size {tp}")
        for name in ("rope_theta", "norm_eps"):
            if not _is_number(getattr(r, name)) or getattr(r, name) <= 0:
                raise ValueError(f"{name}={getattr(r, name)!r} must be a number > 0")
        scaling_problems = rope.problems(r.rope_scaling)
        if scaling_problems:
            raise ValueError(f"rope_scaling={r.rope_scaling}: {', '.join(scaling_problems)} not "
                             f"supported ({rope.SUPPORTED})")
        if r.loss_gamma is None:
            r.loss_gamma = default_loss_gamma(r.block_size)
        elif not _is_number(r.loss_gamma) or r.loss_gamma <= 0:
            raise ValueError(f"loss_gamma={r.loss_gamma!r} must be a number > 0")
        _check_int(r, "num_anchors", lo=1)
        _check_variant(r, vocab_size)
        _check_layers(r)
        return r


def draft_transformer_config(dflash: DFlashConfig, target_config: TransformerConfig,
                             **overrides) -> TransformerConfig:
    """The draft's TransformerConfig: Qwen3-style layers on the target's TP/SP, dtype and init.

    The draft lives on one pipeline stage, so every pipeline-split field is reset, and it is dense
    (its FFN `dflash.ffn_hidden_size`), so an MoE target's expert fields are too. Its attention is
    GQA whatever the target's: a multi-latent-attention target's MLATransformerConfig gives a
    plain TransformerConfig (no MLA fields). The DFlash loss is a weighted mean over the whole
    global batch with fractional weights, which megatron's integer per-token count cannot
    express: the training step normalises it itself (`training.step`), so megatron's own
    per-token normalisation stays off.
    """
    if dflash.head_dim is None:
        raise ValueError("draft_transformer_config needs a resolved DFlashConfig (call resolve())")
    inherited = {f.name: getattr(target_config, f.name)
                 for f in dataclasses.fields(TransformerConfig) if f.init}
    draft = dict(
        multi_latent_attention=False,
        num_layers=dflash.num_draft_layers,
        hidden_size=dflash.hidden_size,
        num_attention_heads=dflash.num_attention_heads,
        num_query_groups=dflash.num_key_value_heads,
        kv_channels=dflash.head_dim,
        ffn_hidden_size=dflash.ffn_hidden_size,
        layernorm_epsilon=dflash.norm_eps,
        normalization="RMSNorm",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
        calculate_per_token_loss=False,
        # The target's own attention and MLP variants, which the Qwen3-style draft has not.
        window_size=None,
        window_attn_skip_freq=None,
        softmax_type="vanilla",
        glu_linear_offset=0.0,
        activation_func_clamp_value=None,
        attention_output_gate=False,
        layernorm_zero_centered_gamma=False,
        experimental_attention_variant=None,
        linear_attention_freq=None,
        **_DENSE_FIELDS,
        **rope.config_fields(dflash.rope_scaling),
    )
    return rope.config_class(dflash.rope_scaling)(**inherited | draft | overrides)


# The draft is dense whatever the target is: every mixture-of-experts field of an MoE target
# (`target.moe.moe_transformer_fields`) goes back to TransformerConfig's default.
_DENSE_FIELDS = {f.name: f.default for f in dataclasses.fields(TransformerConfig)
                 if (f.name.startswith("moe_") or f.name in (
                     "num_moe_experts", "expert_model_parallel_size",
                     "expert_tensor_parallel_size")) and f.default is not dataclasses.MISSING}


VARIANTS = ("dflash", "dflash2")
# The reference's layer types (`layer_types`).
FULL_ATTENTION, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING)
# The DFlash2 fields and their defaults (the published drafts': spec §1).
DFLASH2_DEFAULTS = {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 256,
                    "selector_top_k": 16}


def _check_variant(r: DFlashConfig, vocab_size: int) -> None:
    """Fill and check the variant's fields and the logit/embedding scales (in place)."""
    if r.draft_variant not in VARIANTS:
        raise ValueError(f"draft_variant={r.draft_variant!r} must be one of {VARIANTS}")
    if r.draft_variant == "dflash":
        for name in DFLASH2_DEFAULTS:
            if getattr(r, name) is not None:
                raise ValueError(f"{name}={getattr(r, name)!r} is a DFlash2 setting: it needs "
                                 "draft_variant='dflash2'")
    else:
        r.vocab_size = _default(r.vocab_size, vocab_size)
        if r.vocab_size != vocab_size:
            raise ValueError(f"vocab_size={r.vocab_size} (the selector's codebooks) must equal "
                             f"the target's vocabulary {vocab_size}")
        for name, default in DFLASH2_DEFAULTS.items():
            setattr(r, name, _default(getattr(r, name), default))
        _check_int(r, "conv_kernel_size", lo=1)
        if r.conv_kernel_size > r.block_size:
            raise ValueError(f"conv_kernel_size={r.conv_kernel_size} must be <= block_size="
                             f"{r.block_size} (a convolution sees only its own block)")
        _check_int(r, "conv_group_size", lo=1)
        if r.hidden_size % r.conv_group_size:
            raise ValueError(f"conv_group_size={r.conv_group_size} must divide the hidden size "
                             f"{r.hidden_size}")
        _check_int(r, "selector_rank", lo=1)
        _check_int(r, "selector_top_k", lo=1)
        if r.selector_top_k > r.vocab_size:
            raise ValueError(f"selector_top_k={r.selector_top_k} must be <= the vocabulary "
                             f"{r.vocab_size}")
    if not _is_number(r.selector_loss_weight) or r.selector_loss_weight < 0:
        raise ValueError(f"selector_loss_weight={r.selector_loss_weight!r} must be a number >= 0")
    for name in ("output_multiplier", "input_embedding_scale"):
        if not _is_number(getattr(r, name)) or getattr(r, name) <= 0:
            raise ValueError(f"{name}={getattr(r, name)!r} must be a number > 0")
    cap = r.final_logit_softcapping
    if cap is not None and (not _is_number(cap) or cap <= 0):
        raise ValueError(f"final_logit_softcapping={cap!r} must be a number > 0 (omit it for "
                         "no softcapping)")


def _check_layers(r: DFlashConfig) -> None:
    """Fill and check the per-layer attention (in place)."""
    n = r.num_draft_layers
    if r.layer_types is None:
        r.layer_types = [SLIDING if r.sliding_window is not None else FULL_ATTENTION] * n
    if (not isinstance(r.layer_types, (list, tuple)) or len(r.layer_types) != n
            or any(t not in LAYER_TYPES for t in r.layer_types)):
        raise ValueError(f"layer_types={r.layer_types!r} must list {n} layer types (one per draft "
                         f"layer), each one of {LAYER_TYPES}")
    r.layer_types = list(r.layer_types)
    if SLIDING in r.layer_types:
        if r.sliding_window is None:
            raise ValueError(f"layer_types={r.layer_types} has sliding layers: they need a "
                             "sliding_window")
        _check_int(r, "sliding_window", lo=r.block_size)
    elif r.sliding_window is not None:
        raise ValueError(f"sliding_window={r.sliding_window!r} is set but layer_types="
                         f"{r.layer_types} has no {SLIDING!r} layer to use it")
    if r.is_causal is not None and not isinstance(r.is_causal, bool):
        raise ValueError(f"is_causal={r.is_causal!r} must be true, false or unset")


def _default(value, fallback):
    return fallback if value is None else value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(cfg, name, lo, hi=None):
    v = getattr(cfg, name)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v!r} must be an integer {rng}")


def check_layer_ids(ids, num_layers):
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"target_layer_ids={ids!r} must be a non-empty list of layer indices")
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers:
            raise ValueError(f"target_layer_ids={list(ids)}: {i!r} is outside the target's layers "
                             f"[0, {num_layers - 1}]")
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise ValueError(f"target_layer_ids={list(ids)} must be strictly increasing "
                         "(sorted, no repeats): features are concatenated in this order")
