"""Datasets of tokenised conversations, the resumable sampler, collation and held-out splits.

Every dataset yields {"tokens": LongTensor[S_i], "loss_mask": BoolTensor[S_i]}.

On-disk form (written by tools/preprocess_data.py with megatron-core's IndexedDatasetBuilder):
two IndexedDatasets with a common prefix, one sequence (= one document) per conversation,
  PREFIX.{bin,idx}            tokens, in the smallest dtype that holds the vocabulary
  PREFIX_loss_mask.{bin,idx}  loss mask, uint8
so PREFIX alone is a plain megatron token dataset, and the mask costs one byte per token.
"""
from __future__ import annotations

import multiprocessing
import os
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from megatron.core.datasets.indexed_dataset import (DType, IndexedDataset, IndexedDatasetBuilder,
                                                    get_bin_path, get_idx_path)
from torch.utils.data import ConcatDataset, Dataset, Subset

from megatron_dflash.data.conversations import (NO_SUPERVISED, TRUNCATED, DataReport, SampleError,
                                                iter_lines, parse_line)
from megatron_dflash.data.tokenize import ChatTokenizer, Tokenized

LOSS_MASK_SUFFIX = "_loss_mask"


def encode_line(tokenizer: ChatTokenizer, seq_length: int, raw: bytes) -> Tokenized:
    """One JSONL line -> Tokenized, or SampleError (a ChatTemplateError propagates: setup bug)."""
    sample = tokenizer.encode(parse_line(raw), seq_length)
    if not any(sample.loss_mask):
        raise SampleError(NO_SUPERVISED, f"{sample.full_length} tokens, seq_length {seq_length}")
    return sample


_worker_encode = None  # set once per pool worker, so the tokenizer is not pickled per task


def _init_worker(tokenizer, seq_length):
    global _worker_encode
    _worker_encode = partial(encode_line, tokenizer, seq_length)


def _encode_item(item, encode=None):
    path, lineno, raw = item
    try:
        return path, lineno, (encode or _worker_encode)(raw)
    except SampleError as e:
        return path, lineno, e


def encode_files(paths: Iterable[str], tokenizer: ChatTokenizer, seq_length: int,
                 report: DataReport, workers: int = 1) -> Iterator[Tokenized]:
    """Usable samples of JSONL files in file order; every problem goes to `report`.

    With workers > 1 lines are encoded in a process pool (order preserved).
    """
    paths = list(paths)
    report.files += paths
    items = iter_lines(paths)
    if workers > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (tokenizer, seq_length))
        results = pool.imap(_encode_item, items, chunksize=32)
    else:
        pool = None
        results = map(partial(_encode_item, encode=partial(encode_line, tokenizer, seq_length)), items)
    try:
        for path, lineno, result in results:
            report.read += 1
            if isinstance(result, SampleError):
                report.add(path, lineno, result.kind, result.detail)
                continue
            if result.truncated:
                report.add(path, lineno, TRUNCATED,
                           f"{result.full_length} tokens > seq_length {seq_length}")
            report.kept += 1
            yield result
    finally:
        if pool is not None:
            pool.terminate()


def _sample(tokens, loss_mask) -> dict:
    return {"tokens": torch.as_tensor(np.asarray(tokens, dtype=np.int64)),
            "loss_mask": torch.as_tensor(np.asarray(loss_mask, dtype=bool))}


class ConversationDataset(Dataset):
    """JSONL conversations tokenised in memory; `report` says what was skipped or truncated."""

    def __init__(self, paths: str | Iterable[str], tokenizer: ChatTokenizer, seq_length: int,
                 workers: int = 1):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.report = DataReport()
        self.samples = [_sample(s.tokens, s.loss_mask)
                        for s in encode_files(paths, tokenizer, seq_length, self.report, workers)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        return self.samples[idx]


class IndexedConversationDataset(Dataset):
    """A dataset written by tools/preprocess_data.py (layout: module docstring).

    `seq_length` truncates on read, for training shorter than the preprocessing length; a
    sample whose assistant tokens all lie beyond it then has an all-zero loss mask.
    """

    def __init__(self, prefix: str, seq_length: int | None = None):
        self.tokens = IndexedDataset(prefix)
        self.loss_mask = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise ValueError(f"{prefix}: token and loss-mask datasets do not match")
        self.seq_length = seq_length

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, idx):
        n = int(self.tokens.sequence_lengths[idx])
        if self.seq_length is not None:
            n = min(n, self.seq_length)
        return _sample(self.tokens.get(idx, 0, n), self.loss_mask.get(idx, 0, n))

    def sample_lengths(self) -> np.ndarray:
        """Every sample's length in tokens as read (truncated), from the index alone."""
        lengths = self.tokens.sequence_lengths.astype(np.int64)
        return lengths if self.seq_length is None else np.minimum(lengths, self.seq_length)


def build_dataset(paths: str | Iterable[str], tokenizer: ChatTokenizer | None, seq_length: int,
                  workers: int = 1) -> tuple[Dataset, DataReport | None]:
    """Training reads either form: each path is an indexed prefix or a JSONL file.

    JSONL files are tokenised together (their DataReport is returned; None when there are none).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    indexed = [p for p in paths if IndexedDataset.exists(p)]
    jsonl = [p for p in paths if p not in indexed]
    parts = [IndexedConversationDataset(p, seq_length) for p in indexed]
    report = None
    if jsonl:
        if tokenizer is None:
            raise ValueError(f"JSONL data {jsonl} needs a tokenizer")
        conversations = ConversationDataset(jsonl, tokenizer, seq_length, workers)
        parts.append(conversations)
        report = conversations.report
    return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), report


def write_indexed_dataset(prefix: str, samples: Iterable[Tokenized], vocab_size: int) -> int:
    """Write samples as PREFIX{,_loss_mask}.{bin,idx}; returns the number written.

    All four files are written under temporary names and renamed only when complete, so a
    failure (or an empty result, a ValueError) leaves nothing half-written at PREFIX.
    """
    tmp = f"{prefix}.partial-{os.getpid()}"
    stems = [(tmp, prefix), (tmp + LOSS_MASK_SUFFIX, prefix + LOSS_MASK_SUFFIX)]
    tokens = IndexedDatasetBuilder(get_bin_path(tmp), dtype=DType.optimal_dtype(vocab_size))
    masks = IndexedDatasetBuilder(get_bin_path(tmp + LOSS_MASK_SUFFIX), dtype=np.uint8)
    count = 0
    try:
        for s in samples:
            tokens.add_document(s.tokens, [len(s.tokens)])
            masks.add_document(s.loss_mask, [len(s.loss_mask)])
            count += 1
        if count == 0:
            raise ValueError("no usable conversations: nothing written")
        tokens.finalize(get_idx_path(tmp))
        masks.finalize(get_idx_path(tmp + LOSS_MASK_SUFFIX))
    except BaseException:
        for builder in (tokens, masks):
            builder.data_file.close()
        for stem, _ in stems:
            for path in (get_bin_path(stem), get_idx_path(stem)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    for stem, final in stems:
        os.replace(get_bin_path(stem), get_bin_path(final))
        os.replace(get_idx_path(stem), get_idx_path(final))
    return count


def epoch_order(total_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The samples of `epoch` in the samplers' order: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(total_samples))
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(total_samples, generator=torch.Generator().manual_seed(state)).tolist()


class ResumableSampler:
    """Megatron-style batch sampler: a fresh seeded permutation per epoch, endless.

    `consumed_samples` counts samples over all data-parallel ranks (as Megatron's does), so a run
    restarted with the checkpoint's count yields exactly the micro-batches the old run would have
    yielded next. Each step of micro_batch_size x dp_size indices is split into contiguous
    per-rank slices; the incomplete last step of an epoch is dropped.
    """

    def __init__(self, total_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, seed: int = 0, consumed_samples: int = 0,
                 shuffle: bool = True):
        self.step = micro_batch_size * data_parallel_size
        self.per_epoch = total_samples - total_samples % self.step
        if self.per_epoch == 0:
            raise ValueError(f"{total_samples} samples cannot fill one step of micro-batch "
                             f"{micro_batch_size} x data-parallel {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples % self.step:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of "
                             f"micro-batch x data-parallel = {self.step}")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, offset = divmod(self.consumed_samples, self.per_epoch)
            order = epoch_order(self.total_samples, self.seed, epoch, self.shuffle)
            for start in range(offset, self.per_epoch, self.step):
                first = start + self.rank * self.micro_batch_size
                self.consumed_samples += self.step
                yield order[first:first + self.micro_batch_size]


def collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int = 1,
            buckets: list[int] | None = None) -> dict:
    """Right-pad to the longest sample, rounded up to a multiple (sequence parallel needs S % TP
    == 0, FP8 GEMMs 16 or 32 tokens), or to the smallest of the fixed lengths `buckets` that
    holds it; padding has loss_mask 0. `lengths` [b] keeps each sample's own length."""
    length = max(len(s["tokens"]) for s in samples)
    if buckets is not None:
        fits = [b for b in buckets if b >= length]
        if not fits:
            raise ValueError(f"a {length}-token sample exceeds the longest bucket {max(buckets)}")
        length = min(fits)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    tokens = pad_to([s["tokens"].long() for s in samples], length, pad_id)
    loss_mask = pad_to([s["loss_mask"].bool() for s in samples], length, False)
    return {"tokens": tokens, "loss_mask": loss_mask,
            "lengths": torch.tensor([len(s["tokens"]) for s in samples])}


def pad_to(sequences: list[torch.Tensor], length: int, value) -> torch.Tensor:
    """[b, length, ...]: `sequences` (each [n_i, ...], n_i <= length) right-padded with `value`."""
    out = pad_sequence(sequences, batch_first=True, padding_value=value)
    return F.pad(out, (0, 0) * (out.dim() - 2) + (0, length - out.shape[1]), value=value)


def split_indices(n: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index lists, each ascending; held-out gets
    round(n * fraction) items, at least one when fraction > 0, and train keeps at least one."""
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held-out fraction {held_out_fraction} must be in [0, 1)")
    k = max(round(n * held_out_fraction), 1 if held_out_fraction > 0 else 0)
    if k >= n and n > 0:
        raise ValueError(f"{n} samples are too few to hold out a fraction of {held_out_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def held_out_split(dataset: Dataset, held_out_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train, held-out) subsets of `dataset` by `split_indices`."""
    train, held_out = split_indices(len(dataset), held_out_fraction, seed)
    return Subset(dataset, train), Subset(dataset, held_out)
