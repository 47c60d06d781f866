"""Tiny random HF models of the target families beside Llama / Qwen / DeepSeek (GLM-4.5, gpt-oss,
Kimi-K2.5, Mistral, Qwen2-MoE, Mixtral), built from configs with the installed transformers, and
the two checks every family's import test makes (logits and taps equal HF's; a config it cannot
reproduce is refused naming the field)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)

VOCAB, HIDDEN, TOL = 256, 64, 1e-5


def perturbed_model(config, seed=0):
    """A random fp32 HF model of `config` (the same on every rank): norms, biases, attention
    sinks and router score-correction biases moved away from their initial 1 / 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "sinks")):
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def save_with_mtp_layer(model, path, prefix="model.") -> str:
    """`model` as config.json + safetensors plus one multi-token-prediction layer's tensors
    (`{prefix}layers.{L}.*`, a copy of the last layer), as GLM and DeepSeek checkpoints hold."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    file = Path(path) / "model.safetensors"
    state = load_file(file)
    last, mtp = model.config.num_hidden_layers - 1, model.config.num_hidden_layers
    state |= {k.replace(f"{prefix}layers.{last}.", f"{prefix}layers.{mtp}."): v.clone()
              for k, v in state.items() if k.startswith(f"{prefix}layers.{last}.")}
    save_file(state, file, metadata={"format": "pt"})
    return str(path)


def glm4_moe_config(**kw):
    """GLM-4.5's shape, small: GQA with head_dim 32 != hidden / heads, q/k/v biases, per-head
    q/k norms, half-rotary RoPE; layer 0 dense (FFN 96), layers 1-2 MoE: 8 experts (FFN 32),
    sigmoid top-4 with the correction bias, scaled by 2.5, one shared expert; untied."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**dict(
        architectures=["Glm4MoeForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=8,
        num_experts_per_tok=4, n_group=1, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=1,
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                             partial_rotary_factor=0.5), tie_word_embeddings=False) | kw)


def import_target(source, hf_config=None, **layout):
    """The frozen megatron import of an HF checkpoint directory (or a state dict with its
    config), at `layout` (target_transformer_config's keywords)."""
    hf = hf_config if hf_config is not None else load_hf_config(source)
    model = build_target(hf, target_transformer_config(hf, **layout))
    load_hf_weights(model, source)
    return model


def tokens(batch=2, seq=24, seed=1):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(seq).expand(batch, seq)


def hf_outputs(hf_model, ids):
    """HF logits and every layer's output (`hidden_states[i + 1]`; the last layer's before the
    final norm, from a hook), in [b, s, ...]."""
    last = {}
    layers = hf_model.model.language_model.layers if hasattr(
        hf_model.model, "language_model") else hf_model.model.layers

    def record(module, args, out):  # returns None: the layer's output stays as it is
        last["h"] = out[0] if isinstance(out, tuple) else out

    hook = layers[-1].register_forward_hook(record)
    with torch.no_grad():
        out = hf_model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    return out.logits, [*out.hidden_states[1:-1], last["h"]]


def assert_matches_hf(model, hf_model, taps, seq=24):
    """The import's logits and taps (`FeatureCapture`) equal HF's within TOL."""
    ids, pos = tokens(seq=seq)
    with FeatureCapture(model, taps) as capture:
        logits, features = target_forward(model, ids, pos, capture)
    ref_logits, layers = hf_outputs(hf_model, ids)
    assert (logits - ref_logits).abs().max() <= TOL
    hidden = model.config.hidden_size
    for tap, feature in zip(taps, features.split(hidden, dim=-1), strict=True):
        assert (feature.transpose(0, 1) - layers[tap]).abs().max() <= TOL, tap


def assert_config_refused(source, changes: dict, directory, field: str) -> str:
    """`source`'s config.json with `changes`, alone in `directory` (no tensors: never read), fails
    in `load_hf_config` with one line naming `field` as not supported; returns that line."""
    config = json.loads((Path(source) / "config.json").read_text())
    (Path(directory) / "config.json").write_text(json.dumps(config | changes))
    with pytest.raises(ValueError) as error:
        load_hf_config(directory)
    message = str(error.value)
    assert field in message and "not supported" in message and "\n" not in message, message
    return message


def gpt_oss_config(**kw):
    """gpt-oss's shape, small: 4 layers sliding / full alternately (window 8), sinks, biases,
    8 experts (FFN 64) top-4 with the clamped SwiGLU, YaRN past an original context of 8."""
    from transformers import GptOssConfig

    return GptOssConfig(**dict(
        architectures=["GptOssForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_local_experts=8, num_experts_per_tok=4, sliding_window=8,
        max_position_embeddings=32, rms_norm_eps=1e-6, initializer_range=0.1,
        swiglu_limit=2.0, rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=4.0,
                                               beta_fast=32.0, beta_slow=1.0, truncate=False,
                                               original_max_position_embeddings=8)) | kw)


def save_mxfp4(model, path, seed=0) -> str:
    """`model` saved as gpt-oss is released: its experts replaced by random MXFP4 weights (the
    model's own expert tensors set to transformers' de-quantisation of them) stored as
    `{gate_up,down}_proj_{blocks,scales}`, `quantization_config` quant_method mxfp4."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i, layer in enumerate(model.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp.experts."
        for name, param in (("gate_up_proj", experts.gate_up_proj),
                            ("down_proj", experts.down_proj)):
            e, cols, rows = param.shape  # HF holds [E, in, out]; MXFP4 stores [E, out, in / 32, 16]
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8,
                                   generator=g)
            scales = torch.randint(118, 122, (e, rows, cols // 32), dtype=torch.uint8,
                                   generator=g)
            with torch.no_grad():
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            del state[prefix + name]
            state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
    Path(path).mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    config = json.loads((Path(path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (Path(path) / "config.json").write_text(json.dumps(config))
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def save_kimi_k25(text_model, path, *, tied_on_disk=False) -> str:
    """A tiny stand-in for a Kimi-K2.5 checkpoint around `text_model` (a DeepseekV3ForCausalLM):
    the VLM wrapper's config.json (model_type kimi_k25, a `text_config` of model_type kimi_k2,
    a vision config, top-level tie_word_embeddings True as released), the text weights under
    `language_model.model.*` / `language_model.lm_head.weight` (none when `tied_on_disk`), and
    vision tower / projector tensors."""
    from safetensors.torch import save_file
    from transformers.models.kimi_k25 import Kimi_K25Config

    text = text_model.config.to_dict() | {"model_type": "kimi_k2",
                                           "architectures": ["DeepseekV3ForCausalLM"]}
    config = Kimi_K25Config(text_config=dict(text), vision_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        projection_hidden_size=32).to_dict()
    config |= {"architectures": ["KimiK25ForConditionalGeneration"], "text_config": text,
               "tie_word_embeddings": True}
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "config.json").write_text(json.dumps(config))
    state = {("language_model." + k): v.contiguous() for k, v in text_model.state_dict().items()
             if not (tied_on_disk and k == "lm_head.weight")}
    state |= {"vision_tower.patch_embed.proj.weight": torch.randn(32, 3, 14, 14),
              "mm_projector.proj.0.weight": torch.randn(64, 128)}
    save_file(state, Path(path) / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def mistral_config(**kw):
    """Mistral v0.1's shape, small: a window of 8 keys on every layer, head_dim 32 != hidden /
    heads, untied."""
    from transformers import MistralConfig

    return MistralConfig(**dict(
        architectures=["MistralForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, sliding_window=8, max_position_embeddings=128, rms_norm_eps=1e-6,
        initializer_range=0.1) | kw)


def qwen2_moe_config(**kw):
    """Qwen2-MoE's shape, small: q/k/v biases, 8 experts (FFN 32) top-2 unnormalised, a gated
    shared expert (FFN 48), layer 1 dense (FFN 96)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**dict(
        architectures=["Qwen2MoeForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1) | kw)


def mixtral_config(**kw):
    """Mixtral's shape, small: 4 experts (FFN 64) top-2 in every layer, no window."""
    from transformers import MixtralConfig

    return MixtralConfig(**dict(
        architectures=["MixtralForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1) | kw)


def glm5_config(**kw):
    """GLM-5's shape, small: DeepSeek-V3's MLA / MoE (1 dense layer, then 8 experts top-4 in
    one group, a shared expert) with a DSA indexer keeping 32 keys, plus an MTP layer."""
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(**dict(
        architectures=["GlmMoeDsaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5,
        first_k_dense_replace=1, index_topk=32, index_head_dim=16, index_n_heads=2,
        num_nextn_predict_layers=1, max_position_embeddings=64, rms_norm_eps=1e-6,
        initializer_range=0.1, rope_parameters=dict(rope_type="default", rope_theta=1000.0)) | kw)
