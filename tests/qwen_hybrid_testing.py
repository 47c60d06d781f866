"""Tiny random Qwen3-Next / Qwen3.5 / Qwen3.5-MoE (gated-delta-net hybrid) checkpoints, shared by
the import, decoding, layout and training tests of these targets."""
from __future__ import annotations

import torch

from megatron_dflash.synthetic import VOCAB

HIDDEN = 32
# Heads: full attention 4 query / 2 key-value (head_dim 16, a quarter rotated); GDN 2 key heads
# of 8 and 4 value heads of 8 (two value heads per key head). Weights ~N(0, 0.05): the GDN's
# l2-normalised short keys make the output sensitive to its input (at 0.1, a 1e-6 nudge of the
# embeddings moves the logits by 1e-3), so two fp32 implementations would part by rounding alone.
SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=128,
             rms_norm_eps=1e-6, initializer_range=0.05)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24)
# Three linear layers then one full, as the published models (3:1).
LINEAR_THEN_FULL = ["linear_attention"] * 3 + ["full_attention"]
KINDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_vl")


def hybrid_config(kind: str, layer_types=LINEAR_THEN_FULL, **kw):
    """A small HF config of `kind` (KINDS): Qwen3-Next with MoE in every layer but
    `mlp_only_layers` (dense FFN 48), Qwen3.5 dense (FFN 48), Qwen3.5-MoE as its text model or
    inside the VLM wrapper (a one-block vision encoder, which the import never reads)."""
    from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig,
                              Qwen3NextConfig)

    text = SHAPE | dict(num_hidden_layers=len(layer_types), layer_types=list(layer_types))
    if kind == "qwen3_next":
        return Qwen3NextConfig(architectures=["Qwen3NextForCausalLM"], intermediate_size=48,
                               **text | MOE | dict(mlp_only_layers=[1]) | kw)
    if kind == "qwen3_5":
        return Qwen3_5TextConfig(architectures=["Qwen3_5ForCausalLM"], intermediate_size=48,
                                 **text | kw)
    if kind == "qwen3_5_moe":
        return Qwen3_5MoeTextConfig(architectures=["Qwen3_5MoeForCausalLM"], **text | MOE | kw)
    tie = kw.pop("tie_word_embeddings", False)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=HIDDEN, patch_size=4, num_position_embeddings=16)
    return Qwen3_5MoeConfig(architectures=["Qwen3_5MoeForConditionalGeneration"],
                   text_config=text | MOE | kw, vision_config=vision, tie_word_embeddings=tie)


def hybrid_model(config, seed: int = 0):
    """A random HF model of `config` (the same on every rank); norms (centred at 0 or 1), the
    GDN's dt_bias and the routers perturbed, so that a swapped or mis-centred tensor shows."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(config, "text_config") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("dt_bias", "mlp.gate.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def save_hybrid(model, path, mtp: bool = True) -> str:
    """`model` as config.json + safetensors, plus (`mtp`) a multi-token-prediction layer's
    tensors under `mtp.*` as Qwen's checkpoints hold them (the import must never read them)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    if mtp:
        file = f"{path}/model.safetensors"
        state = load_file(file)
        state["mtp.fc.weight"] = torch.randn(HIDDEN, 2 * HIDDEN)
        state["mtp.layers.0.input_layernorm.weight"] = torch.randn(HIDDEN)
        save_file(state, file, metadata={"format": "pt"})
    return str(path)


def hybrid_target_dir(path, kind: str = "qwen3_5_moe", seed: int = 0, **kw) -> str:
    return save_hybrid(hybrid_model(hybrid_config(kind, **kw), seed), path)


def hf_taps(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF logits and each layer's output (hidden_states[i + 1]; the last layer's before the
    final norm, from a hook)."""
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    last = {}
    hook = text.layers[-1].register_forward_hook(lambda m, a, out: last.setdefault("h", out))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    return out.logits, [*out.hidden_states[1:-1], last["h"]]
