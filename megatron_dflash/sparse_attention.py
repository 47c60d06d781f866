"""Block-sparse DFlash training attention: each block attends only to what it may see.

The dense training mask (masks.py) makes every layer score all N*B queries against all S + N*B
keys, although block j sees only its a_j context keys and its own B block keys: on average about
half the context and 1/N of the blocks (spec §5.2). Here the mask travels as its per-block
description, a `DFlashBlockMask` (anchors, keep, S, B), and `DFlashSparseAttention` (a drop-in
`core_attention` with the interface of megatron's DotProductAttention) computes only that work:

  * CUDA: torch FlexAttention with a `BlockMask` built once per forward and shared by all layers
    (128x128 tiles that no query of theirs may see are skipped);
  * CPU (FlexAttention has no CPU backward in torch 2.11, and inductor cannot compile its CPU
    kernels here): a gather implementation over chunks of consecutive blocks, each chunk scored
    against the context prefix its blocks may see plus its own block keys, so the cost follows
    sum_j (a_j + B) rather than N*B*(S + N*B). `sample_anchors` returns anchors ascending, which
    keeps every chunk's prefix tight; any order is still exact.

Both equal the dense path: masked entries get exactly zero probability in either.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_dflash.masks import block_context_lengths, block_visible

# Queries per chunk of the gather path: large enough for efficient matmuls, small enough that the
# chunk's context prefix stays close to each of its blocks' own.
GATHER_CHUNK_QUERIES = 256


@dataclasses.dataclass
class DFlashBlockMask:
    """The DFlash training mask as its per-block description, passed to the draft in place of the
    dense [b, 1, N*B, S+N*B] mask. `anchors`/`keep` are [b, N] as from `sample_anchors`; `dims`
    holds [S, B, N] as a tensor for `build_flex_block_mask`, made once with the mask (on the host,
    in preparation) and moved with it, not made on the device inside the step."""

    anchors: torch.Tensor
    keep: torch.Tensor
    seq_len: int
    block_size: int
    dims: torch.Tensor
    _flex: BlockMask | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return self.anchors.shape[1]

    def context_lengths(self) -> torch.Tensor:
        """[b, N] context positions each block sees (its anchor; 0 when unkept)."""
        return block_context_lengths(self.anchors, self.keep)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the mask carries to the device, by field name."""
        return {"anchors": self.anchors, "keep": self.keep, "dims": self.dims}

    def _map(self, fn) -> "DFlashBlockMask":
        return DFlashBlockMask(fn(self.anchors), fn(self.keep), self.seq_len, self.block_size,
                               fn(self.dims))

    def to(self, device, non_blocking: bool = False) -> "DFlashBlockMask":
        """A copy on `device` (what the training step does with every micro-batch entry)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "DFlashBlockMask":
        """A copy in pinned host memory (what the prefetcher does with every micro-batch entry),
        so that `to(cuda, non_blocking=True)` is asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    def flex_block_mask(self) -> BlockMask:
        """The FlexAttention BlockMask, built on first use and then shared by every layer
        (compiled on CUDA: eager, `create_block_mask` materialises the whole mask)."""
        if self._flex is None:
            create = _compiled(create_block_mask) if self.anchors.is_cuda else create_block_mask
            self._flex = build_flex_block_mask(self, create)
        return self._flex


def build_flex_block_mask(mask: DFlashBlockMask, create=create_block_mask) -> BlockMask:
    """`create(mask_mod, ...)` for a DFlash mask (`create`: `create_block_mask`, maybe compiled).

    Everything that varies between micro-batches reaches `mask_mod` as tensors (the context
    lengths, and S, B, N in `dims`), never as Python constants of a closure, so a compiled
    `create` is traced once per padded shape (b, N, S) and reused after (`prepare_microbatch`
    fixes N, the data pipeline S), instead of recompiling each micro-batch until dynamo's limit
    sends it to eager. FlexAttention pads Q_LEN up to its 128-token tiles, so `mask_mod` also sees
    query indices past N*B: their block index is clamped before the lookup and ANDed with `< N`
    (SpecForge PR #501/#511).
    """
    n, s, bs = mask.num_blocks, mask.seq_len, mask.block_size
    return create(_dflash_mask_mod(mask.context_lengths(), mask.dims),
                  B=mask.anchors.shape[0], H=None, Q_LEN=n * bs, KV_LEN=s + n * bs,
                  device=mask.anchors.device)


def _dflash_mask_mod(context_lengths: torch.Tensor, dims: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        seq_len, block_size, n = dims.unbind()
        q_block = q_idx // block_size
        visible = block_visible(context_lengths[b, torch.minimum(q_block, n - 1)], q_block,
                                kv_idx, seq_len, block_size)
        return visible & (q_block < n)

    return mask_mod


def dflash_block_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int,
                      block_size: int) -> DFlashBlockMask:
    """The sparse counterpart of `masks.dflash_attention_mask` (same arguments)."""
    if anchors.shape != keep.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and keep {tuple(keep.shape)} must both "
                         "be [b, N]")
    dims = torch.tensor([seq_len, block_size, anchors.shape[1]], device=anchors.device)
    return DFlashBlockMask(anchors, keep.bool(), int(seq_len), int(block_size), dims)


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process. Eager, FlexAttention and `create_block_mask` materialise
    the full [N*B, S+N*B] score / mask matrices; compiled, they work tile by tile (on CPU,
    inductor cannot compile them in torch 2.11, and FlexAttention has no backward)."""
    return torch.compile(fn)


def flex_block_attention(query, key, value, mask: DFlashBlockMask, scale: float) -> torch.Tensor:
    """[b, np, N*B, hn] x [b, ng, S+N*B, hn] -> [b, np, N*B, hn] with FlexAttention (compiled on
    CUDA; eager elsewhere, forward only on CPU)."""
    attend = _compiled(flex_attention) if query.is_cuda else flex_attention
    return attend(query, key, value, block_mask=mask.flex_block_mask(), scale=scale,
                  enable_gqa=query.shape[1] != key.shape[1])


def gather_block_attention(query, key, value, mask: DFlashBlockMask, scale: float,
                           chunk_queries: int = GATHER_CHUNK_QUERIES) -> torch.Tensor:
    """Same contract as `flex_block_attention`, with plain tensor ops (any device, autograd).

    GQA is a broadcast over a `rep` axis, so K/V are never repeated. Softmax runs in fp32 over
    [context prefix ; own block] per chunk of consecutive blocks.
    """
    b, num_heads, num_q, hn = query.shape
    groups, s, bs = key.shape[1], mask.seq_len, mask.block_size
    n = mask.num_blocks
    if num_q != n * bs or key.shape[2] != s + num_q:
        raise ValueError(f"query length {num_q} / key length {key.shape[2]} do not match the "
                         f"mask ({n} blocks of {bs}, context {s})")
    rep = num_heads // groups
    q = query.reshape(b, groups, rep, n, bs, hn)
    k_ctx, v_ctx = key[:, :, None, :s], value[:, :, None, :s]  # [b, ng, 1, S, hn]
    k_blk = key[:, :, s:].reshape(b, groups, 1, n, bs, hn)
    v_blk = value[:, :, s:].reshape(b, groups, 1, n, bs, hn)
    ctx_len = mask.context_lengths()
    per_chunk = max(1, chunk_queries // bs)
    outputs = []
    for start, prefix in zip(range(0, n, per_chunk), chunk_prefixes(ctx_len, per_chunk)):
        blocks = slice(start, min(start + per_chunk, n))
        qc = q[:, :, :, blocks]  # [b, ng, rep, g, B, hn]
        g = qc.shape[3]
        own = qc @ k_blk[:, :, :, blocks].transpose(-1, -2)  # [b, ng, rep, g, B, B]
        ctx = (qc.flatten(3, 4) @ k_ctx[:, :, :, :prefix].transpose(-1, -2))
        ctx = ctx.view(b, groups, rep, g, bs, prefix)
        hidden = (torch.arange(prefix, device=query.device)
                  >= ctx_len[:, None, None, blocks, None, None])
        ctx = ctx.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(torch.cat([ctx, own], dim=-1).float() * scale, dim=-1)
        probs = probs.to(query.dtype)
        p_ctx, p_own = probs.split([prefix, bs], dim=-1)
        out = (p_ctx.flatten(3, 4) @ v_ctx[:, :, :, :prefix]).view(b, groups, rep, g, bs, hn)
        outputs.append(out + p_own @ v_blk[:, :, :, blocks])
    return torch.cat(outputs, dim=3).reshape(b, num_heads, num_q, hn)


def chunk_prefixes(context_lengths: torch.Tensor, per_chunk: int) -> list[int]:
    """The context prefix each chunk of `per_chunk` consecutive blocks scores against: the most
    any of its blocks sees. Its shapes depend on the data, read on the host: the gather path
    serves CPU tensors, where that waits for nothing (CUDA runs FlexAttention)."""
    b, n = context_lengths.shape
    chunks = -(-n // per_chunk)
    padded = F.pad(context_lengths, (0, chunks * per_chunk - n))
    return padded.view(b, chunks, per_chunk).amax(dim=(0, 2)).tolist()


class DFlashSparseAttention(MegatronModule):
    """`core_attention` for the draft layer spec (`get_dflash_layer_spec(attention="sparse")`).

    Same constructor and forward contract as megatron's DotProductAttention: query
    [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np*hn]. `attention_mask` is a
    `DFlashBlockMask` in training, or None (no mask: inference). FlexAttention serves CUDA
    tensors, the gather implementation the rest.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"sparse DFlash attention has no attention dropout (got {dropout})")
        if config.context_parallel_size != 1:
            raise ValueError("sparse DFlash attention does not support context parallelism")
        if config.softmax_type != "vanilla":
            raise ValueError(f"sparse DFlash attention supports softmax_type='vanilla' only, "
                             f"not {config.softmax_type!r}")
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("sparse DFlash attention takes neither attention_bias nor packed "
                             "sequences")
        sq, b, num_heads, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = num_heads != key.shape[2]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        elif isinstance(attention_mask, DFlashBlockMask):
            attend = flex_block_attention if q.is_cuda else gather_block_attention
            out = attend(q, k, v, attention_mask, self.softmax_scale)
        else:
            raise TypeError("sparse DFlash attention takes a DFlashBlockMask (dflash_block_mask"
                            f"(...)) or None, not {type(attention_mask).__name__}; the dense "
                            "mask goes with get_dflash_layer_spec(attention='dense')")
        return out.permute(2, 0, 1, 3).reshape(sq, b, num_heads * hn)
