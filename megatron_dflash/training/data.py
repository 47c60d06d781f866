"""The datasets a plan trains on: tokenised conversations (JSONL or indexed), or the target's taps
from the offline feature cache (written first when the cache does not exist yet)."""
from __future__ import annotations

import gc
import os

import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_dflash import context_parallel, feature_cache
from megatron_dflash.data.dataset import build_dataset
from megatron_dflash.data.tokenize import load_chat_tokenizer, tokenizer_spec
from megatron_dflash.fp8 import sequence_multiple
from megatron_dflash.log import log_last_rank
from megatron_dflash.run.config import RunConfig
from megatron_dflash.run.plan import DataPlan, Plan, TargetPlan
from megatron_dflash.training.builders import build_frozen_target


def build_data(run: RunConfig, data: DataPlan):
    """(training dataset, held-out dataset or None, pad id) from --train-data / --valid-data."""
    paths = data.train + (data.valid or [])
    needs_tokenizer = any(not IndexedDataset.exists(p) for p in paths)
    tokenizer = (load_chat_tokenizer(tokenizer_spec(run.target.tokenizer, run.target.target))
                 if needs_tokenizer else None)
    train, report = build_dataset(data.train, tokenizer, run.data.seq_length)
    if report is not None:
        log_last_rank(report.summary())
    train = _at_most(train, run.data.max_train_samples)
    valid = (build_dataset(data.valid, tokenizer, run.data.seq_length)[0] if data.valid
             else None)
    pad_id = tokenizer.pad_id if tokenizer else 0  # padding is never attended to nor supervised
    return train, valid, pad_id


def _at_most(dataset, count: int | None):
    if count:
        return torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    return dataset


def offline_features(run: RunConfig, target: TargetPlan, data: DataPlan, splits, pad_id: int,
                     device):
    """The (train, held-out or None) datasets read from the --offline-features cache. When
    `splits` (train, valid or None) are given, the cache does not exist yet: it is written first
    by the frozen target's forward (`feature_cache.write_feature_cache`, as
    tools/cache_features.py does), and the target is freed before the training models are
    built."""
    directory = data.offline_features
    manifest = feature_cache.cache_manifest(target.path, target.layer_ids, run.data.seq_length,
                                            data.offline_features_dtype)
    if splits is not None:
        write_cache(run, target, directory, manifest, splits, pad_id, device)
    train = feature_cache.FeatureCacheDataset(directory, manifest)
    log_last_rank(f"feature cache {directory}: {len(train)} samples, "
                  f"{train.manifest['num_tokens']} tokens (training from it builds no target "
                  "decoder layer)")
    valid = None
    if data.valid:
        valid = feature_cache.FeatureCacheDataset(
            os.path.join(directory, feature_cache.VALID_SPLIT), manifest)
    return _at_most(train, run.data.max_train_samples), valid


def write_cache(run: RunConfig, target: TargetPlan, directory: str, manifest: dict, splits,
                pad_id: int, device) -> None:
    """Write the feature cache of `splits` (train, valid or None) with the frozen target built
    up to its deepest tap; collective. The target is freed afterwards."""
    model = build_frozen_target(target, post_process=False, last_layer=max(target.layer_ids))
    feature_cache.write_feature_cache(
        directory, {"train": splits[0], **({"valid": splits[1]} if splits[1] else {})},
        model.to(device), target.layer_ids, manifest,
        micro_batch_size=run.training.micro_batch_size, pad_id=pad_id,
        pad_multiple=context_parallel.sequence_multiple(
            sequence_multiple(run.parallel.tensor_model_parallel_size,
                              run.parallel.sequence_parallel, target.fp8),
            run.parallel.context_parallel_size),
        log=log_last_rank)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_datasets(plan: Plan, device):
    """(train, held-out or None, pad id) for the plan: from the data, or from the feature cache
    (an existing cache stands for the data: nothing is tokenised or read from it)."""
    run, target, data = plan.run, plan.target, plan.data
    if data.cached:
        train, valid = offline_features(run, target, data, None, 0, device)
        return train, valid, 0
    train, valid, pad_id = build_data(run, data)
    if data.offline_features is not None:
        train, valid = offline_features(run, target, data, (train, valid), pad_id, device)
    return train, valid, pad_id
