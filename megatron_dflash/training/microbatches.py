"""This data-parallel rank's micro-batches, prepared (anchors drawn) from the resumable sampler."""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from megatron_dflash import context_parallel, feature_cache
from megatron_dflash.data.dataset import ResumableSampler, collate
from megatron_dflash.data.packing import PackingSampler, pack_samples, sample_lengths
from megatron_dflash.fp8 import sequence_multiple
from megatron_dflash.run.plan import Plan
from megatron_dflash.training.prefetch import Prefetcher
from megatron_dflash.training.step import anchor_generator, prepare_microbatch


def sequence_buckets(seq_length: int, count: int, multiple: int) -> list[int]:
    """`count` evenly spaced padded lengths up to `seq_length`, each rounded up to `multiple`."""
    return sorted({-(-(seq_length * (i + 1) // count) // multiple) * multiple
                   for i in range(count)})


class MicroBatches:
    """Micro-batches of `dataset` for this data-parallel rank, from `consumed_samples` on.

    Sequences are padded to the smallest of `--seq-length-buckets` fixed lengths that holds the
    micro-batch (one bucket: always `--seq-length`), each a multiple of what sequence
    parallelism and the target's and draft's FP8 GEMMs need, so compiled attention sees one shape
    per bucket; the block tokens (N * block_size) are padded to what the draft's GEMMs need (and,
    for DFlash2 under sequence parallelism, to whole blocks on every rank). Under context
    parallelism every CP rank prepares the same samples (its data-parallel rank's) and keeps its
    share of the blocks; lengths split into 2CP equal chunks (`context_parallel`).

    `--pack-sequences` (`pack`, default the plan's): each micro-batch row holds consecutive whole
    conversations (`data.packing.PackingSampler`), their boundaries carried to the anchors, the
    masks, the positions and the target (`prepare_microbatch(documents=...)`);
    `consumed_samples` still counts conversations.
    """

    def __init__(self, dataset, plan: Plan, pad_id: int, consumed_samples: int,
                 shuffle: bool = True, seed: int | None = None, pack: bool | None = None):
        run = plan.run
        self.dataset, self.cfg, self.pad_id = dataset, plan.dflash, pad_id
        self.seed = run.training.seed if seed is None else seed
        tp, sp = run.parallel.tensor_model_parallel_size, run.parallel.sequence_parallel
        cp = run.parallel.context_parallel_size
        self.buckets = sequence_buckets(
            run.data.seq_length, run.data.seq_length_buckets, context_parallel.sequence_multiple(
                sequence_multiple(tp, sp, plan.draft_fp8, plan.target.fp8), cp))
        self.block_multiple = sequence_multiple(tp, sp, plan.draft_fp8)
        if sp and plan.dflash.draft_variant == "dflash2":  # each SP shard: whole blocks (conv.py)
            self.block_multiple = math.lcm(self.block_multiple, plan.dflash.block_size * tp)
        self.attention = plan.attention
        self.cp_share = (parallel_state.get_context_parallel_rank(), cp)
        self.pack = run.data.pack_sequences if pack is None else pack
        layout = (run.training.micro_batch_size, parallel_state.get_data_parallel_rank(),
                  parallel_state.get_data_parallel_world_size())
        if self.pack:
            self.sampler = PackingSampler(sample_lengths(dataset), run.data.seq_length, *layout,
                                          seed=self.seed, consumed_samples=consumed_samples,
                                          shuffle=shuffle)
        else:
            self.sampler = ResumableSampler(len(dataset), *layout, seed=self.seed,
                                            consumed_samples=consumed_samples, shuffle=shuffle)
        self._it = iter(self.sampler)

    def next(self) -> dict:
        s, documents = self.sampler, None
        if self.pack:
            rows = [pack_samples([self.dataset[i] for i in row]) for row in next(self._it)]
            samples, documents = [row for row, _ in rows], [docs for _, docs in rows]
            position = s.position
        else:
            samples = [self.dataset[i] for i in next(self._it)]
            position = s.consumed_samples - s.step + s.rank * s.micro_batch_size
        batch = collate(samples, self.pad_id, buckets=self.buckets)
        features = None  # the offline cache's taps, padded as the tokens are
        if "features" in samples[0]:
            features = feature_cache.pad_features(samples, batch["tokens"].shape[1])
        return prepare_microbatch(batch["tokens"], batch["loss_mask"], self.cfg,
                                  anchor_generator(self.seed, position), self.attention,
                                  self.block_multiple, batch["lengths"], features,
                                  self.cp_share, documents)

    def prefetcher(self, device: torch.device, depth: int = 2) -> Prefetcher:
        """These micro-batches prepared `depth` ahead, each with the consumed-sample count after
        it."""
        return Prefetcher(lambda: (self.next(), self.sampler.consumed_samples), device, depth)
