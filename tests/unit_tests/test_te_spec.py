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

from megatron_dflash.masks import LayerAttention
from megatron_dflash.conv import DFlash2TransformerLayer, GroupedDynamicCausalConv
from megatron_dflash.layers import LocalPreLinearRMSNorm
from megatron_dflash.selector import CandidateSelector
from megatron_dflash.sparse_attention import DFlashSparseAttention
from megatron_dflash.specs import LOCAL_KEYS_MAP, get_dflash_model_spec
from megatron_dflash.synthetic import dflash_config, target_config


def test_te_spec_modules(monkeypatch):
    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    for attention, core in (("dense", TEDotProductAttention), ("sparse", DFlashSparseAttention)):
        model = get_dflash_model_spec(2, "te", attention)
        sub = model.submodules
        assert sub.fc.module is TELinear and sub.fc.params["parallel_mode"] == "duplicated"
        assert sub.hidden_norm is TENorm and sub.decoder.layer_norm is TENorm
        layer = sub.decoder.layer_specs[0].submodules
        attn = layer.self_attention
        assert attn.params == {"attn_mask_type": AttnMaskType.arbitrary,
                               "layer_attention": LayerAttention(causal=False, window=None)}
        assert layer.input_layernorm is TENorm
        assert attn.submodules.linear_qkv is TEColumnParallelLinear
        assert attn.submodules.core_attention is core
        assert attn.submodules.linear_proj is TERowParallelLinear
        assert attn.submodules.q_layernorm is TENorm and attn.submodules.k_layernorm is TENorm
        assert layer.pre_mlp_layernorm is IdentityOp
        mlp = layer.mlp.keywords["submodules"]
        assert mlp.linear_fc1 is TELayerNormColumnParallelLinear
        assert mlp.linear_fc2 is TERowParallelLinear


def test_te_spec_dflash2_modules(monkeypatch):
    """DFlash2 on TE: the MLP convolution sits between the pre-MLP norm and fc1, so they are not
    fused (a separate norm under the fused norm's checkpoint name, an unfused TE fc1); each
    convolution projects its taps with a duplicated TELinear; the selector is a model
    submodule."""
    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    cfg = dflash_config(target_config(), block_size=8, draft_variant="dflash2", selector_rank=8)
    model = get_dflash_model_spec(2, "te", "dense", cfg)
    assert model.submodules.selector.module is CandidateSelector
    spec = model.submodules.decoder.layer_specs[0]
    layer = spec.submodules
    assert spec.module is DFlash2TransformerLayer
    assert layer.pre_mlp_layernorm is LocalPreLinearRMSNorm
    assert layer.sharded_state_dict_keys_map == LOCAL_KEYS_MAP
    assert layer.mlp.keywords["submodules"].linear_fc1 is TEColumnParallelLinear
    assert layer.input_layernorm is TENorm
    for conv in (layer.attention_conv, layer.mlp_conv):
        assert conv.module is GroupedDynamicCausalConv
        assert conv.params == dict(kernel_size=2, group_size=16, block_size=8)
        projection = conv.submodules.kernel_projection
        assert projection.module is TELinear and projection.params["parallel_mode"] == "duplicated"
