"""megatron-core's GatedDeltaNet as a target layer on the local backend, and its weights from the
two Hugging Face layouts (Qwen3-Next, Qwen3.5/3.6).

The layer. megatron ships a GDN spec only for Transformer Engine (`get_gated_delta_net_module_spec`:
the input norm fused into `in_proj`, a TENorm `out_norm` that then turns zero-centred too). The
local spec here is megatron's own `GatedDeltaNet` with a `ColumnParallelLinear` in_proj, a plain
(not zero-centred) `LocalRMSNorm` out_norm — HF's gated norm scales by w, unlike every other
Qwen3-Next/3.5 norm — and a `RowParallelLinear` out_proj; the layer's input norm stays a separate
(zero-centred) `LocalRMSNorm`. Its kernels are flash-linear-attention's on a GPU and
transformers' pure-torch ones on a CPU (`megatron_dflash.cpu`).

The weights. megatron's `in_proj` rows on TP rank t are `[Q_t | K_t | V_t | Z_t | B_t | A_t]`
(the rank's key heads for Q and K, its value heads for V, Z, B and A, each head-major), and
`conv1d` channels `[Q_t | K_t | V_t]`; `A_log`, `dt_bias` and `out_proj` are split by value
head, `out_norm` is replicated. Qwen3.5 stores `in_proj_qkv` = [Q | K | V], `in_proj_z`,
`in_proj_b`, `in_proj_a`; Qwen3-Next groups the rows by key head: `in_proj_qkvz` is
[Hk, (dk | dk | r·dv | r·dv)] and `in_proj_ba` [Hk, (r | r)] with r = Hv / Hk (a key head's r
value heads are consecutive, as megatron's repeat_interleave pairs them). Every read takes only
the rank's rows.
"""
from __future__ import annotations

import torch
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash.layers import LocalRMSNorm
from megatron_dflash.targets.family import Row

# HF's in_proj tensors per layout: Qwen3.5's separate projections, Qwen3-Next's per-key-head groups.
IN_PROJ = {"split": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
           "grouped": ("in_proj_qkvz", "in_proj_ba")}


def local_spec() -> ModuleSpec:
    """megatron's GatedDeltaNet with local-backend linears and a plain RMSNorm on its output."""
    return ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear,
        out_norm=ModuleSpec(module=LocalRMSNorm, params={"zero_centered_gamma": False}),
        out_proj=RowParallelLinear))


def rows(layout: str) -> list[Row]:
    """One GDN layer's input norm and mixer rows, both sides named relative to the layer."""
    attn = "linear_attn."
    return [
        ("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
        ("self_attention.in_proj.weight", tuple(f"{attn}{p}.weight" for p in IN_PROJ[layout]),
         f"gdn_in_proj_{layout}"),
        ("self_attention.conv1d.weight", (f"{attn}conv1d.weight",), "gdn_conv"),
        ("self_attention.A_log", (f"{attn}A_log",), "columns"),
        ("self_attention.dt_bias", (f"{attn}dt_bias",), "columns"),
        ("self_attention.out_norm.weight", (f"{attn}norm.weight",), "replicated"),
        ("self_attention.out_proj.weight", (f"{attn}out_proj.weight",), "rows"),
    ]


def hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each GDN tensor, by its name's last two parts."""
    c, hidden = config, config.hidden_size
    qk, v = c.linear_num_key_heads * c.linear_key_head_dim, _value_dim(c)
    heads, r = c.linear_num_value_heads, c.linear_num_value_heads // c.linear_num_key_heads
    return {
        "in_proj_qkv.weight": (2 * qk + v, hidden), "in_proj_z.weight": (v, hidden),
        "in_proj_b.weight": (heads, hidden), "in_proj_a.weight": (heads, hidden),
        "in_proj_qkvz.weight": (2 * qk + 2 * v, hidden),
        "in_proj_ba.weight": (c.linear_num_key_heads * 2 * r, hidden),
        "conv1d.weight": (2 * qk + v, 1, c.linear_conv_kernel_dim),
        "linear_attn.A_log": (heads,), "linear_attn.dt_bias": (heads,),
        "norm.weight": (c.linear_value_head_dim,), "out_proj.weight": (hidden, v),
    }


def converters(config: TransformerConfig, rank: int, size: int) -> dict:
    """The GDN conversions for TP rank `rank` of `size` (module docstring)."""
    c = config
    qk, v = c.linear_num_key_heads * c.linear_key_head_dim, _value_dim(c)

    def part(checkpoint, key, start, width):
        """The rank's 1/size of rows [start, start + width) of `key`."""
        step = width // size
        return checkpoint.get_range(key, 0, start + rank * step, start + (rank + 1) * step)

    def qkv(checkpoint, key):
        return [part(checkpoint, key, 0, qk), part(checkpoint, key, qk, qk),
                part(checkpoint, key, 2 * qk, v)]

    def split(checkpoint, qkv_key, z, b, a):
        return torch.cat([*qkv(checkpoint, qkv_key),
                          *(checkpoint.get_shard(key, 0, rank, size) for key in (z, b, a))])

    def grouped(checkpoint, qkvz, ba):
        dk, r = c.linear_key_head_dim, c.linear_num_value_heads // c.linear_num_key_heads
        rv = r * c.linear_value_head_dim
        heads = c.linear_num_key_heads // size
        qkvz = checkpoint.get_shard(qkvz, 0, rank, size).reshape(heads, 2 * dk + 2 * rv, -1)
        ba = checkpoint.get_shard(ba, 0, rank, size).reshape(heads, 2 * r, -1)
        parts = [*qkvz.split([dk, dk, rv, rv], dim=1), *ba.split([r, r], dim=1)]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])

    return {"gdn_in_proj_split": split, "gdn_in_proj_grouped": grouped,
            "gdn_conv": lambda checkpoint, key: torch.cat(qkv(checkpoint, key))}


def check_tensor_parallel(hf, size: int) -> None:
    """megatron splits the GDN heads over TP (and asserts it): refuse a size that does not
    divide them, naming the field."""
    for field in ("linear_num_key_heads", "linear_num_value_heads"):
        if getattr(hf, field) % size:
            raise ValueError(f"{field}={getattr(hf, field)} is not divisible by the "
                             f"tensor-parallel size {size}: megatron's GatedDeltaNet splits its "
                             "heads over TP")


def _value_dim(config: TransformerConfig) -> int:
    return config.linear_num_value_heads * config.linear_value_head_dim
