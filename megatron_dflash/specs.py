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
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_dflash.attention import DFlashSelfAttention, DFlashTransformerLayer
from megatron_dflash.layers import (DuplicatedLinear, LocalPreLinearRMSNorm, LocalRMSNorm,
                                    check_backend, te_modules)
from megatron_dflash.model import DFlashDraftModel, DFlashModelSubmodules
from megatron_dflash.sparse_attention import DFlashSparseAttention

ATTENTIONS = ("dense", "sparse")
# The local layer's checkpoint names for its separate pre-MLP norm: TE's fused ones (megatron's
# local GPT spec maps the same prefix; its input norm, fused there, stays separate here).
LOCAL_KEYS_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _check_attention(attention: str):
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTIONS}")


def get_dflash_layer_spec(backend: str = "local", attention: str = "dense") -> ModuleSpec:
    """One DFlash draft layer. `backend="te"` needs Transformer Engine (GPU); `attention="sparse"`
    needs the mask as a `DFlashBlockMask` (`dflash_block_mask`) instead of the dense tensor."""
    check_backend(backend)
    _check_attention(attention)
    if backend == "local":
        provider, norm = LocalSpecProvider(), LocalRMSNorm
    else:
        provider, norm, _ = te_modules()
    fused_norm = provider.fuse_layernorm_and_linear()
    core_attention = provider.core_attention() if attention == "dense" else DFlashSparseAttention
    return ModuleSpec(
        module=DFlashTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=DFlashSelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
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
            mlp=get_mlp_module_spec_for_backend(backend=provider),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused_norm else dict(LOCAL_KEYS_MAP),
        ),
    )


def get_dflash_model_spec(num_layers: int, backend: str = "local",
                          attention: str = "dense") -> ModuleSpec:
    """The whole draft: fc + hidden_norm, `num_layers` DFlash layers and a final norm."""
    check_backend(backend)
    _check_attention(attention)
    if backend == "local":
        norm, linear, fc_params = LocalRMSNorm, DuplicatedLinear, {}
    else:
        _, norm, linear = te_modules()
        fc_params = {"parallel_mode": "duplicated", "skip_weight_param_allocation": False}
    layer = get_dflash_layer_spec(backend, attention)
    return ModuleSpec(
        module=DFlashDraftModel,
        submodules=DFlashModelSubmodules(
            fc=ModuleSpec(module=linear, params=fc_params),
            hidden_norm=norm,
            decoder=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm),
        ),
    )


def build_draft(cfg, draft_config, backend: str = "local", attention: str = "dense"):
    """A fresh DFlash draft for a resolved `DFlashConfig` and the draft's `TransformerConfig`
    (`config.draft_transformer_config`): the one place a draft is built from its spec."""
    return build_module(get_dflash_model_spec(cfg.num_draft_layers, backend, attention),
                        config=draft_config, dflash_config=cfg)
