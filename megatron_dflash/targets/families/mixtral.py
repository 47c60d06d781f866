"""Mixtral targets (transformers `MixtralForCausalLM`): Mistral's attention (sliding window when
the config sets one) with megatron's MoE layer in every layer.

The router is softmax over all experts, top `num_experts_per_tok`, always renormalised — the
softmax of the top-k logits (`moe_router_pre_softmax=False`); no shared expert. Experts are
`intermediate_size` wide and stored as `block_sparse_moe.experts.{e}.w1` (gate), `.w3` (up) and
`.w2` (down), the router as `block_sparse_moe.gate`; transformers 5 holds them fused in memory
(`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`, `mlp.gate`), read through views.
"""
from megatron_dflash.targets.moe import EveryLayerMoEFamily
from megatron_dflash.targets.sliding_window import window_fields, window_problems

SCOPE = "by the Mixtral import (megatron's sliding-window attention and MoE layer)"
MOE = "block_sparse_moe."


class Mixtral(EveryLayerMoEFamily):
    architectures = ("MixtralForCausalLM",)

    def refusals(self, hf):
        return [*super().refusals(hf), (window_problems(hf), SCOPE)]

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | window_fields(hf)

    def moe_rows(self, config, experts):
        names = {"mlp.gate.weight": MOE + "gate.weight"}
        for e in experts:
            names |= {f"mlp.experts.{e}.{hf}_proj.weight": f"{MOE}experts.{e}.{w}.weight"
                      for hf, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
        return [(name, tuple(names.get(n, n) for n in hf_names), kind)
                for name, hf_names, kind in super().moe_rows(config, experts)]

    def hf_shape(self, name, config, vocab_size):
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        if name.endswith(MOE + "gate.weight"):
            return (config.num_moe_experts, hidden)
        if MOE + "experts." in name:
            return (hidden, ffn) if name.endswith("w2.weight") else (ffn, hidden)
        return super().hf_shape(name, config, vocab_size)

    def tensor_views(self, shapes):
        """The on-disk names of transformers 5's fused in-memory tensors."""
        views = {}
        for key, shape in shapes.items():
            prefix, _, kind = key.rpartition(".mlp.")
            if kind == "gate.weight":
                views[f"{prefix}.{MOE}gate.weight"] = (key, ())
            elif kind in ("experts.gate_up_proj", "experts.down_proj"):
                for e in range(shape[0]):
                    expert = f"{prefix}.{MOE}experts.{e}."
                    if kind == "experts.down_proj":
                        views[expert + "w2.weight"] = (key, (e,))
                    else:
                        half = shape[1] // 2
                        views[expert + "w1.weight"] = (key, (e, slice(0, half)))
                        views[expert + "w3.weight"] = (key, (e, slice(half, shape[1])))
        return views


FAMILY = Mixtral()
