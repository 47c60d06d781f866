"""Qwen2-MoE targets (transformers `Qwen2MoeForCausalLM`): Qwen2's attention (q/k/v biases,
`qkv_bias`) with megatron's MoE layer.

Layers are MoE as Qwen3-MoE's (`mlp_only_layers`, `decoder_sparse_step`); the router is softmax
over all experts, top `num_experts_per_tok`, renormalised iff `norm_topk_prob` (`MoEFamily`).
Every MoE layer adds one shared expert (`mlp.shared_expert.*`, of `shared_expert_intermediate_size`)
scaled by σ(x · `mlp.shared_expert_gate.weight`): megatron's `moe_shared_expert_gate`, whose
`shared_experts.gate_weight` [1, H] is that row.
"""
from megatron_dflash.targets.families.qwen3_moe import Qwen3Moe

HF_SHARED, MEGATRON_SHARED = "mlp.shared_expert.", "mlp.shared_experts."


class Qwen2Moe(Qwen3Moe):
    architectures = ("Qwen2MoeForCausalLM",)

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | dict(add_qkv_bias=bool(hf.qkv_bias),
                                                      qk_layernorm=False)

    def routed_experts(self, hf):
        return hf.num_experts

    def router_fields(self, hf):
        return super().router_fields(hf) | dict(
            moe_shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
            moe_shared_expert_gate=True)

    def moe_rows(self, config, experts):
        rows = [(name, tuple(n.replace(MEGATRON_SHARED, HF_SHARED) for n in names), kind)
                for name, names, kind in super().moe_rows(config, experts)]
        return rows + [(MEGATRON_SHARED + "gate_weight", ("mlp.shared_expert_gate.weight",),
                        "replicated")]

    def hf_shape(self, name, config, vocab_size):
        if name.endswith("mlp.shared_expert_gate.weight"):
            return (1, config.hidden_size)
        return super().hf_shape(name.replace(HF_SHARED, MEGATRON_SHARED), config, vocab_size)


FAMILY = Qwen2Moe()
