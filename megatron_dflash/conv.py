"""DFlash2's grouped dynamic causal convolution around each attention and MLP sublayer.

A DFlash2 layer (dflash2_and_swa_spec.md §2-3) is the DFlash layer with one convolution on each
side of each sublayer, after its norm and before the residual add:

    u, k_A = attention_conv.prepare(input_layernorm(x));  x += attention_conv.finish(attn(u), k_A)
    v, k_M = mlp_conv.prepare(pre_mlp_layernorm(x));      x += mlp_conv.finish(mlp(v), k_M)

Side s mixes block position t with its Kc-1 predecessors *in the same block*:
y[t, c] = Σ_o (base[s, o, c] + δ[t, s, o, c // gs]) · z[t-o, c], z = 0 before the block's start.
Both sides' dynamic taps δ come from one projection of the sublayer's normed input. The target
context enters attention only as keys/values (`attention.py`) and is never convolved.

Positions are counted along the packed block stream (`block_size` tokens per block), so a shard
of it under sequence parallelism must start at a block boundary: training pads the blocks to a
multiple of the TP size (`training.microbatches`) and each rank convolves its own whole blocks.
The identity initialisation (base tap 0 = 1, projection 0) makes a fresh DFlash2 layer compute
exactly its DFlash backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_dflash.attention import DFlashTransformerLayer


@dataclass
class ConvSubmodules:
    """What a `GroupedDynamicCausalConv` is built from: the linear of its dynamic taps."""

    kernel_projection: ModuleSpec | type


class GroupedDynamicCausalConv(MegatronModule):
    """One sublayer's convolution pair (spec §3): `prepare` convolves the sublayer's input with
    side 0 and returns side 1's dynamic taps, which `finish` applies to its output.

    Args:
        config: the draft's TransformerConfig.
        kernel_size: taps Kc (the current token and Kc-1 predecessors), <= block_size.
        group_size: channels sharing one dynamic tap; divides the hidden size.
        block_size: tokens per block (where the convolution restarts).
    """

    def __init__(self, config, submodules: ConvSubmodules, kernel_size: int, group_size: int,
                 block_size: int):
        super().__init__(config=config)
        hidden = config.hidden_size
        self.kernel_size, self.group_size, self.block_size = kernel_size, group_size, block_size
        self.groups = hidden // group_size
        base = torch.zeros(2, kernel_size, hidden, dtype=config.params_dtype)
        base[:, 0] = 1.0
        self.base_kernel = torch.nn.Parameter(base)
        self.kernel_projection = build_module(
            submodules.kernel_projection, hidden, 2 * kernel_size * self.groups, config=config,
            init_method=torch.nn.init.zeros_, bias=False, skip_bias_add=False)
        # Replicated over TP, but under SP each rank convolves its own blocks.
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel
        self._taps: torch.Tensor | None = None

    def prepare(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(side 0 of `z` [s, b, H], side 1's dynamic taps [s, b, Kc, G])."""
        s, b, _ = z.shape
        delta = self.kernel_projection(z)[0].view(s, b, 2, self.kernel_size, self.groups)
        return self._convolve(z, delta[:, :, 0], side=0), delta[:, :, 1]

    def finish(self, y: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        """Side 1 of the sublayer's output `y` [s, b, H]."""
        return self._convolve(y, taps, side=1)

    def _convolve(self, z: torch.Tensor, delta: torch.Tensor, side: int) -> torch.Tensor:
        s, b, hidden = z.shape
        if self.config.sequence_parallel and s % self.block_size:
            raise ValueError(f"a sequence-parallel shard of {s} block tokens is not whole blocks "
                             f"of {self.block_size}: pad the blocks to a multiple of the TP size")
        z = z.view(s, b, self.groups, self.group_size)
        base = self.base_kernel[side].view(self.kernel_size, self.groups, self.group_size)
        position = torch.arange(s, device=z.device) % self.block_size  # within its block
        out = (base[0].to(z.dtype) + delta[:, :, 0, :, None]) * z
        for o in range(1, min(self.kernel_size, s)):
            earlier = F.pad(z[:-o], (0, 0, 0, 0, 0, 0, o, 0))  # z[t - o], 0 before the stream
            earlier = earlier * (position >= o).to(z.dtype).view(s, 1, 1, 1)  # ... or the block
            out = out + (base[o].to(z.dtype) + delta[:, :, o, :, None]) * earlier
        return out.view(s, b, hidden)

    def before(self, module, args, kwargs):
        """Forward pre-hook of the wrapped sublayer: convolve its input, keep side 1's taps."""
        hidden, self._taps = self.prepare(args[0])
        return (hidden, *args[1:]), kwargs

    def after(self, module, args, output):
        """Forward hook of the wrapped sublayer: convolve its output `(out, bias)`."""
        out, bias = output
        taps, self._taps = self._taps, None
        return self.finish(out, taps), bias


@dataclass
class DFlash2LayerSubmodules(TransformerLayerSubmodules):
    """A DFlash layer's submodules plus the two convolutions."""

    attention_conv: ModuleSpec | type = IdentityOp
    mlp_conv: ModuleSpec | type = IdentityOp


class DFlash2TransformerLayer(DFlashTransformerLayer):
    """The DFlash layer with `attention_conv` around its self-attention and `mlp_conv` around its
    MLP. The convolutions hook the sublayers' calls, so megatron's layer forward (norms, bias-
    dropout-add, SP) runs unchanged and the sublayers keep their checkpoint names."""

    def __init__(self, config, submodules: DFlash2LayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.attention_conv = build_module(submodules.attention_conv, config=config)
        self.mlp_conv = build_module(submodules.mlp_conv, config=config)
        for sublayer, conv in ((self.self_attention, self.attention_conv),
                               (self.mlp, self.mlp_conv)):
            sublayer.register_forward_pre_hook(conv.before, with_kwargs=True)
            sublayer.register_forward_hook(conv.after)
