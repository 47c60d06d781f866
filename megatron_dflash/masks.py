"""The DFlash attention masks (dflash_spec §5.2, dflash2_and_swa_spec §7): what each query sees.

Training packs many blocks into one forward. Keys are `[context 0..S-1 | block 0 | ... | block
N-1]`, queries are the N*B block slots. Block j must see exactly what it would see at inference,
where its anchor is the bonus token that has not yet been through the target: the context
strictly before the anchor (kv < a_j, never <=, since the anchor's own target features do not
exist yet), and its own B slots. Blocks never see each other, so overlapping blocks stay
independent. An unkept block sees only its own slots, which keeps its softmax rows finite (no
NaN x 0 in the gradient); its loss weight is 0.

A draft layer may also be causal within the block and/or sliding-window (`LayerAttention`, the
reference's `is_causal` and `sliding_window` per layer, spec §7.1-7.3): query slot i of a block
at anchor a sits at position P = a + i and sees key position k only if k <= P (causal) and
P - k < W (window), counted over context and block alike. The window never cuts a block (the
config keeps B <= W), so on the context it means a + i - W < k < a: later slots see less.

In a packed row (`--pack-sequences`, data/packing.py) the context also starts where the block's
document does: block j sees positions s_j <= k < a_j, s_j its anchor's document start, so it
sees exactly what it would in its conversation alone.

A block is fully described by its context range ([s_j, a_j); empty when unkept) and its index:
`block_context_lengths`, `block_context_starts` + `block_visible` are that description, from
which the dense masks are built here and the sparse ones in sparse_attention.py. A draft whose
layers differ takes one mask per kind of layer (`LayerMasks`, built once per kind, not per layer)
and each layer picks its own (`layer_mask`). At inference (no packed blocks) the same rule runs
on absolute positions (`position_masks`), as the reference's `_attention_mask` does.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """What one draft layer's attention sees beyond the DFlash rule (reference `is_causal` and
    `sliding_window` of the layer)."""

    causal: bool = False
    """Block slot i sees block slots <= i only (the context is always before it)."""
    window: int | None = None
    """Keys at most window-1 positions before the query (None: no window)."""


FULL = LayerAttention()


def block_context_lengths(anchors: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[b, N] how many leading context positions each block sees: its anchor, or 0 when unkept."""
    return torch.where(keep, anchors, 0)


def block_context_starts(document_starts: torch.Tensor, anchors: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
    """[b, N] the first context position each block sees in packed rows: its anchor's document
    start (`document_starts` [b, S]), or 0 when unkept."""
    return torch.where(keep, document_starts.gather(1, anchors), 0)


def block_visible(context_len, q_block, q_offset, kv_idx, seq_len: int, block_size: int,
                  causal=False, window=None, context_start=0) -> torch.Tensor:
    """Whether query slot `q_offset` of block `q_block` (which sees the context positions
    `context_start` <= k < `context_len`, so sits at position context_len + q_offset) sees key
    `kv_idx`. Elementwise over broadcastable tensors; `causal`/`window` are Python values or (for
    a compiled mask) tensors, a tensor window being the layer's window or any value past every
    distance (no window)."""
    block_key = kv_idx - seq_len
    own_block = (kv_idx >= seq_len) & (block_key // block_size == q_block)
    context = (kv_idx < context_len) & (kv_idx >= context_start)
    if window is not None:
        context = context & (context_len + q_offset - kv_idx < window)
    in_order = block_key % block_size <= q_offset
    if isinstance(causal, torch.Tensor):
        own_block = own_block & (~causal | in_order)
    elif causal:
        own_block = own_block & in_order
    return context | own_block


@dataclasses.dataclass
class LayerMasks:
    """Dense masks of a draft whose layers see differently: one [b, 1, Q, K] bool mask (True =
    masked) per kind of layer, None where nothing is masked. Moves like a micro-batch tensor."""

    masks: dict[LayerAttention, torch.Tensor | None]

    def for_layer(self, attention: LayerAttention) -> torch.Tensor | None:
        if attention not in self.masks:
            raise ValueError(f"no mask for a layer with {attention}: the masks were built for "
                             f"{list(self.masks)} (build them from the draft's layer_attentions())")
        return self.masks[attention]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the masks carry to the device, by kind index."""
        return {str(i): m for i, m in enumerate(self.masks.values()) if m is not None}

    def _map(self, fn) -> "LayerMasks":
        return LayerMasks({k: None if m is None else fn(m) for k, m in self.masks.items()})

    def to(self, device, non_blocking: bool = False) -> "LayerMasks":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "LayerMasks":
        return self._map(torch.Tensor.pin_memory)


def layer_mask(attention_mask, attention: LayerAttention):
    """The mask a layer of kind `attention` takes from the one the draft was given: its own from
    per-kind masks (`LayerMasks`, `DFlashBlockMask`); a plain tensor or None only serves a layer
    that is neither causal nor windowed."""
    if hasattr(attention_mask, "for_layer"):
        return attention_mask.for_layer(attention)
    if attention != FULL:
        raise ValueError(f"a draft layer with {attention} needs its own mask: build the masks "
                         "from the draft's layer_attentions() (a plain mask serves full, "
                         "non-causal layers only)")
    return attention_mask


def dflash_attention_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int,
                          block_size: int, layers=(FULL,),
                          context_starts: torch.Tensor | None = None):
    """Dense training mask [b, 1, N*B, S + N*B], bool, True = masked (megatron's convention), for
    a draft of full non-causal layers; `LayerMasks` with one such mask per kind of `layers`
    otherwise (the draft's `DFlashConfig.layer_attentions()`). `context_starts` [b, N]: where
    each block's context starts in packed rows (`block_context_starts`; default 0)."""
    n = anchors.shape[1]
    device = anchors.device
    q = torch.arange(n * block_size, device=device)
    q_block, q_offset = (q // block_size)[:, None], (q % block_size)[:, None]
    kv_idx = torch.arange(seq_len + n * block_size, device=device)
    context_len = block_context_lengths(anchors, keep)[:, q_block]
    start = 0 if context_starts is None else context_starts[:, q_block]
    masks = {kind: ~block_visible(context_len, q_block, q_offset, kv_idx, seq_len, block_size,
                                  kind.causal, kind.window, start)[:, None]
             for kind in dict.fromkeys(layers)}
    return masks[FULL] if list(masks) == [FULL] else LayerMasks(masks)


def position_masks(query_positions: torch.Tensor, key_positions: torch.Tensor,
                   layers) -> LayerMasks:
    """Inference masks from absolute positions ([b, Q] queries, [b, K] keys) for each kind of
    `layers`: the reference's `_attention_mask` (causal: k <= P; window W: P - k < W, and
    k - P < W where not causal); None for full non-causal layers, which see everything."""
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
    masks = {}
    for kind in dict.fromkeys(layers):
        if kind == FULL:
            masks[kind] = None
            continue
        visible = torch.ones_like(distance, dtype=torch.bool)
        if kind.causal:
            visible &= distance >= 0
        if kind.window is not None:
            visible &= distance < kind.window
            if not kind.causal:
                visible &= -distance < kind.window
        masks[kind] = ~visible
    return LayerMasks(masks)
