"""Sequence packing (`--pack-sequences`): consecutive conversations share one row, each still a
document of its own.

Unpacked, every conversation is padded to the micro-batch's length, and with long `--seq-length`
most of what the target and the draft compute is padding. Packed, a row takes whole conversations,
in the sampler's order, while they fit in `--seq-length` tokens (greedily; a conversation is never
split), so only the last one's remainder is padding. The row keeps its documents' lengths: the
target sees each document alone (megatron's THD packed sequences, `packed_sequences.py`), no
anchor's block crosses a boundary and every block sees only its own document's context, at
document-relative positions (`anchors.py`, `masks.py`): a packed row trains exactly as its
conversations would unpacked.

Only lengths decide the packing (`sample_lengths`, read from the datasets' indexes), so every
rank packs the same global stream without reading the others' samples.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset

from megatron_dflash.data.dataset import epoch_order


def sample_lengths(dataset) -> np.ndarray:
    """Every sample's length in tokens: from the dataset's own index where it keeps one (its
    `sample_lengths()`), through subsets and concatenations, else by reading each sample."""
    if isinstance(dataset, Subset):
        return sample_lengths(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([sample_lengths(d) for d in dataset.datasets])
    if hasattr(dataset, "sample_lengths"):
        return np.asarray(dataset.sample_lengths(), dtype=np.int64)
    return np.array([len(dataset[i]["tokens"]) for i in range(len(dataset))], dtype=np.int64)


class PackingSampler:
    """Rows of whole conversations for one data-parallel rank: endless, deterministic, resumable.

    The conversations come as `ResumableSampler` orders them (a seeded permutation per epoch), the
    epochs one stream; each row takes the next ones while their lengths sum to at most
    `seq_length` (at least one). A step is `micro_batch_size` rows for each data-parallel rank,
    dealt in rank order from that one stream, which every rank packs alike from `lengths`.

    `consumed_samples` counts conversations over all data-parallel ranks, as ResumableSampler's
    does, so a run restarted with a checkpoint's count packs exactly the rows it would have packed
    next. `position` is the stream index of this rank's first conversation in the last yielded
    micro-batch (what seeds its anchors, `training.step.anchor_generator`).
    """

    def __init__(self, lengths, seq_length: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, seed: int = 0,
                 consumed_samples: int = 0, shuffle: bool = True):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("no samples to pack")
        longest = int(self.lengths.max())
        if longest > seq_length:
            raise ValueError(f"a {longest}-token sample does not fit a packed row of "
                             f"--seq-length {seq_length}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in "
                             f"[0, {data_parallel_size})")
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.rank, self.ranks = data_parallel_rank, data_parallel_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed_samples = consumed_samples
        self.position = consumed_samples
        self._epoch, self._order = None, None

    def _sample(self, index: int) -> int:
        """The dataset index at stream position `index`."""
        epoch, offset = divmod(index, len(self.lengths))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(len(self.lengths), self.seed, epoch, self.shuffle)
        return self._order[offset]

    def _row(self, start: int) -> list[int]:
        """The dataset indices of the row that starts at stream position `start`."""
        row, used = [], 0
        while True:
            sample = self._sample(start + len(row))
            if row and used + self.lengths[sample] > self.seq_length:
                return row
            row.append(sample)
            used += int(self.lengths[sample])

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            rows, firsts, index = [], [], self.consumed_samples
            for _ in range(self.micro_batch_size * self.ranks):
                firsts.append(index)
                rows.append(self._row(index))
                index += len(rows[-1])
            mine = self.rank * self.micro_batch_size
            self.position, self.consumed_samples = firsts[mine], index
            yield rows[mine:mine + self.micro_batch_size]


def pack_samples(samples: list[dict]) -> tuple[dict, list[int]]:
    """One row of `samples` (each {"tokens", "loss_mask"[, "features"]} [T_i, ...]), every
    per-token field concatenated, and its documents: the samples' lengths in order."""
    return ({key: torch.cat([s[key] for s in samples]) for key in samples[0]},
            [len(s["tokens"]) for s in samples])
