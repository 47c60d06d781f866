"""Qwen3-Next targets (transformers `Qwen3NextForCausalLM`, also Qwen3-Coder-Next): the hybrid
layers of `qwen_hybrid`, the GDN projections grouped by key head (`in_proj_qkvz`,
`in_proj_ba`), and Qwen3-MoE's layer pattern: layer i is MoE iff `i not in mlp_only_layers`,
`num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`, else a dense SwiGLU MLP of
`intermediate_size`. The router renormalises the top-k iff `norm_topk_prob`.
"""
from megatron_dflash.targets.qwen_hybrid import QwenHybrid


class Qwen3Next(QwenHybrid):
    architectures = ("Qwen3NextForCausalLM",)
    gdn_layout = "grouped"

    def moe_layer_pattern(self, hf):
        dense = set(hf.mlp_only_layers or [])
        step = hf.decoder_sparse_step or 1
        return [int(i not in dense and hf.num_experts > 0 and (i + 1) % step == 0)
                for i in range(hf.num_hidden_layers)]


FAMILY = Qwen3Next()
