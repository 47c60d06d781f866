"""Regenerate a data set into one JSONL file (and optionally a feature cache), collectively over
the world: each replica takes its shard, resuming from its part file, rank 0 merges.

Features are captured while generating (`BatchGenerator` with taps) and written by each replica
leader's `FeatureCacheWriter`; the conversations a killed run had finished lost their features
with its writer, so a resume recomputes them from the exact token ids its part file kept.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_dflash.generation.batch import BatchGenerator, Sampling
from megatron_dflash.log import log_rank0, log_this_rank
from megatron_dflash.regeneration.conversations import Conversation
from megatron_dflash.regeneration.parts import (PartWriter, Replica, generation_replica,
                                                merge_parts, part_path, read_part)
from megatron_dflash.regeneration.settings import Settings, check_settings, record_settings
from megatron_dflash.regeneration.turns import ChatPrompts, regenerate
from megatron_dflash.training.progress import format_duration


class ProgressLine:
    """Rank 0's progress: conversations of its shard done/total, generated tokens/s, ETA."""

    def __init__(self, total: int, done: int, replicas: int, interval: float = 10.0):
        self.total, self.done, self.replicas, self.interval = total, done, replicas, interval
        self.start_done, self.tokens, self.start = done, 0, time.time()
        self.last = self.start

    def update(self, conversations: int, tokens: int, report: bool = True,
               force: bool = False) -> None:
        """Count; log when `report` and the interval has passed, or when `force`."""
        self.done += conversations
        self.tokens += tokens
        now = time.time()
        if not (force or (report and now - self.last >= self.interval)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        shard = f" (rank 0's shard of {self.replicas})" if self.replicas > 1 else ""
        log_rank0(f" regenerate | conversations: {self.done}/{self.total}{shard} |"
                  f" generated tokens/s: {self.tokens / elapsed:.1f} |"
                  f" ETA {format_duration(eta)}")


@dataclass
class FeatureOutput:
    """Where and how the regenerated conversations' taps go (`megatron_dflash.feature_cache`)."""

    directory: str
    manifest: dict
    """`cache_manifest(...)` of the target, taps, sequence length and dtype."""

    @property
    def seq_length(self) -> int:
        return self.manifest["seq_length"]


@contextlib.contextmanager
def _feature_writer(features: FeatureOutput | None, replica: Replica):
    """Each replica leader's FeatureCacheWriter (collective: every rank enters and leaves);
    replica 0's leader (rank 0) opens the cache first and publishes it last."""
    from megatron_dflash.feature_cache import FeatureCacheWriter

    if features is None:
        yield None
        return
    writer = (FeatureCacheWriter(features.directory, manifest=features.manifest,
                                 rank=replica.index) if replica.leader else None)
    first = dist.get_rank() == 0
    for turn in (True, False):  # rank 0 enters first, then the others
        if writer is not None and first == turn:
            writer.__enter__()
        dist.barrier()
    try:
        yield writer
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    for turn in (False, True):  # the others close, then rank 0 publishes
        if writer is not None and first == turn:
            writer.__exit__(None, None, None)
        dist.barrier()


def regenerate_to_file(generator: BatchGenerator, prompts: ChatPrompts,
                       conversations: Sequence[Conversation], output: str, *, batch_size: int,
                       max_new_tokens: int, sampling: Sampling = Sampling(),
                       last_turn_only: bool = False, features: FeatureOutput | None = None,
                       log_interval: float = 10.0, target: str | None = None,
                       flags: Mapping[str, str] | None = None) -> int:
    """Regenerate this replica's shard of `conversations` (resuming from its part file), then
    rank 0 merges every part into `output`; with `features`, also write the feature cache.
    Collective over the world. Returns the number of conversations in `output`.

    The run's `Settings` (from these arguments; `target`, the target's HF directory, adds its
    path and config.json hash) are recorded beside the part files; a resume with other settings
    raises `SettingsMismatch` before generating anything, naming each differing setting by
    `flags[field]` (default: the field name).
    """
    settings = Settings.of(prompts=prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           last_turn_only=last_turn_only, target=target,
                           manifest=None if features is None else features.manifest)
    recorded = check_settings(output, settings, flags)  # every rank, before anyone writes
    replica = generation_replica()
    path = part_path(output, replica.index)
    dist.barrier()
    if not recorded and dist.get_rank() == 0:
        record_settings(output, settings)
    done = read_part(path) if replica.leader else {}  # the leader cuts a torn line first
    dist.barrier()
    done = done or read_part(path)
    mine = [c for c in conversations if c.index % replica.count == replica.index]
    todo = [c for c in mine if c.id not in done]
    progress = ProgressLine(len(mine), len(mine) - len(todo), replica.count, log_interval)
    writer = PartWriter(path) if replica.leader else None
    try:
        with _feature_writer(features, replica) as cache:
            if features is not None:
                _rewrite_done_features(generator, cache, [c for c in mine if c.id in done],
                                       done, features, batch_size)
            for result in regenerate(generator, prompts, todo, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, sampling=sampling,
                                     last_turn_only=last_turn_only):
                conversation = result.conversation
                record = {"id": conversation.id, "index": conversation.index}
                if result.messages is None:
                    record["skipped"] = str(result.problem)
                    if replica.leader:
                        log_this_rank(f"regenerate: {conversation.where}: {result.problem} "
                                      "(skipped)")
                else:
                    record["messages"] = result.messages
                    if features is not None:
                        record |= {"tokens": result.tokens, "loss_mask": result.loss_mask}
                        if cache is not None:
                            _add(cache, conversation.id, result.tokens, result.loss_mask,
                                 result.features, features.seq_length)
                if writer is not None:
                    writer.write(record)
                progress.update(1, result.generated_tokens, report=result.ends_batch)
    finally:
        if writer is not None:
            writer.close()
    progress.update(0, 0, force=True)
    dist.barrier()
    written = merge_parts(output, conversations, replica.count) if dist.get_rank() == 0 else 0
    dist.barrier()
    return written


def _add(cache, sample_id, tokens, loss_mask, taps, seq_length) -> None:
    """One sample into the cache, truncated to the cache's sequence length."""
    cache.add(sample_id, torch.tensor(tokens[:seq_length]), torch.tensor(loss_mask[:seq_length]),
              taps[:seq_length])


def _rewrite_done_features(generator, cache, conversations, done, features, batch_size) -> None:
    """Taps of the conversations a killed run finished (their features died with its writer),
    recomputed from the exact token ids its part file kept."""
    kept = [c for c in conversations if done[c.id].get("messages") is not None]
    lacking = [c.id for c in kept if "tokens" not in done[c.id]]
    if lacking:
        raise ValueError(f"--offline-features: the part files hold conversations written without "
                         f"--offline-features (first: {lacking[0]!r}); their token ids are "
                         "unknown: remove the part files to start afresh")
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        sequences = [done[c.id]["tokens"][:features.seq_length] for c in batch]
        for c, taps in zip(batch, generator.taps(sequences)):
            if cache is not None:
                _add(cache, c.id, done[c.id]["tokens"], done[c.id]["loss_mask"], taps,
                     features.seq_length)
