"""The DFlash layer and model as megatron `ModuleSpec`s, for the local and Transformer Engine backends.

A pre-norm Qwen3-style layer (RMSNorm, q/k RMSNorm, GQA, SwiGLU) whose attention is
`DFlashSelfAttention` with an arbitrary mask. The input norm is always a separate module: a fused
norm+QKV linear would also normalise the target context, which DFlash normalises once (fc +
hidden_norm) and not per layer. `attention="sparse"` swaps the core attention for
`DFlashSparseAttention`, which takes the mask as a `DFlashBlockMask` and skips the masked-out work
(sparse_attention.py); the modules with weights, and so the checkpoint, are the same.

Both backends write the same checkpoint keys, so a checkpoint of either loads into the other. The
module trees differ in one place: TE fuses the pre-MLP norm into fc1
(`mlp.linear_fc1.layer_norm_weight`), the local layer keeps it as `pre_mlp_layernorm`. As in
megatron's own GPT specs, the checkpoint uses the TE names: the local layer spec renames its
separate norm with a `sharded_state_dict_keys_map` (`LOCAL_KEYS_MAP`), and the local modules carry
TE's (empty) `_extra_state` entries (layers.py).

A DFlash2 draft (`cfg.draft_variant == "dflash2"`) takes `DFlash2TransformerLayer`s, whose two
convolutions are submodules of the layer spec (conv.py), and a `CandidateSelector` submodule of
the model (selector.py). Its MLP convolution sits between the pre-MLP norm and fc1, so TE cannot
fuse them: both backends keep that norm separate (the local `LocalPreLinearRMSNorm`, under the
same checkpoint name), and the selector, which runs in the loss outside the layers and FP8, is one
torch module for both.
"""
from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_dflash.attention import DFlashSelfAttention, DFlashTransformerLayer
from megatron_dflash.config import DFlashConfig
from megatron_dflash.conv import (ConvSubmodules, DFlash2LayerSubmodules, DFlash2TransformerLayer,
                                  GroupedDynamicCausalConv)
from megatron_dflash.layers import (DuplicatedLinear, LocalPreLinearRMSNorm, LocalRMSNorm,
                                    check_backend, te_modules)
from megatron_dflash.masks import FULL, LayerAttention
from megatron_dflash.model import DFlashDraftModel, DFlashModelSubmodules
from megatron_dflash.selector import CandidateSelector
from megatron_dflash.sparse_attention import DFlashSparseAttention

ATTENTIONS = ("dense", "sparse")
# The local layer's checkpoint names for its separate pre-MLP norm: TE's fused ones (megatron's
# local GPT spec maps the same prefix; its input norm, fused there, stays separate here).
LOCAL_KEYS_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _check_attention(attention: str):
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTIONS}")


def get_dflash_layer_spec(backend: str = "local", attention: str = "dense",
                          cfg: DFlashConfig | None = None,
                          layer_attention: LayerAttention = FULL) -> ModuleSpec:
    """One DFlash draft layer. `backend="te"` needs Transformer Engine (GPU); `attention="sparse"`
    needs the mask as a `DFlashBlockMask` (`dflash_block_mask`) instead of the dense tensor.
    `cfg` (resolved): a DFlash2 `draft_variant` gives the DFlash2 layer of its sizes.
    `layer_attention`: the layer's causality and sliding window (`cfg.layer_attentions()`)."""
    check_backend(backend)
    _check_attention(attention)
    if backend == "local":
        provider, norm, linear = LocalSpecProvider(), LocalRMSNorm, _duplicated("local")
    else:
        (provider, norm, _), linear = te_modules(), _duplicated("te")
    dflash2 = cfg is not None and cfg.draft_variant == "dflash2"
    fused_norm = provider.fuse_layernorm_and_linear() and not dflash2
    core_attention = provider.core_attention() if attention == "dense" else DFlashSparseAttention
    layer, submodules, convs = DFlashTransformerLayer, TransformerLayerSubmodules, {}
    if dflash2:
        conv = ModuleSpec(module=GroupedDynamicCausalConv,
                          submodules=ConvSubmodules(kernel_projection=linear),
                          params=dict(kernel_size=cfg.conv_kernel_size,
                                      group_size=cfg.conv_group_size, block_size=cfg.block_size))
        layer, submodules = DFlash2TransformerLayer, DFlash2LayerSubmodules
        convs = dict(attention_conv=conv, mlp_conv=conv)
    return ModuleSpec(
        module=layer,
        submodules=submodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=DFlashSelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary,
                        "layer_attention": layer_attention},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=provider.column_parallel_linear(),
                    core_attention=core_attention,
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=norm,
                    k_layernorm=norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            # TE fuses the pre-MLP norm into fc1 (its input is the block only, so that is safe);
            # the local layer's separate one takes the fused names in the checkpoint.
            pre_mlp_layernorm=IdentityOp if fused_norm else LocalPreLinearRMSNorm,
            mlp=(get_mlp_module_spec_for_backend(backend=provider) if fused_norm or not dflash2
                 else partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                     linear_fc1=provider.column_parallel_linear(),
                     linear_fc2=provider.row_parallel_linear()))),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused_norm else dict(LOCAL_KEYS_MAP),
            **convs,
        ),
    )


def get_dflash_model_spec(num_layers: int, backend: str = "local", attention: str = "dense",
                          cfg: DFlashConfig | None = None) -> ModuleSpec:
    """The whole draft: fc + hidden_norm, `num_layers` DFlash layers (each seeing as `cfg`'s
    `layer_types`, `sliding_window` and `is_causal` say) and a final norm (and, for a DFlash2
    `cfg`, DFlash2 layers and the candidate selector)."""
    check_backend(backend)
    _check_attention(attention)
    norm = LocalRMSNorm if backend == "local" else te_modules()[1]
    kinds = cfg.layer_attentions() if cfg is not None else [FULL] * num_layers
    if len(kinds) != num_layers:
        raise ValueError(f"num_layers={num_layers} but the config describes {len(kinds)} layers")
    layers = [get_dflash_layer_spec(backend, attention, cfg, kind) for kind in kinds]
    dflash2 = cfg is not None and cfg.draft_variant == "dflash2"
    return ModuleSpec(
        module=DFlashDraftModel,
        submodules=DFlashModelSubmodules(
            fc=_duplicated(backend),
            hidden_norm=norm,
            decoder=TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm),
            selector=ModuleSpec(module=CandidateSelector) if dflash2 else None,
        ),
    )


def _duplicated(backend: str) -> ModuleSpec:
    """A linear layer replicated on every TP rank (`fc`, the convolutions' tap projections)."""
    if backend == "local":
        return ModuleSpec(module=DuplicatedLinear)
    return ModuleSpec(module=te_modules()[2],
                      params={"parallel_mode": "duplicated", "skip_weight_param_allocation": False})


def build_draft(cfg, draft_config, backend: str = "local", attention: str = "dense"):
    """A fresh DFlash draft for a resolved `DFlashConfig` and the draft's `TransformerConfig`
    (`config.draft_transformer_config`): the one place a draft is built from its spec."""
    return build_module(get_dflash_model_spec(cfg.num_draft_layers, backend, attention, cfg),
                        config=draft_config, dflash_config=cfg)
