"""The module implementations behind the specs: the local backend's norms and `fc` linear, and the
Transformer Engine classes (imported only when asked for).

Checkpoint keys: the local modules hold the state the Transformer Engine module in the same place
holds, so the two backends write the same checkpoint (specs.py). TE modules carry an
`_extra_state` (FP8 metadata; TE's RMSNorm too, TE >= 2), which megatron's local linears
mirror with an empty one ("keep compatibility with TE state dict"); `LocalRMSNorm` and
`DuplicatedLinear` do the same. The pre-MLP norm is the exception: TE fuses it into fc1
(`TELayerNormColumnParallelLinear`, whose `_extra_state` the local fc1 already mirrors), so there
it is a `LocalPreLinearRMSNorm` (weight only), whose weight the layer spec's key map names
`mlp.linear_fc1.layer_norm_weight`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("local", "te")


class _TEExtraState:
    """An empty `_extra_state` in the state dict, like megatron's local ColumnParallelLinear: None
    when saved, ignored when loaded (whatever TE wrote there), and optional in a loaded state
    dict. Mix in before the torch module class."""

    def _register_extra_state_default(self):
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(
                f"{prefix}_extra_state"))

    def get_extra_state(self) -> None:
        """Keep compatibility with TE's state dict."""
        return None

    def set_extra_state(self, state) -> None:
        """Extra state (TE's FP8 metadata) is ignored."""


class LocalPreLinearRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for the local backend that also works under sequence parallelism; state
    `weight` only: the local stand-in for the norm Transformer Engine fuses into the following
    linear (the `layer_norm_weight` of its LayerNormLinear).

    megatron's `WrappedTorchNorm` refuses SP when apex is absent. What SP needs from a norm is only
    that its weight is tagged `sequence_parallel`, so `finalize_model_grads` sums its gradient
    over the TP group (each rank saw a different sequence shard) — what apex's norm does too.

    Zero-centred (`config.layernorm_zero_centered_gamma`, TE's `zero_centered_gamma`; a spec's
    `zero_centered_gamma` param overrides the config): the output is scaled by 1 + weight, as
    Qwen3-Next/3.5 norms are, in fp32 as transformers computes it. Folding the 1 into a bf16
    weight instead would round it (w near 0 holds more digits than 1 + w).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5,
                 zero_centered_gamma: bool | None = None, **kwargs):
        super().__init__(hidden_size, eps=eps)
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma
                                        if zero_centered_gamma is None else zero_centered_gamma)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        if not self.zero_centered_gamma:
            return super().forward(x)
        normed = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class LocalRMSNorm(_TEExtraState, LocalPreLinearRMSNorm):
    """The local stand-in for a standalone TENorm, with its state (`weight`, `_extra_state`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(config, hidden_size, eps=eps, **kwargs)
        self._register_extra_state_default()


class DuplicatedLinear(_TEExtraState, torch.nn.Linear):
    """A linear layer replicated on every TP rank, with megatron's `(output, bias)` return.

    Used for `fc` (K·H -> H) on the local backend, like TE's `parallel_mode="duplicated"` (and
    with its state: `weight`, `_extra_state`): its input is sequence-sharded under SP, so the
    draft model tags its weight `sequence_parallel`.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool = False, **kwargs):
        super().__init__(input_size, output_size, bias=bias, dtype=config.params_dtype)
        self._register_extra_state_default()
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)
                if bias:
                    self.bias.zero_()

    def forward(self, x):
        return super().forward(x), None


def te_modules():
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


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
