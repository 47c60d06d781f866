"""The target's core attention on the local backend: torch scaled-dot-product attention.

megatron's local `DotProductAttention` scores every query against every key with an unfused
matmul-softmax (and repeats K/V for GQA); SDPA runs a fused kernel (flash attention on CPU too)
and broadcasts the K/V groups. Same contract and, in fp32, the same numerics. megatron's sliding
window (`window_size`, on the layers `window_attn_skip_freq` picks) is a band mask, and attention
sinks (`softmax_type`: a per-head logit in every softmax's denominator, gpt-oss's `sinks`) are one
extra key with a zero value whose score is the sink: SDPA then divides by the same sum.

Context parallelism (megatron's split, `context_parallel.py`): the rank's queries are its chunks
of the sequence; K/V are all-gathered over the CP group into sequence order (megatron's all-gather
CP attention: its `cp_comm_type` choices are Transformer Engine's, on GPU) and the causal mask and
window are applied on the chunks' global positions. Exact; its backward reduce-scatters the K/V
gradients (the frozen target needs none).

Packed sequences (megatron's THD format, `packed_sequences.py`): query/key/value arrive as
[t, heads, hn] with `cu_seqlens`, and each document is attended alone, one at a time, exactly as
it would be unpacked (causal, window and sinks included).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import get_pg_size

from megatron_dflash.context_parallel import gather_sequence, local_positions

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
    Window: query i (bottom-right aligned) sees keys j with i - left <= j <= i + right, `window_size
    = (left, right)`. Under context parallelism queries and keys sit at their global positions
    (module docstring). Sinks: `softmax_offset` [heads of this TP rank], megatron's parameter
    (`learnable`; `off-by-one` is a constant 0). Packed sequences (`packed_seq_params`,
    qkv_format "thd"; no mask, no CP): [t, np, hn] -> [t, np*hn], each `cu_seqlens` segment
    attended alone.
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
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = (pg_collection.cp if pg_collection is not None
                             else parallel_state.get_context_parallel_group())
        self.window = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, max(1, layer_number)) else None)
        heads = config.num_attention_heads // config.tensor_model_parallel_size
        if config.softmax_type == "learnable":
            self.softmax_offset = torch.nn.Parameter(torch.zeros(heads,
                                                                 dtype=config.params_dtype))
        elif config.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", torch.zeros(heads, dtype=config.params_dtype))
        else:
            self.softmax_offset = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        cp = self.cp_group is not None and get_pg_size(self.cp_group) > 1
        packed = packed_seq_params is not None
        _refuse({f"attention dropout {self.dropout} in training":
                 self.training and self.dropout > 0,
                 "attention_bias": attention_bias is not None,
                 "packed sequences other than THD":
                     packed and packed_seq_params.qkv_format != "thd",
                 "packed sequences with an attention mask or context parallelism":
                     packed and (attention_mask is not None or cp),
                 "an attention mask under context parallelism": cp and attention_mask is not None})
        if packed:  # each document alone: [t, heads, hn] -> [t, heads*hn]
            lengths = packed_seq_params.cu_seqlens_q.diff().tolist()
            return torch.cat([self._attend(*(t[:, None] for t in doc), None, False)[:, 0]
                              for doc in zip(*(t.split(lengths) for t in (query, key, value)))])
        return self._attend(query, key, value, attention_mask, cp)

    def _attend(self, query, key, value, attention_mask, cp: bool):
        """[sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np*hn] (the class docstring's rules)."""
        sq, b, num_heads, hn = query.shape
        if cp:  # one all-gather for K and V
            widths = [key.shape[-1], value.shape[-1]]
            key, value = gather_sequence(torch.cat([key, value], dim=-1),
                                         self.cp_group).split(widths, dim=-1)
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask
        elif self.causal and sq == sk and self.window is None and self.softmax_offset is None:
            is_causal = True
        causal_mask = self.causal and attention_mask is None and not is_causal
        if causal_mask or self.window is not None:
            # query i at position p (bottom-right aligned, or its global one) sees key j when
            # j <= p (causal) and p - left <= j <= p + right (window)
            p = (local_positions(sq, self.cp_group, query.device) if cp
                 else torch.arange(sk - sq, sk, device=query.device))[:, None]
            j = torch.arange(sk, device=query.device)
            visible = j <= p if causal_mask else torch.ones(sq, sk, dtype=torch.bool,
                                                            device=query.device)
            if self.window is not None:
                left, right = self.window
                visible = visible & (j >= p - left)
                visible = visible & (j <= p + right) if right >= 0 else visible
            mask = visible if mask is None else mask & visible
        if self.softmax_offset is not None:
            q, k, v, mask = _with_sink(q, k, v, mask, self.softmax_offset)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=self.softmax_scale,
                                             enable_gqa=num_heads != key.shape[2])
        return out.permute(2, 0, 1, 3).reshape(sq, b, num_heads * hn)


def _with_sink(q, k, v, mask, sink):
    """q, k and v with one more key (zero, with a zero value) per group, and the additive mask
    that gives it the score `sink[h]` in head h (and -inf where `mask`, True = visible, hides)."""
    b, heads, sq, _ = q.shape
    k, v = (torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], 1, t.shape[3])], dim=2)
            for t in (k, v))
    sk = k.shape[2] - 1
    bias = q.new_zeros(b, heads, sq, sk)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    column = sink.to(q.dtype).view(1, heads, 1, 1).expand(b, heads, sq, 1)
    return q, k, v, torch.cat([bias, column], dim=-1)


def _refuse(features: dict[str, bool]) -> None:
    """One ValueError naming every requested feature that SDPACoreAttention lacks."""
    names = [name for name, asked in features.items() if asked]
    if names:
        raise ValueError(f"SDPACoreAttention does not support {', '.join(names)}; use megatron's "
                         "DotProductAttention or Transformer Engine")
