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


class DFlashSelfAttention(SelfAttention):
    """SelfAttention whose keys/values are `[context ; hidden_states]` along the sequence.

    The context arrives as `key_value_states` ([s_ctx(/tp under SP), b, h], already fused and
    normalised by the draft model). Under sequence parallelism the context and the block are
    all-gathered by two separate `linear_qkv` calls, so shards of the two never interleave.
    """

    _context: torch.Tensor | None = None

    @contextlib.contextmanager
    def kv_context(self, context: torch.Tensor | None):
        """Attach the block-level context for one layer call (re-entered by activation recompute)."""
        self._context = context
        try:
            yield
        finally:
            self._context = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        if output_gate or not split_qkv:
            raise ValueError("DFlash attention supports neither output gates nor fused QKV-RoPE")
        query, key, value = super().get_query_key_value_tensors(hidden_states)
        context = key_value_states if key_value_states is not None else self._context
        if context is None:
            return query, key, value
        _, ctx_key, ctx_value = super().get_query_key_value_tensors(context)
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
