"""MXFP4 weights (gpt-oss's experts as released), de-quantised as transformers does
(integrations/mxfp4.py), slice by slice.

A weight [..., R, C] is stored as `{name}_blocks` [..., R, C/32, 16] uint8 — 32 FP4 (E2M1) values
per group of a row, two per byte, the low nibble the even element — and `{name}_scales`
[..., R, C/32] uint8, one E8M0 exponent per group (bias 127): value = FP4[nibble] * 2^(scale -
127), exact in bf16 and fp32. `Decoded` views (`hf_checkpoint`) read only the rows and groups a
slice needs, so an expert-parallel rank de-quantises only its experts.
"""
from __future__ import annotations

import torch

from megatron_dflash.targets.hf_checkpoint import Decoded

GROUP = 32  # values per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., G, 16] blocks and [..., G] scales -> [..., G * 32] values."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    blocks = blocks.to(torch.uint8)
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1)
    values = values.flatten(-2)  # [..., G, 32]: low nibble first
    exponents = scales.to(torch.int32) - 127
    return torch.ldexp(values, exponents.unsqueeze(-1)).to(dtype).flatten(-2)


def expert_view(name: str, expert: int, shape: tuple[int, int]) -> Decoded:
    """Expert `expert` of the MXFP4 weight `name` ([E, R, C] de-quantised) as an [R, C] tensor."""
    blocks, scales = f"{name}_blocks", f"{name}_scales"
    rows_total, cols_total = shape

    def read(raw, index):
        (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(index, shape))
        g0, g1 = c0 // GROUP, -(-c1 // GROUP)
        rows, groups = slice(r0, r1), slice(g0, g1)
        index = (expert, rows, groups)
        values = dequantize(raw(blocks, index), raw(scales, index))
        return values[:, c0 - g0 * GROUP:c1 - g0 * GROUP]

    return Decoded((rows_total, cols_total), (blocks, scales), read)


def stored_shape(blocks_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[E, R, C] of the weight whose `_blocks` have `blocks_shape` [E, R, C/32, 16]."""
    experts, rows, groups, _ = blocks_shape
    return experts, rows, groups * GROUP
