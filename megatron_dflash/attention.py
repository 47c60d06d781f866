"""DFlash attention: queries from the block, keys/values from [target context ; block].

The fused target context enters every draft layer only as extra keys/values. It goes through the
layer's own `linear_qkv` and `k_layernorm` (the reference shares k_proj/v_proj/k_norm between
context and block) but never through the layer's input norm, MLP or residual stream. Running the
fused projection on the context wastes its query rows (about s_ctx·h·h/tp FLOPs per layer), but
keeps megatron's standard QKV layout, so the target importer and the HF exporter share one
QKV mapping and every megatron feature of `SelfAttention` (GQA with any TP, q/k norms, SP
gathers, TE linears) carries over unchanged.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_dflash.masks import FULL, LayerAttention, layer_mask


class DFlashKVCache:
    """The draft's context keys/values kept across speculative-decoding steps (spec §7).

    Only context entries persist: each draft call appends the K/V of the context tokens it is
    given, while the block's own K/V are recomputed every call and never stored, so no "dirty"
    bidirectional K/V survives a step. Keys are kept after `k_layernorm` but before RoPE, with
    their positions: megatron's `Attention` rotates the whole key tensor after
    `get_query_key_value_tensors` (its own static KV cache also stores un-rotated keys), so the
    draft model re-rotates the cached keys at their stored positions, which gives the same keys
    as caching them after RoPE. Layouts are megatron's `[s, b, groups, head_dim]`. A sliding-
    window layer's block sees only the cached context within its window: the draft masks the rest
    by position (`masks.position_masks`, the reference's `_attention_mask`), exactly as if the
    cache held only those entries.
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def add_positions(self, new_positions: torch.Tensor) -> torch.Tensor:
        """Record the positions [b, c] of the context tokens of this call; returns all [b, len]."""
        self.positions = (new_positions if self.positions is None
                          else torch.cat([self.positions, new_positions], dim=1))
        return self.positions

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor):
        """Append one layer's new context K/V; returns that layer's K/V for the whole context."""
        if layer_number in self._kv:
            old_key, old_value = self._kv[layer_number]
            key, value = torch.cat([old_key, key], dim=0), torch.cat([old_value, value], dim=0)
        self._kv[layer_number] = (key, value)
        return key, value


class DFlashSelfAttention(SelfAttention):
    """SelfAttention whose keys/values are `[context ; hidden_states]` along the sequence.

    The context arrives as `key_value_states` ([s_ctx(/tp under SP), b, h], already fused and
    normalised by the draft model). Under sequence parallelism the context and the block are
    all-gathered by two separate `linear_qkv` calls, so shards of the two never interleave.

    `layer_attention` (a spec param) is what this layer sees beyond the DFlash rule (causal,
    sliding window); from the masks the draft is given it takes its own kind's (`layer_mask`).
    """

    _context: torch.Tensor | None = None
    _kv_cache: DFlashKVCache | None = None

    def __init__(self, *args, layer_attention: LayerAttention = FULL, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_attention = layer_attention

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        return super().forward(hidden_states, layer_mask(attention_mask, self.layer_attention),
                               *args, **kwargs)

    @contextlib.contextmanager
    def kv_context(self, context: torch.Tensor | None):
        """Attach the block-level context for one layer call (re-entered by activation recompute)."""
        self._context = context
        try:
            yield
        finally:
            self._context = None

    @contextlib.contextmanager
    def kv_cache(self, cache: DFlashKVCache | None):
        """Attach an inference cache for one draft forward: the context K/V are appended to it and
        attention sees all cached context K/V (see `DFlashKVCache`)."""
        self._kv_cache = cache
        try:
            yield
        finally:
            self._kv_cache = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        if output_gate or not split_qkv:
            raise ValueError("DFlash attention supports neither output gates nor fused QKV-RoPE")
        query, key, value = super().get_query_key_value_tensors(hidden_states)
        context = key_value_states if key_value_states is not None else self._context
        if context is None:
            return query, key, value
        _, ctx_key, ctx_value = super().get_query_key_value_tensors(context)
        if self._kv_cache is not None:
            ctx_key, ctx_value = self._kv_cache.update(self.layer_number, ctx_key, ctx_value)
        return query, torch.cat([ctx_key, key], dim=0), torch.cat([ctx_value, value], dim=0)


class DFlashTransformerLayer(TransformerLayer):
    """TransformerLayer that feeds the block-level `context` to its self-attention as K/V.

    megatron's TransformerLayer hands `context` only to the cross-attention slot, which would
    apply neither RoPE nor the shared k-norm; here it goes to `DFlashSelfAttention` instead and is
    passed on unchanged to the next layer.
    """

    def forward(self, *args, context=None, context_mask=None, **kwargs):
        with self.self_attention.kv_context(context):
            hidden_states, _ = super().forward(*args, context=None, context_mask=None, **kwargs)
        return hidden_states, context
