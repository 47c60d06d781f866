"""The DFlash layer and model as megatron `ModuleSpec`s, for the local and Transformer Engine backends.

Both backends build the same module tree (and so the same checkpoint keys): a pre-norm Qwen3-style
layer (RMSNorm, q/k RMSNorm, GQA, SwiGLU) whose attention is `DFlashSelfAttention` with an
arbitrary mask. The input norm is always a separate module: a fused norm+QKV linear would also
normalise the target context, which DFlash normalises once (fc + hidden_norm) and not per layer.
`attention="sparse"` swaps the core attention for `DFlashSparseAttention`, which takes the mask as a
`DFlashBlockMask` and skips the masked-out work (sparse_attention.py); the modules with weights,
and so the checkpoint, are the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_dflash.attention import DFlashSelfAttention, DFlashTransformerLayer
from megatron_dflash.sparse_attention import DFlashSparseAttention

BACKENDS = ("local", "te")
ATTENTIONS = ("dense", "sparse")


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for the local backend that also works under sequence parallelism.

    megatron's `WrappedTorchNorm` refuses SP when apex is absent. What SP needs from a norm is only
    that its weight is tagged `sequence_parallel`, so `finalize_model_grads` sums its gradient
    over the TP group (each rank saw a different sequence shard) — what apex's norm does too.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


class DuplicatedLinear(torch.nn.Linear):
    """A linear layer replicated on every TP rank, with megatron's `(output, bias)` return.

    Used for `fc` (K·H -> H) on the local backend, like TE's `parallel_mode="duplicated"`: its
    input is sequence-sharded under SP, so the draft model tags its weight `sequence_parallel`.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool = False, **kwargs):
        super().__init__(input_size, output_size, bias=bias, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)
                if bias:
                    self.bias.zero_()

    def forward(self, x):
        return super().forward(x), None


def _te():
    """Transformer Engine classes, imported only when the TE backend is asked for.

    megatron's TE wrappers import without TE (as placeholders that fail later), so its own
    `HAVE_TE` says whether TE is really there.
    """
    from megatron.core.extensions.transformer_engine import HAVE_TE, TELinear, TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    if not HAVE_TE:
        raise ImportError("backend='te' needs Transformer Engine: pip install 'megatron_dflash[te]'"
                          " on a CUDA machine")
    return TESpecProvider(), TENorm, TELinear


def _check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")


def _check_attention(attention: str):
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTIONS}")


def get_dflash_layer_spec(backend: str = "local", attention: str = "dense") -> ModuleSpec:
    """One DFlash draft layer. `backend="te"` needs Transformer Engine (GPU); `attention="sparse"`
    needs the mask as a `DFlashBlockMask` (`dflash_block_mask`) instead of the dense tensor."""
    _check_backend(backend)
    _check_attention(attention)
    if backend == "local":
        provider, norm = LocalSpecProvider(), LocalRMSNorm
    else:
        provider, norm, _ = _te()
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
            # TE fuses the pre-MLP norm into fc1 (its input is the block only, so that is safe).
            pre_mlp_layernorm=IdentityOp if provider.fuse_layernorm_and_linear() else norm,
            mlp=get_mlp_module_spec_for_backend(backend=provider),
            mlp_bda=get_bias_dropout_add,
        ),
    )


@dataclass
class DFlashModelSubmodules:
    """What a `DFlashDraftModel` is built from."""

    fc: type
    hidden_norm: type
    decoder: TransformerBlockSubmodules


def get_dflash_model_spec(num_layers: int, backend: str = "local",
                          attention: str = "dense") -> ModuleSpec:
    """The whole draft: fc + hidden_norm, `num_layers` DFlash layers and a final norm."""
    from megatron_dflash.model import DFlashDraftModel

    _check_backend(backend)
    _check_attention(attention)
    if backend == "local":
        norm, linear, fc_params = LocalRMSNorm, DuplicatedLinear, {}
    else:
        _, norm, linear = _te()
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
