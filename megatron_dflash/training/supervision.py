"""Refuse training data that holds no supervised block before anything is built: every step
would be a no-op (no response span long enough for a block)."""
from __future__ import annotations

import torch


def holds_block(loss_mask: torch.Tensor, block_size: int) -> bool:
    """Whether a sample has an anchor (a response token whose block fits in the sample) with a
    supervised slot after it: a response token among the next block_size - 1 (`anchors`)."""
    mask = loss_mask.bool()
    n = mask.shape[0] - block_size + 1
    if n <= 0:
        return False
    count = torch.cat([torch.zeros(1, dtype=torch.long), mask.long().cumsum(0)])  # before i
    ahead = count[block_size:block_size + n] - count[1:1 + n]  # responses in a+1 .. a+B-1
    return bool((mask[:n] & (ahead > 0)).any())


def check_supervised_blocks(dataset, block_size: int) -> None:
    """ValueError when no sample of `dataset` holds a block (stops at the first that does)."""
    for i in range(len(dataset)):
        if holds_block(dataset[i]["loss_mask"], block_size):
            return
    raise ValueError(f"--train-data: none of the {len(dataset)} training conversations holds a "
                     f"block of --block-size {block_size} tokens (a response token followed by "
                     f"another within {block_size - 1} tokens, and {block_size} tokens from it "
                     "to the end of the sample): every step would train nothing; use longer "
                     "answers or a smaller --block-size")
