"""DeepSeek-V3 targets (transformers `DeepseekV3ForCausalLM`) on megatron-core's own
multi-latent attention (`MLASelfAttention`, `MLATransformerConfig`) and MoE layer.

Attention (MLA): q = q_b(RMSNorm(q_a(x))) per head `[nope; rope]`, the latent
`kv_a_proj_with_mqa(x) = [c_kv; k_rope]` with k/v = kv_b(RMSNorm(c_kv)) per head `[k_nope; v]`,
which is megatron's linear_q_down / q_layernorm / linear_q_up / linear_kv_down / kv_layernorm /
linear_kv_up with qk_head_dim = qk_nope_head_dim, qk_pos_emb_head_dim = qk_rope_head_dim. The HF
rotary dims are interleaved pairs (`rope_interleave`), as megatron's MLA applies them. YaRN
(`rope_type: yarn`) maps field by field; HF's attention factor is mscale / mscale_all_dim only
when both are set (else the plain YaRN factor, mscale unused), which megatron computes from
(mscale, mscale_all_dim) = (1, 0). megatron's static KV cache holds one key per query head, so
`num_query_groups = num_attention_heads`; `kv_channels = v_head_dim` (the per-head attention output
width, also what a dense draft's head_dim defaults to).

MoE: layer i is MoE iff i >= first_k_dense_replace (else a dense SwiGLU of `intermediate_size`).
The router as transformers runs it: sigmoid scores; the top `num_experts_per_tok` chosen on score +
`e_score_correction_bias` (megatron's router `expert_bias`, frozen), within the `topk_group` best
of `n_group` groups when that leaves groups out (`group_limit`); the chosen sigmoid scores
renormalised (`norm_topk_prob`) and scaled by `routed_scaling_factor`; plus `n_shared_experts`
shared experts, one SwiGLU of n_shared_experts * moe_intermediate_size.

The checkpoint's multi-token-prediction layers (`num_nextn_predict_layers`, tensors under
`model.layers.{num_hidden_layers + i}`) are not part of the target and are never read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from transformers import DeepseekV3Config, PretrainedConfig

from megatron_dflash.layers import LocalRMSNorm
from megatron_dflash.targets.hf_checkpoint import CONFIG_FILE
from megatron_dflash.targets.moe import MoEFamily

SCOPE = "by the DeepSeek-V3 import (megatron's multi-latent attention and MoE router)"


class DeepseekV3(MoEFamily):
    architectures = ("DeepseekV3ForCausalLM",)
    config_class = MLATransformerConfig
    # Transformer Engine's MLA spec keeps the input norm a separate TENorm and fuses the q / kv
    # latent norms into the up projections (and a dense layer's pre-MLP norm into fc1).
    te_fused_norms = {
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
        "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
    }

    def read_config(self, path):
        """Kimi-K2 ships DeepSeek-V3's architecture under its own `model_type` (kimi_k2, with
        remote code), which transformers reads as DeepSeek-V3's config (as its Kimi-K2.5 does)."""
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
        if config.get("model_type") == "kimi_k2":
            return DeepseekV3Config.from_dict(config | {"model_type": "deepseek_v3"},
                                              name_or_path=str(path))
        return super().read_config(path)

    def refusals(self, hf):
        return [*super().refusals(hf), (problems(hf), SCOPE)]

    def router_problems(self, hf):
        return []  # the sigmoid router's: `problems`

    def rope_problems(self, hf):
        return []  # MLA's own rotary embedding: `problems`

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | attention_fields(hf)

    def gpt_model_kwargs(self, hf, where=CONFIG_FILE):
        return {"position_embedding_type": "rope"}  # MLA layers hold their own (config fields)

    def skip_notice(self, hf):
        return mtp_notice(hf)

    def block_spec(self, config, *, backend, pp_rank, tp_size):
        if backend == "local":
            check_tensor_parallel(config, tp_size)
        return super().block_spec(config, backend=backend, pp_rank=pp_rank, tp_size=tp_size)

    def local_attention_modules(self, config):
        """megatron's DotProductAttention: MLA's values are narrower than its queries and keys."""
        qk_norm = LocalRMSNorm if config.qk_layernorm else IdentityOp
        return dict(core_attention=MLADotProductAttention, q_layernorm=qk_norm,
                    kv_layernorm=qk_norm)

    def attention_rows(self, config, fused_norms):
        """The local layer spec splits the down projections over TP (column parallel);
        Transformer Engine's replicates them."""
        down = "replicated" if fused_norms else "columns"
        return self.fuse_norms([
            ("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
            ("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), down),
            ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",),
             "replicated"),
            ("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), "columns"),
            ("self_attention.linear_kv_down_proj.weight",
             ("self_attn.kv_a_proj_with_mqa.weight",), down),
            ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",),
             "replicated"),
            ("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",),
             "columns"),
            ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "rows"),
        ], fused_norms)

    def hf_shape(self, name, config, vocab_size):
        if ".self_attn." not in name:
            return super().hf_shape(name, config, vocab_size)
        c, hidden, heads = config, config.hidden_size, config.num_attention_heads
        q_head = c.qk_head_dim + c.qk_pos_emb_head_dim
        return {
            "q_a_proj.weight": (c.q_lora_rank, hidden), "q_a_layernorm.weight": (c.q_lora_rank,),
            "q_b_proj.weight": (heads * q_head, c.q_lora_rank),
            "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_pos_emb_head_dim, hidden),
            "kv_a_layernorm.weight": (c.kv_lora_rank,),
            "kv_b_proj.weight": (heads * (c.qk_head_dim + c.v_head_dim), c.kv_lora_rank),
            "o_proj.weight": (hidden, heads * c.v_head_dim),
        }[".".join(name.split(".")[-2:])]

    def moe_layer_pattern(self, hf):
        return moe_layer_pattern(hf)

    def router_fields(self, hf):
        return router_fields(hf)


def moe_layer_pattern(hf: PretrainedConfig) -> list[int]:
    """Layer i is MoE iff i >= first_k_dense_replace (DeepSeek-V3, GLM-4.5)."""
    experts, dense = hf.n_routed_experts or 0, hf.first_k_dense_replace or 0
    return [int(experts > 0 and i >= dense) for i in range(hf.num_hidden_layers)]


def router_fields(hf: PretrainedConfig) -> dict:
    """The sigmoid router with the score-correction bias, groups, scaling and shared experts
    (DeepSeek-V3, GLM-4.5)."""
    groups, topk_group = group_limit(hf) or (None, None)
    return dict(
        moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,  # the correction bias is checkpoint data, frozen
        moe_router_num_groups=groups,
        moe_router_group_topk=topk_group,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        moe_shared_expert_intermediate_size=(hf.n_shared_experts * hf.moe_intermediate_size
                                             if hf.n_shared_experts else None),
    )


def router_problems(hf: PretrainedConfig) -> list[str]:
    """What `router_fields` cannot reproduce, each naming its config field."""
    top_k, experts = hf.num_experts_per_tok, hf.n_routed_experts
    found = []
    if (top_k > 1) != bool(hf.norm_topk_prob):
        # megatron renormalises the chosen sigmoid scores iff top-k > 1.
        found.append(f"norm_topk_prob={hf.norm_topk_prob} with num_experts_per_tok={top_k}")
    return found + _group_problems(hf.n_group or 1, hf.topk_group or 1, top_k, experts)


def mtp_notice(hf: PretrainedConfig) -> str | None:
    """The skip notice of the checkpoint's multi-token-prediction layers, if it has any."""
    ids = mtp_layer_ids(hf)
    if not ids:
        return None
    return (f"skipping {len(ids)} multi-token-prediction layer(s) (num_nextn_predict_layers="
            f"{len(ids)}, model.layers.{ids[0]}{f'..{ids[-1]}' if len(ids) > 1 else ''}): "
            "not part of the target")


def group_limit(hf: PretrainedConfig) -> tuple[int, int] | None:
    """(n_group, topk_group) when routing keeps only some groups (topk_group < n_group, one
    group included), else None: keeping every group is no restriction."""
    groups, topk_group = hf.n_group or 1, hf.topk_group or 1
    return (groups, topk_group) if topk_group < groups else None


def problems(hf: PretrainedConfig) -> list[str]:
    """The features of a DeepSeek-V3 config that megatron's MLA / MoE cannot reproduce exactly
    (empty when it can), each naming its config field."""
    found = []
    if hf.q_lora_rank is None:
        # megatron's MLA with q/kv norms then fuses a norm into linear_q_proj; HF has none there.
        found.append("q_lora_rank=None")
    if not getattr(hf, "rope_interleave", True):  # GLM-5's config has none: interleaved
        found.append("rope_interleave=False")
    found += _rope_problems(hf)
    for field, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                         ("moe_layer_freq", 1)):
        # Keys of DeepSeek's own config.json that transformers ignores, running V3's choice.
        if getattr(hf, field, value) != value:
            found.append(f"{field}={getattr(hf, field)!r}")
    return found + router_problems(hf)


def _group_problems(groups: int, topk_group: int, top_k: int, experts: int) -> list[str]:
    """transformers scores a group by the sum of its top 2 (corrected) scores, megatron by its
    top top_k // topk_group; both then take the top_k of the kept groups' experts."""
    if experts % groups:
        return [f"n_group={groups} (n_routed_experts={experts})"]
    if experts // groups < 2:
        return [f"n_group={groups} (n_routed_experts={experts}: transformers scores a group by "
                "its top 2 experts)"]
    if topk_group > groups:
        return [f"topk_group={topk_group} (n_group={groups})"]
    if topk_group == groups:
        return []
    if top_k // topk_group != 2:
        return [f"num_experts_per_tok={top_k} with topk_group={topk_group} (group scores need "
                "num_experts_per_tok // topk_group = 2: transformers scores a group by its top "
                "2 experts, megatron by its top num_experts_per_tok // topk_group)"]
    if top_k > topk_group * (experts // groups):
        return [f"num_experts_per_tok={top_k} with topk_group={topk_group} (more than the "
                f"{topk_group * (experts // groups)} experts of the kept groups)"]
    return []


def attention_fields(hf: PretrainedConfig) -> dict:
    """The MLATransformerConfig fields of the target's attention and rotary embedding."""
    rope = dict(hf.rope_parameters or {})
    fields = dict(
        multi_latent_attention=True,
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        kv_channels=hf.v_head_dim,
        num_query_groups=hf.num_attention_heads,
        qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        rotary_base=rope["rope_theta"],
    )
    if rope.get("rope_type", "default") == "default":
        return fields | dict(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0,
                             mscale_all_dim=0.0)
    mscale, mscale_all_dim = _yarn_mscales(rope)
    return fields | dict(
        rope_type="yarn",
        rotary_scaling_factor=_yarn_factor(hf, rope),
        original_max_position_embeddings=rope["original_max_position_embeddings"],
        beta_fast=rope.get("beta_fast") or 32.0,
        beta_slow=rope.get("beta_slow") or 1.0,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


def mtp_layer_ids(hf: PretrainedConfig) -> range:
    """HF layer ids of the checkpoint's multi-token-prediction layers (skipped)."""
    n = hf.num_hidden_layers
    return range(n, n + (getattr(hf, "num_nextn_predict_layers", 0) or 0))


def check_tensor_parallel(config: TransformerConfig, size: int) -> None:
    """The local layer spec splits the q / kv down projections over TP: their widths must divide."""
    for field, width in (("q_lora_rank", config.q_lora_rank),
                         ("kv_lora_rank + qk_rope_head_dim",
                          config.kv_lora_rank + config.qk_pos_emb_head_dim)):
        if width % size:
            raise ValueError(f"{field}={width} is not divisible by the tensor-parallel size "
                             f"{size}: the local backend splits MLA's down projections over TP "
                             "(backend='te' replicates them)")


class MLADotProductAttention(DotProductAttention):
    """megatron's local DotProductAttention as MLA's core attention. MLA passes its query/key and
    value head widths (`k_channels`, `v_channels`), which DotProductAttention does not take: it
    reads the query/key width off the tensors and sizes its output by `kv_channels`, which the
    import sets to `v_head_dim` (SDPACoreAttention has one head width for q, k and v)."""

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels not in (None, self.hidden_size_per_attention_head):
            raise ValueError(f"v_channels={v_channels} must equal kv_channels="
                             f"{self.hidden_size_per_attention_head} (v_head_dim)")


def _rope_problems(hf: PretrainedConfig) -> list[str]:
    rope = dict(hf.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return []
    if kind != "yarn":
        return [f"rope_parameters.rope_type={kind!r} (supported: default, yarn)"]
    found = []
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        found.append(f"rope_parameters.partial_rotary_factor={rope['partial_rotary_factor']}")
    if rope.get("truncate", True) is False:
        found.append("rope_parameters.truncate=False")  # megatron rounds the ramp to integers
    if rope.get("mscale_all_dim") and not rope.get("mscale"):
        # HF: attention factor of YaRN alone, softmax scaled by mscale_all_dim; no megatron pair.
        found.append(f"rope_parameters.mscale={rope.get('mscale')!r} with mscale_all_dim="
                     f"{rope['mscale_all_dim']}")
    given = rope.get("attention_factor")
    derived = _yarn_get_concentration_factor(_yarn_factor(hf, rope), *_yarn_mscales(rope))
    if given is not None and not math.isclose(given, derived, rel_tol=1e-9):
        found.append(f"rope_parameters.attention_factor={given} (megatron derives {derived} "
                     "from factor, mscale and mscale_all_dim)")
    return found


def _yarn_factor(hf: PretrainedConfig, rope: dict) -> float:
    # transformers: no factor = max_position_embeddings / original_max_position_embeddings.
    factor = rope.get("factor")
    return float(factor if factor is not None
                 else hf.max_position_embeddings / rope["original_max_position_embeddings"])


def _yarn_mscales(rope: dict) -> tuple[float, float]:
    """megatron's (mscale, mscale_all_dim): HF's pair when both are set, else (1, 0), which gives
    HF's plain YaRN attention factor and an unscaled softmax."""
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return float(rope["mscale"]), float(rope["mscale_all_dim"])
    return 1.0, 0.0


FAMILY = DeepseekV3()
