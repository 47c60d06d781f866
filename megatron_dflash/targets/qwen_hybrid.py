"""What Qwen3-Next and Qwen3.5/3.6 (dense and MoE) share, on megatron-core's own modules.

* Layers are `linear_attention` — megatron's `GatedDeltaNet` (`targets.gated_delta_net`) — or
  `full_attention`, as HF's `layer_types` lists them (megatron's `linear_attention_freq` as a
  0/1 list); a pipeline stage may hold both kinds.
* Full attention is gated: HF's `q_proj` gives per head [query; gate], and the output is
  multiplied by σ(gate) before `o_proj` — megatron's `attention_output_gate`, whose `linear_qkv`
  holds per query group [query heads | gate heads | key | value]. Per-head q/k norms; RoPE on
  the first `partial_rotary_factor` of each head (megatron's `rotary_percent`). Qwen3.5's
  multimodal RoPE sections coincide with plain RoPE for text (all three position streams equal),
  so they are dropped.
* Every RMSNorm scales by 1 + w (`layernorm_zero_centered_gamma`, `LocalRMSNorm`) except the
  GDN's gated output norm (plain w).
* MoE layers (Qwen3-Next where `mlp_only_layers` / `decoder_sparse_step` say, Qwen3.5-MoE in
  every layer): `MoEFamily`'s softmax router and megatron's shared expert with its sigmoid gate
  (`moe_shared_expert_gate`; HF `mlp.shared_expert` and `mlp.shared_expert_gate`).
* The checkpoint's multi-token-prediction layers (`mtp.*`) are not part of the target: never read.

Only the local backend builds these layers: megatron's GDN spec for Transformer Engine fuses the
input norm into `in_proj` and makes the GDN output norm zero-centred too, and is not mapped here.
"""
from __future__ import annotations

from dataclasses import replace

from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_dflash.targets import gated_delta_net
from megatron_dflash.targets.family import Row, common_problems
from megatron_dflash.targets.moe import MoEFamily
from megatron_dflash.weights import check_qkv_groups, merge_qkv, shard_columns

LAYER_TYPES = ("linear_attention", "full_attention")
SCOPE = ("(the import covers silu MLPs, no attention/MLP biases, gated-delta-net and full "
         "attention layers and unquantized weights: dequantize the checkpoint first)")
MROPE = ("mrope_section", "mrope_interleaved")  # plain RoPE for text positions


class QwenHybrid(MoEFamily):
    """The shared adapter; a family module names its architectures and GDN weight layout."""

    gdn_layout = "split"  # a key of gated_delta_net.IN_PROJ

    def linear_layers(self, hf) -> list[int]:
        """Per layer, 1 for a gated-delta-net layer, 0 for full attention."""
        return [int(t == "linear_attention") for t in hf.layer_types]

    # --- config.json -> megatron ---------------------------------------------------------------

    def refusals(self, hf):
        """The base groups, the common one (first) with linear-attention layers allowed."""
        groups = super().refusals(hf)
        groups[0] = (common_problems(hf, LAYER_TYPES), SCOPE)
        return groups

    def ffn_hidden_size(self, hf):
        """The dense MLP's width; Qwen3.5-MoE has none, so the width a token's MLP has there:
        its top-k experts and the shared expert."""
        dense = getattr(hf, "intermediate_size", None)
        if dense:
            return dense
        return (hf.num_experts_per_tok * hf.moe_intermediate_size
                + (hf.shared_expert_intermediate_size or 0))

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | dict(
            qk_layernorm=True,
            attention_output_gate=True,
            layernorm_zero_centered_gamma=True,
            experimental_attention_variant="gated_delta_net",
            linear_attention_freq=self.linear_layers(hf),
            linear_conv_kernel_dim=hf.linear_conv_kernel_dim,
            linear_key_head_dim=hf.linear_key_head_dim,
            linear_value_head_dim=hf.linear_value_head_dim,
            linear_num_key_heads=hf.linear_num_key_heads,
            linear_num_value_heads=hf.linear_num_value_heads,
        )

    def moe_fields(self, hf, *, tensor_parallel_size, **layout):
        """Where the layout meets the config: first, TP must divide the GDN heads."""
        gated_delta_net.check_tensor_parallel(hf, tensor_parallel_size)
        return super().moe_fields(hf, tensor_parallel_size=tensor_parallel_size, **layout)

    def rotary_percent(self, hf):
        return (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0)

    def rope_scaling(self, hf):
        return {k: v for k, v in super().rope_scaling(hf).items() if k not in MROPE}

    def routed_experts(self, hf):
        return hf.num_experts

    def renormalizes(self, hf) -> bool:
        """Whether the router renormalises its top-k probabilities."""
        return hf.norm_topk_prob

    def router_fields(self, hf):
        shared = hf.shared_expert_intermediate_size or None
        return dict(moe_router_score_function="softmax",
                    moe_router_pre_softmax=not self.renormalizes(hf),
                    moe_router_topk_scaling_factor=None,
                    moe_shared_expert_intermediate_size=shared,
                    moe_shared_expert_gate=shared is not None)

    def router_problems(self, hf):
        if hf.num_experts_per_tok == 1 and self.renormalizes(hf):
            # Every token's one weight is 1; megatron refuses softmax-after-top-1.
            return ["num_experts_per_tok=1 with a renormalising router"]
        return []

    def skip_notice(self, hf):
        mtp = getattr(hf, "mtp_num_hidden_layers", 0) or 0
        if not mtp:
            return None
        return f"skipping {mtp} multi-token-prediction layer(s) (mtp.*): not part of the target"

    def final_norm_weight(self, path):
        """1 + w: the draft's final norm is a plain RMSNorm."""
        return super().final_norm_weight(path).float() + 1.0

    # --- the megatron model --------------------------------------------------------------------

    def block_spec(self, config, *, backend, pp_rank, tp_size):
        """megatron's local layer specs (attention or MoE per layer), the linear-attention
        layers' mixer replaced by the GDN spec."""
        if backend != "local":
            raise ValueError(f"backend={backend!r}: gated-delta-net targets build on the local "
                             "backend only (megatron's GDN spec for Transformer Engine is not "
                             "mapped)")
        block = super().block_spec(replace(config, experimental_attention_variant=None,
                                           linear_attention_freq=None),
                                   backend=backend, pp_rank=pp_rank, tp_size=tp_size)
        offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
        gdn = gated_delta_net.local_spec()

        def layer(i, spec):
            if not config.linear_attention_freq[offset + i]:
                return spec
            return replace(spec, submodules=replace(spec.submodules, self_attention=gdn))

        return replace(block, layer_specs=[layer(i, s) for i, s in enumerate(block.layer_specs)])

    # --- weights -------------------------------------------------------------------------------

    def layer_rows(self, config, layer_id, *, fused_norms, expert_parallel) -> list[Row]:
        mixer = (gated_delta_net.rows(self.gdn_layout) if config.linear_attention_freq[layer_id]
                 else self.attention_rows(config, fused_norms))
        return [*mixer, *self.mlp_rows(config, layer_id, fused_norms=fused_norms,
                                       expert_parallel=expert_parallel)]

    def attention_rows(self, config, fused_norms):
        return [(name, hf, "gated_qkv" if kind == "qkv" else kind)
                for name, hf, kind in super().attention_rows(config, fused_norms)]

    def moe_rows(self, config, experts):
        """HF names the shared expert `mlp.shared_expert` (singular) and gates it."""
        rows = [(name, tuple(n.replace("mlp.shared_experts.", "mlp.shared_expert.") for n in hf),
                 kind) for name, hf, kind in super().moe_rows(config, experts)]
        if config.moe_shared_expert_gate:
            rows.append(("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",),
                         "replicated"))
        return rows

    def hf_shape(self, name, config, vocab_size):
        last = ".".join(name.split(".")[-2:])
        if ".linear_attn." in name:
            return gated_delta_net.hf_shapes(config)[last]
        if last == "q_proj.weight":  # [query; gate] per head
            return (2 * config.num_attention_heads * config.kv_channels, config.hidden_size)
        if last == "shared_expert_gate.weight":
            return (1, config.hidden_size)
        if ".mlp.shared_expert." in name:
            ffn = config.moe_shared_expert_intermediate_size
            return ((config.hidden_size, ffn) if last == "down_proj.weight"
                    else (ffn, config.hidden_size))
        return super().hf_shape(name, config, vocab_size)

    def converters(self, config, tp, expert_tp):
        rank, size = tp
        return (super().converters(config, tp, expert_tp)
                | gated_delta_net.converters(config, rank, size)
                | {"gated_qkv": lambda checkpoint, q, k, v: read_gated_qkv(
                    checkpoint, (q, k, v), config.num_query_groups, rank, size)})


def read_gated_qkv(checkpoint, qkv: tuple[str, str, str], num_query_groups: int, rank: int,
                   size: int):
    """Rank `rank`'s slice of the gated fused QKV from only the rows it needs, as
    `family.read_qkv` (whole groups, or one group's rows cut into the rank's piece)."""
    check_qkv_groups(num_query_groups, size)
    if num_query_groups % size == 0:
        groups, reads = num_query_groups // size, (rank, size)
    else:
        groups, reads = 1, (rank // (size // num_query_groups), num_query_groups)
    q, k, v = (checkpoint.get_shard(key, 0, *reads) for key in qkv)
    fused = merge_qkv(query_then_gate(q, k.shape[0] // groups, groups), k, v, groups)
    if num_query_groups % size == 0:
        return fused
    ranks_per_group = size // num_query_groups
    return shard_columns(fused, rank % ranks_per_group, ranks_per_group)


def query_then_gate(q_proj, head_dim: int, groups: int):
    """HF `q_proj` rows, per head [query; gate], as megatron's per group [queries | gates]."""
    rest = q_proj.shape[1:]
    return q_proj.reshape(groups, -1, 2, head_dim, *rest).transpose(1, 2).reshape(-1, *rest)
