"""Qwen3-MoE targets (transformers `Qwen3MoeForCausalLM`): Qwen3's attention (per-head q/k
RMSNorm) with megatron's MoE layer.

Layer i is MoE iff `i not in mlp_only_layers`, `num_experts > 0` and
`(i + 1) % decoder_sparse_step == 0`, else a dense SwiGLU MLP of `intermediate_size`. The router
is `MoEFamily`'s default: softmax over all experts, top `num_experts_per_tok`, renormalised iff
`norm_topk_prob`. No shared expert. Experts are stored one tensor per expert or fused
(transformers 5); both load (`moe.fused_expert_views`).
"""
from megatron_dflash.targets.moe import MoEFamily


class Qwen3Moe(MoEFamily):
    architectures = ("Qwen3MoeForCausalLM",)

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | dict(qk_layernorm=True)

    def moe_layer_pattern(self, hf):
        experts = getattr(hf, "num_experts", 0) or 0
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        return [int(i not in dense and experts > 0 and (i + 1) % step == 0)
                for i in range(hf.num_hidden_layers)]


FAMILY = Qwen3Moe()
