"""Mistral and Ministral targets (transformers `MistralForCausalLM`, `MinistralForCausalLM`):
Llama's shape with an explicit `head_dim` and sliding-window attention — on every layer when the
config sets `sliding_window` (Mistral), or on the layers `layer_types` marks (Ministral) — through
megatron's `window_size` / `window_attn_skip_freq` (`sliding_window`).
"""
from megatron_dflash.targets.family import TargetFamily
from megatron_dflash.targets.sliding_window import window_fields, window_problems

SCOPE = "by the Mistral import (megatron's sliding-window attention)"


class Mistral(TargetFamily):
    architectures = ("MistralForCausalLM", "MinistralForCausalLM")
    supported_features = ("layer_types",)

    def refusals(self, hf):
        return [*super().refusals(hf), (window_problems(hf), SCOPE)]

    def transformer_fields(self, hf):
        return super().transformer_fields(hf) | window_fields(hf)


FAMILY = Mistral()
