"""The target's core attention on the local backend: torch scaled-dot-product attention.

megatron's local `DotProductAttention` scores every query against every key with an unfused
matmul-softmax (and repeats K/V for GQA); SDPA runs a fused kernel (flash attention on CPU too)
and broadcasts the K/V groups. Same contract and, in fp32, the same numerics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

CAUSAL_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


class SDPACoreAttention(MegatronModule):
    """Drop-in `core_attention` for megatron's local layer spec (`build_target(backend="local")`).

    Constructor and forward as megatron's DotProductAttention: query [sq, b, np, hn], key/value
    [sk, b, ng, hn] (per TP rank) -> [sq, b, np*hn]. A given `attention_mask` (bool, True =
    masked) is used as is; without one a causal module is causal, aligned bottom-right so that
    query i sees keys <= i + sk - sq (a prefill chunk or decode step against a KV cache). Like
    DotProductAttention it takes the mask type from the constructor, not from forward: megatron's
    static inference passes `no_mask` past the prompt, which would let a chunk see its future.

    Scale: `softmax_scale`, else 1/sqrt(kv_channels); `apply_query_key_layer_scaling` divides
    the scores by the layer number and multiplies them back in the fp32 softmax, so it is left out.
    A fully masked query row gives zeros (DotProductAttention: the mean of the values).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        self.causal = attn_mask_type in CAUSAL_MASK_TYPES
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        _refuse({"context parallelism": config.context_parallel_size != 1,
                 f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
                 "window attention": is_layer_window_attention(
                     config.window_size, config.window_attn_skip_freq, max(1, layer_number))})

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        _refuse({f"attention dropout {self.dropout} in training":
                 self.training and self.dropout > 0,
                 "attention_bias": attention_bias is not None,
                 "packed sequences": packed_seq_params is not None})
        sq, b, num_heads, hn = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask
        elif self.causal and sq == sk:
            is_causal = True
        elif self.causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=self.softmax_scale,
                                             enable_gqa=num_heads != key.shape[2])
        return out.permute(2, 0, 1, 3).reshape(sq, b, num_heads * hn)


def _refuse(features: dict[str, bool]) -> None:
    """One ValueError naming every requested feature that SDPACoreAttention lacks."""
    names = [name for name, asked in features.items() if asked]
    if names:
        raise ValueError(f"SDPACoreAttention does not support {', '.join(names)}; use megatron's "
                         "DotProductAttention or Transformer Engine")
