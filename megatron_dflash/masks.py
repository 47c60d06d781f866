"""The DFlash training attention mask (dflash_spec §5.2): many blocks packed into one forward.

Keys are `[context 0..S-1 | block 0 | ... | block N-1]`, queries are the N*B block slots. Block j
must see exactly what it would see at inference, where its anchor is the bonus token that has not
yet been through the target: the context strictly before the anchor (kv < a_j, never <=, since the
anchor's own target features do not exist yet), and its own B slots bidirectionally. Blocks never
see each other, so overlapping blocks stay independent. An unkept block sees only its own slots,
which keeps its softmax rows finite (no NaN x 0 in the gradient); its loss weight is 0.

A block is fully described by its context length (a_j, or 0 when unkept) and its index:
`block_context_lengths` + `block_visible` are that description, from which the dense mask is built
here and a sparse (flex attention) mask can be built later.
"""
from __future__ import annotations

import torch


def block_context_lengths(anchors: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[b, N] how many leading context positions each block sees: its anchor, or 0 when unkept."""
    return torch.where(keep, anchors, 0)


def block_visible(context_len: torch.Tensor, q_block: torch.Tensor, kv_idx: torch.Tensor,
                  seq_len: int, block_size: int) -> torch.Tensor:
    """Whether a query of block `q_block` (which sees `context_len` context positions) sees key
    `kv_idx`. Elementwise over broadcastable tensors."""
    own_block = (kv_idx >= seq_len) & ((kv_idx - seq_len) // block_size == q_block)
    return (kv_idx < context_len) | own_block


def dflash_attention_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int,
                          block_size: int) -> torch.Tensor:
    """Dense mask [b, 1, N*B, S + N*B], bool, True = masked (megatron's convention)."""
    n = anchors.shape[1]
    device = anchors.device
    q_block = torch.arange(n * block_size, device=device) // block_size
    kv_idx = torch.arange(seq_len + n * block_size, device=device)
    context_len = block_context_lengths(anchors, keep)[:, q_block]
    visible = block_visible(context_len[:, :, None], q_block[:, None], kv_idx, seq_len, block_size)
    return ~visible[:, None]
