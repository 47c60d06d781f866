"""megatron's fused kernels for the frozen target and the draft: on where the shapes allow, off
explicitly where they do not, each with its reason (megatron's defaults are all off).

The fields go into the `TransformerConfig`s the plan resolves (`run.plan`), so the main job, the
tools and the feature-cache writer build the same models.
"""
from __future__ import annotations

import torch

from megatron_dflash.fp8 import FP8Settings


def target_fields(backend: str, multi_latent_attention: bool, fp8: FP8Settings,
                  packed_yarn: bool = False) -> dict:
    """The frozen target's fusion and FP8-cache fields (`packed_yarn`: a YaRN target fed packed
    sequences, --pack-sequences)."""
    cuda = torch.cuda.is_available()
    return dict(
        # SwiGLU as one fused kernel (megatron's jit-fused bias-SwiGLU) on the GPU; on the CPU
        # the eager ops are as fast and the CPU suite compares bit for bit with HF.
        bias_activation_fusion=cuda,
        # TE's fused RoPE takes the target's [s, b, np, hn] layout; MLA's fused RoPE is
        # training-only and YaRN-only in megatron-core 0.19, so MLA keeps the unfused one. So
        # does a packed YaRN target: megatron-core 0.19's fused THD RoPE drops YaRN's
        # concentration factor (`mscale`; its fused bshd path falls back to the unfused one).
        apply_rope_fusion=(backend == "te" and cuda and not multi_latent_attention
                           and not packed_yarn),
        # Frozen: no weight gradient to accumulate.
        gradient_accumulation_fusion=False,
        # FP8 weights re-quantised with the current scale at every forward: megatron resets
        # TE's cached FP8 weights only through the wrapped model's config (the draft's), so a
        # cached target weight would stay quantised at the first step's scale all run.
        disable_parameter_transpose_cache=fp8.enabled,
    )


def draft_fields(backend: str) -> dict:
    """The draft's fusion fields."""
    cuda = torch.cuda.is_available()
    return dict(
        bias_activation_fusion=cuda,  # as the target's
        # The draft's RoPE frequencies are per batch, [S+Q, b, 1, d] (context and block
        # positions), not a shape TE's fused RoPE takes: pinned off, never inherited.
        apply_rope_fusion=False,
        # TE linears accumulate the weight gradient into megatron DDP's main_grad in the GEMM;
        # the local linears would need apex's fused_weight_gradient_mlp_cuda, absent.
        gradient_accumulation_fusion=backend == "te" and cuda,
    )
