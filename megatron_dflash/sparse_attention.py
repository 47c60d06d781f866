"""Block-sparse DFlash training attention: each block attends only to what it may see.

The dense training mask (masks.py) makes every layer score all N*B queries against all S + N*B
keys, although block j sees only its a_j context keys and its own B block keys: on average about
half the context and 1/N of the blocks (spec §5.2). Here the mask travels as its per-block
description, a `DFlashBlockMask` (anchors, keep, S, B; in packed rows each block's context start
too), and `DFlashSparseAttention` (a drop-in `core_attention` with the interface of megatron's
DotProductAttention) computes only that work:

  * CUDA: torch FlexAttention with a `BlockMask` built once per forward (per kind of layer) and
    shared by the layers (128x128 tiles that no query of theirs may see are skipped);
  * CPU (FlexAttention has no CPU backward in torch 2.11, and inductor cannot compile its CPU
    kernels here): a gather implementation over chunks of consecutive blocks, each chunk scored
    against the context prefix its blocks may see plus its own block keys, so the cost follows
    sum_j (a_j + B) rather than N*B*(S + N*B). `sample_anchors` returns anchors ascending, which
    keeps every chunk's prefix tight; any order is still exact. In packed rows a chunk's range
    starts at the earliest document start of its blocks.

A draft whose layers differ (causal and/or sliding-window layers, masks.py) shares one
`DFlashBlockMask`: its `layers` tensor holds each kind's (causal, window) as data, and
`for_layer` gives a layer the view of its kind, with its own BlockMask (built once per kind and
shared by that kind's layers) or, in the gather path, its window's shorter context range.

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

from megatron_dflash.masks import FULL, LayerAttention, block_context_lengths, block_visible

# Queries per chunk of the gather path: large enough for efficient matmuls, small enough that the
# chunk's context prefix stays close to each of its blocks' own.
GATHER_CHUNK_QUERIES = 256
# A compiled mask's "no window": farther than any query is from any key.
NO_WINDOW = 2 ** 40


@dataclasses.dataclass
class DFlashBlockMask:
    """The DFlash training mask as its per-block description, passed to the draft in place of the
    dense [b, 1, N*B, S+N*B] mask. `anchors`/`keep` are [b, N] as from `sample_anchors`; `dims`
    holds [S, B, N] and `layers` each kind of layer's [causal, window] (`kinds`, in that order)
    as tensors for `build_flex_block_mask`, made once with the mask (on the host, in preparation)
    and moved with it, not made on the device inside the step. `starts` [b, N]: in packed rows,
    each block's first context position (its document's start, `masks.block_context_starts`;
    None: 0). `layer` is the kind this view serves (`for_layer`); every view shares the
    BlockMasks built so far."""

    anchors: torch.Tensor
    keep: torch.Tensor
    seq_len: int
    block_size: int
    dims: torch.Tensor
    layers: torch.Tensor
    starts: torch.Tensor | None = None
    kinds: tuple[LayerAttention, ...] = (FULL,)
    layer: int = 0
    _flex: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return self.anchors.shape[1]

    @property
    def attention(self) -> LayerAttention:
        """The kind of layer this view serves."""
        return self.kinds[self.layer]

    def context_lengths(self) -> torch.Tensor:
        """[b, N] context positions each block sees (its anchor; 0 when unkept)."""
        return block_context_lengths(self.anchors, self.keep)

    def for_layer(self, attention: LayerAttention) -> "DFlashBlockMask":
        """The view for a layer of kind `attention`."""
        if attention not in self.kinds:
            raise ValueError(f"no mask for a layer with {attention}: the mask was built for "
                             f"{list(self.kinds)} (build it from the draft's layer_attentions())")
        return dataclasses.replace(self, layer=self.kinds.index(attention), _flex=self._flex)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the mask carries to the device, by field name."""
        starts = {} if self.starts is None else {"starts": self.starts}
        return {"anchors": self.anchors, "keep": self.keep, "dims": self.dims,
                "layers": self.layers, **starts}

    def _map(self, fn) -> "DFlashBlockMask":
        return DFlashBlockMask(fn(self.anchors), fn(self.keep), self.seq_len, self.block_size,
                               fn(self.dims), fn(self.layers),
                               None if self.starts is None else fn(self.starts), self.kinds,
                               self.layer)

    def to(self, device, non_blocking: bool = False) -> "DFlashBlockMask":
        """A copy on `device` (what the training step does with every micro-batch entry)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "DFlashBlockMask":
        """A copy in pinned host memory (what the prefetcher does with every micro-batch entry),
        so that `to(cuda, non_blocking=True)` is asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    def flex_block_mask(self) -> BlockMask:
        """This kind's FlexAttention BlockMask, built on first use and then shared by every layer
        of the kind (compiled on CUDA: eager, `create_block_mask` materialises the whole mask)."""
        if self.layer not in self._flex:
            create = _compiled(create_block_mask) if self.anchors.is_cuda else create_block_mask
            self._flex[self.layer] = build_flex_block_mask(self, create)
        return self._flex[self.layer]


def build_flex_block_mask(mask: DFlashBlockMask, create=create_block_mask) -> BlockMask:
    """`create(mask_mod, ...)` for a DFlash mask view (`create`: `create_block_mask`, maybe
    compiled).

    Everything that varies between micro-batches and layers reaches `mask_mod` as tensors (the
    context lengths and starts, S, B, N in `dims`, the layer's causality and window in `layers`),
    never as Python constants of a closure, so a compiled `create` is traced once per padded
    shape (b, N, S) and reused after by every micro-batch and every kind of layer
    (`prepare_microbatch` fixes N, the data pipeline S), instead of recompiling each micro-batch
    until dynamo's limit sends it to eager. FlexAttention pads Q_LEN up to its 128-token tiles, so
    `mask_mod` also sees query indices past N*B: their block index is clamped before the lookup
    and ANDed with `< N` (SpecForge PR #501/#511).
    """
    n, s, bs = mask.num_blocks, mask.seq_len, mask.block_size
    return create(_dflash_mask_mod(mask.context_lengths(), mask.starts, mask.dims,
                                   mask.layers[mask.layer]),
                  B=mask.anchors.shape[0], H=None, Q_LEN=n * bs, KV_LEN=s + n * bs,
                  device=mask.anchors.device)


def _dflash_mask_mod(context_lengths: torch.Tensor, context_starts: torch.Tensor | None,
                     dims: torch.Tensor, layer: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        seq_len, block_size, n = dims.unbind()
        causal, window = layer.unbind()
        q_block = q_idx // block_size
        block = torch.minimum(q_block, n - 1)
        visible = block_visible(context_lengths[b, block], q_block, q_idx % block_size, kv_idx,
                                seq_len, block_size, causal.bool(), window,
                                0 if context_starts is None else context_starts[b, block])
        return visible & (q_block < n)

    return mask_mod


def dflash_block_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int,
                      block_size: int, layers=(FULL,),
                      context_starts: torch.Tensor | None = None) -> DFlashBlockMask:
    """The sparse counterpart of `masks.dflash_attention_mask` (same arguments)."""
    if anchors.shape != keep.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and keep {tuple(keep.shape)} must both "
                         "be [b, N]")
    kinds = tuple(dict.fromkeys(layers))
    dims = torch.tensor([seq_len, block_size, anchors.shape[1]], device=anchors.device)
    per_kind = torch.tensor([[k.causal, NO_WINDOW if k.window is None else k.window]
                             for k in kinds], device=anchors.device)
    starts = None if context_starts is None else torch.where(keep.bool(), context_starts, 0)
    return DFlashBlockMask(anchors, keep.bool(), int(seq_len), int(block_size), dims, per_kind,
                           starts, kinds)


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
    [context range ; own block] per chunk of consecutive blocks; a sliding-window layer's range
    starts where the window of the chunk's earliest-anchored block does.
    """
    b, num_heads, num_q, hn = query.shape
    groups, s, bs = key.shape[1], mask.seq_len, mask.block_size
    n = mask.num_blocks
    if num_q != n * bs or key.shape[2] != s + num_q:
        raise ValueError(f"query length {num_q} / key length {key.shape[2]} do not match the "
                         f"mask ({n} blocks of {bs}, context {s})")
    causal, window = mask.attention.causal, mask.attention.window
    rep = num_heads // groups
    q = query.reshape(b, groups, rep, n, bs, hn)
    k_ctx, v_ctx = key[:, :, None, :s], value[:, :, None, :s]  # [b, ng, 1, S, hn]
    k_blk = key[:, :, s:].reshape(b, groups, 1, n, bs, hn)
    v_blk = value[:, :, s:].reshape(b, groups, 1, n, bs, hn)
    ctx_len = mask.context_lengths()
    per_chunk = max(1, chunk_queries // bs)
    offset = torch.arange(bs, device=query.device)[:, None]  # the query's slot in its block
    later = torch.ones(bs, bs, dtype=torch.bool, device=query.device).triu(1)
    ranges = zip(chunk_context_starts(ctx_len, per_chunk, window, mask.starts),
                 chunk_prefixes(ctx_len, per_chunk))
    outputs = []
    for start, (lo, hi) in zip(range(0, n, per_chunk), ranges):
        blocks = slice(start, min(start + per_chunk, n))
        qc = q[:, :, :, blocks]  # [b, ng, rep, g, B, hn]
        g = qc.shape[3]
        own = qc @ k_blk[:, :, :, blocks].transpose(-1, -2)  # [b, ng, rep, g, B, B]
        if causal:
            own = own.masked_fill(later, float("-inf"))
        lo = min(lo, hi)
        ctx = (qc.flatten(3, 4) @ k_ctx[:, :, :, lo:hi].transpose(-1, -2))
        ctx = ctx.view(b, groups, rep, g, bs, hi - lo)
        seen = ctx_len[:, None, None, blocks, None, None]
        position = torch.arange(lo, hi, device=query.device)
        hidden = position >= seen
        if mask.starts is not None:
            hidden = hidden | (position < mask.starts[:, None, None, blocks, None, None])
        if window is not None:
            hidden = hidden | (seen + offset - position >= window)
        ctx = ctx.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(torch.cat([ctx, own], dim=-1).float() * scale, dim=-1)
        probs = probs.to(query.dtype)
        p_ctx, p_own = probs.split([hi - lo, bs], dim=-1)
        out = (p_ctx.flatten(3, 4) @ v_ctx[:, :, :, lo:hi]).view(b, groups, rep, g, bs, hn)
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


def chunk_context_starts(context_lengths: torch.Tensor, per_chunk: int,
                         window: int | None, starts: torch.Tensor | None = None) -> list[int]:
    """The first context position any block of each chunk sees: from its document's start
    (`starts` [b, N], packed rows) and, through a sliding `window`, from a - W + 1 (its slot 0's
    reach); 0 for every chunk with neither."""
    b, n = context_lengths.shape
    chunks = -(-n // per_chunk)
    if window is None and starts is None:
        return [0] * chunks
    first = torch.zeros_like(context_lengths) if starts is None else starts
    if window is not None:
        first = torch.maximum(first, context_lengths - window + 1)
    first = torch.where(context_lengths > 0, first, NO_WINDOW)
    padded = F.pad(first.clamp_min(0), (0, chunks * per_chunk - n), value=NO_WINDOW)
    return padded.view(b, chunks, per_chunk).amin(dim=(0, 2)).tolist()


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
