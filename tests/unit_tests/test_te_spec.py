"""The Transformer Engine draft spec, read without TE: megatron defines its TE wrapper classes
anyway (they fail only when built), so with `HAVE_TE` forced the spec shows which modules the
GPU builds. What it must be (docs/megatron_notes.md §4.3): TE linears, an unfused QKV with its
own TENorm input norm (a fused norm would also normalise the target context), TE core attention
with an arbitrary mask, the pre-MLP norm fused into fc1, and `fc` a duplicated TELinear."""
import megatron.core.extensions.transformer_engine as te_ext
from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                         TEDotProductAttention,
                                                         TELayerNormColumnParallelLinear, TELinear,
                                                         TENorm, TERowParallelLinear)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp

from megatron_dflash.sparse_attention import DFlashSparseAttention
from megatron_dflash.specs import get_dflash_model_spec


def test_te_spec_modules(monkeypatch):
    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    for attention, core in (("dense", TEDotProductAttention), ("sparse", DFlashSparseAttention)):
        model = get_dflash_model_spec(2, "te", attention)
        sub = model.submodules
        assert sub.fc.module is TELinear and sub.fc.params["parallel_mode"] == "duplicated"
        assert sub.hidden_norm is TENorm and sub.decoder.layer_norm is TENorm
        layer = sub.decoder.layer_specs[0].submodules
        attn = layer.self_attention
        assert attn.params == {"attn_mask_type": AttnMaskType.arbitrary}
        assert layer.input_layernorm is TENorm
        assert attn.submodules.linear_qkv is TEColumnParallelLinear
        assert attn.submodules.core_attention is core
        assert attn.submodules.linear_proj is TERowParallelLinear
        assert attn.submodules.q_layernorm is TENorm and attn.submodules.k_layernorm is TENorm
        assert layer.pre_mlp_layernorm is IdentityOp
        mlp = layer.mlp.keywords["submodules"]
        assert mlp.linear_fc1 is TELayerNormColumnParallelLinear
        assert mlp.linear_fc2 is TERowParallelLinear
