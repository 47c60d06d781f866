"""Qwen3.5 / Qwen3.6 text models (transformers `Qwen3_5ForCausalLM`, `Qwen3_5MoeForCausalLM`):
the hybrid layers of `qwen_hybrid` with separate GDN projections (`in_proj_qkv`, `in_proj_z`,
`in_proj_b`, `in_proj_a`). Dense: a SwiGLU MLP in every layer. MoE: every layer, and the router
always renormalises its top-k (the config has no `norm_topk_prob`). The checkpoints Qwen
publishes are the VLMs around these (`qwen3_5_vl`).
"""
from megatron_dflash.targets.qwen_hybrid import QwenHybrid


class Qwen35(QwenHybrid):
    architectures = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")

    def moe_layer_pattern(self, hf):
        return [int((getattr(hf, "num_experts", 0) or 0) > 0)] * hf.num_hidden_layers

    def renormalizes(self, hf):
        return True


FAMILY = Qwen35()
