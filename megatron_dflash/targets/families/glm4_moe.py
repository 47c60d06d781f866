"""GLM-4.5 / 4.6 / 4.7 targets (transformers `Glm4MoeForCausalLM`): GQA attention with DeepSeek-V3's
MoE, on megatron's own layers.

Attention: q/k/v biases and no o_proj bias (`attention_bias` -> megatron's `add_qkv_bias`), an
optional per-head q/k RMSNorm (`use_qk_norm` -> `qk_layernorm`), and RoPE on the first
`partial_rotary_factor` of each head's dims, rotate-half style (megatron's `rotary_percent`).
MoE: DeepSeek-V3's (`deepseek_v3.router_fields`): the first `first_k_dense_replace` layers dense,
then a fp32 sigmoid router with the score-correction bias, groups, renormalised top-k scaled by
`routed_scaling_factor`, and `n_shared_experts` shared experts. The checkpoint's
multi-token-prediction layers (`num_nextn_predict_layers`, `model.layers.{num_hidden_layers}`)
are not part of the target and never read.
"""
from megatron_dflash.targets.families import deepseek_v3
from megatron_dflash.targets.moe import MoEFamily

SCOPE = "by the GLM-4.5 import (DeepSeek-V3's sigmoid router in megatron's MoE layer)"


class Glm4Moe(MoEFamily):
    architectures = ("Glm4MoeForCausalLM",)
    supported_features = ("attention_bias",)

    def refusals(self, hf):
        problems = deepseek_v3.router_problems(hf) if any(self.moe_layer_pattern(hf)) else []
        return [*super().refusals(hf), (problems, SCOPE)]

    def router_problems(self, hf):
        return []  # the sigmoid router's: `deepseek_v3.router_problems`

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | dict(add_qkv_bias=bool(hf.attention_bias),
                                                      qk_layernorm=bool(hf.use_qk_norm))

    def rotary_percent(self, hf):
        return float((hf.rope_parameters or {}).get("partial_rotary_factor", 1.0))

    def routed_experts(self, hf):
        return hf.n_routed_experts

    def moe_layer_pattern(self, hf):
        return deepseek_v3.moe_layer_pattern(hf)

    def router_fields(self, hf):
        return deepseek_v3.router_fields(hf)

    def skip_notice(self, hf):
        return deepseek_v3.mtp_notice(hf)


FAMILY = Glm4Moe()
