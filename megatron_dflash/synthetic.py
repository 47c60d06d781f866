"""Small random models and data built from configs, for smoke checks (`tools/gpu_check.py`) and
the tests: a few-layer megatron target and head, a DFlash config and draft inputs, a tiny HF Llama
checkpoint on disk, and an indexed dataset of learnable conversations. Weights come from fixed
seeds, so every rank and every run builds the same ones; nothing is downloaded.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash.anchors import (block_input_ids, block_labels, block_loss_mask,
                                     block_loss_weights, block_position_ids, sample_anchors)
from megatron_dflash.config import DFlashConfig
from megatron_dflash.layers import LocalRMSNorm
from megatron_dflash.masks import dflash_attention_mask

VOCAB, HIDDEN, ROPE_THETA = 256, 64, 10000.0


def target_config(tp=1, sp=False, layers=6) -> TransformerConfig:
    return TransformerConfig(
        num_layers=layers, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, layernorm_epsilon=1e-6,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, sequence_parallel=sp)


def head_only_target(tp=1, sp=False) -> GPTModel:
    """A one-layer GPTModel whose embedding/output layer serve as the draft's borrowed head."""
    cfg = target_config(tp, sp, layers=1)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    block = TransformerBlockSubmodules(layer_specs=[spec], layer_norm=LocalRMSNorm)
    model = GPTModel(cfg, block, vocab_size=VOCAB, max_sequence_length=512,
                     position_embedding_type="rope", rotary_base=ROPE_THETA)
    randomize_(model, seed=0)  # identical on every rank, whatever the global RNG state
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dflash_config(tcfg: TransformerConfig, **overrides) -> DFlashConfig:
    """GQA draft with head_dim != hidden/heads, block 16, two layers tapped from a 6-layer target."""
    kw = dict(block_size=16, num_draft_layers=2, target_layer_ids=[1, 4], mask_token_id=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24, ffn_hidden_size=96,
              num_anchors=4)
    kw.update(overrides)
    return DFlashConfig(**kw).resolve(tcfg, vocab_size=VOCAB, target_rope_theta=ROPE_THETA)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (norm weights near 1), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.05 * noise)


def draft_inputs(cfg: DFlashConfig, batch=2, seq_len=48, seed=0) -> dict[str, torch.Tensor]:
    """Tokens with response spans, anchors, block inputs/labels/weights, features and the mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len), generator=g)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    loss_mask[:, seq_len // 4:] = True
    anchors, keep = sample_anchors(loss_mask, cfg.block_size, cfg.num_anchors, g)
    bmask = block_loss_mask(loss_mask, anchors, keep, cfg.block_size)
    k = len(cfg.target_layer_ids)
    return dict(
        block_input_ids=block_input_ids(tokens, anchors, keep, cfg.block_size, cfg.mask_token_id),
        features=torch.randn(seq_len, batch, k * cfg.hidden_size, generator=g),
        attention_mask=dflash_attention_mask(anchors, keep, seq_len, cfg.block_size,
                                             cfg.layer_attentions()),
        position_ids=block_position_ids(seq_len, anchors, cfg.block_size),
        labels=block_labels(tokens, anchors, cfg.block_size),
        weights=block_loss_weights(bmask, cfg.block_size, cfg.loss_gamma),
        anchors=anchors, keep=keep)


def tiny_target_dir(path, vocab=VOCAB, layers=4, hidden=HIDDEN, seed=0) -> str:
    """A random-initialised HF Llama (GQA) saved as config.json + safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(path)
    return str(path)


def pattern_dataset(prefix, count, seq_len, vocab=VOCAB, seed=0,
                    response_length: int | None = None) -> str:
    """An indexed dataset of learnable conversations: a random prompt, then a response cycling
    through five tokens from a random phase — a small draft learns to continue it quickly. The
    response fills the sequence, or is `response_length` tokens long."""
    from megatron_dflash.data.dataset import write_indexed_dataset
    from megatron_dflash.data.tokenize import Tokenized

    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        prompt = torch.randint(0, vocab - 4, (seq_len // 4,), generator=g).tolist()
        start = int(torch.randint(0, 5, (1,), generator=g))
        length = seq_len - len(prompt) if response_length is None else response_length
        response = [10 + (start + i) % 5 for i in range(length)]
        samples.append(Tokenized(prompt + response, [0] * len(prompt) + [1] * len(response),
                                 len(prompt) + length))
    write_indexed_dataset(str(prefix), samples, vocab_size=vocab)
    return str(prefix)
