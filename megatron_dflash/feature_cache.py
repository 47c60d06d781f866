"""The offline feature cache: the frozen target's tapped hidden states, written once, so that
training reads them instead of running (or even building) the target's decoder layers.

Layout of a cache directory DIR (one per data split; the held-out split lives in DIR/valid):

    DIR/manifest.json                    written last, by rank 0: the cache is complete iff it exists
        format_version                   FORMAT_VERSION
        target, target_config_sha256     the target's absolute path and the SHA-256 of its
                                         config.json (weights are not hashed)
        target_layer_ids, hidden_size    the taps (K) and the target's hidden size (H)
        seq_length                       the length samples were truncated to
        dtype                            "bf16" or "fp32": the features' dtype
        bytes_per_token                  K*H*itemsize + 4 (token) + 1 (loss mask)
        num_samples, num_tokens          totals over the shards
        shards                           [{file, num_samples, num_tokens}], in sample order
    DIR/shard-R-NNNNN.safetensors        writer rank R's shard N:
        tokens    int32 [T_total]        the samples' tokens, concatenated
        loss_mask uint8 [T_total]
        offsets   int64 [n + 1]          sample i is rows offsets[i]:offsets[i+1]
        features  dtype [T_total, K*H]   the concatenated taps (the draft's `target_hidden`)
        metadata  {"ids": JSON list of the n sample ids}

Writers (`FeatureCacheWriter`, one per data-parallel rank) fill DIR.partial with their own shards
(each written to a temporary name and renamed) and a part list; rank 0 merges the parts into the
manifest and renames DIR.partial to DIR, so a cache is there complete or not at all. The main
job and tools/cache_features.py (`write_feature_cache`) give each sample its index in the dataset
as id and each data-parallel rank a contiguous range, so the cache keeps the dataset's order and
a run from it draws exactly the micro-batches an online run draws.

Fingerprint. A cache serves a run only if the target (path and config.json), taps, sequence
length, hidden size and dtype agree (`check_manifest`); everything else (the draft, anchors,
block size, batch layout, --pack-sequences: rows are packed from the cached conversations as
they are read) may change between runs. The teacher's final hidden state is not
cached (it would add H*itemsize bytes per token, and distillation would still need the LM
head's logits per step): a run from a cache refuses --distill-weight > 0.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset

from megatron_dflash import atomic
from megatron_dflash.context_parallel import gather_sequence, target_inputs
from megatron_dflash.data.dataset import collate, pad_to
from megatron_dflash.targets.capture import FeatureCapture

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALID_SPLIT = "valid"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOKEN_BYTES = 4 + 1  # int32 token + uint8 loss mask
# What must agree between a cache and a run, with what sets it in the main job.
FINGERPRINT = {"format_version": "the cache format", "target": "--target",
               "target_config_sha256": "--target's config.json",
               "target_layer_ids": "--target-layer-ids", "hidden_size": "the target's hidden_size",
               "seq_length": "--seq-length", "dtype": "--offline-features-dtype"}
SHARD_BYTES = 512 << 20


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"feature cache dtype {dtype} must be one of {sorted(DTYPES)}")
        return names[dtype]
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype {dtype!r} must be one of {sorted(DTYPES)}")
    return dtype


def cache_manifest(target_dir: str, target_layer_ids: Sequence[int], seq_length: int,
                   dtype) -> dict:
    """The fingerprint a cache of `target_dir`'s taps must carry (the manifest before the
    writers add their totals). `dtype`: "bf16"/"fp32" or the torch dtype."""
    config_path = os.path.join(target_dir, "config.json")
    with open(config_path, "rb") as f:
        raw = f.read()
    config = json.loads(raw)
    hidden = (config.get("text_config") or config)["hidden_size"]  # a VLM: its text model's
    dtype = _dtype_name(dtype)
    ids = [int(i) for i in target_layer_ids]
    return {"format_version": FORMAT_VERSION, "target": os.path.abspath(target_dir),
            "target_config_sha256": hashlib.sha256(raw).hexdigest(), "target_layer_ids": ids,
            "hidden_size": int(hidden), "seq_length": int(seq_length), "dtype": dtype,
            "bytes_per_token": len(ids) * hidden * DTYPES[dtype].itemsize + TOKEN_BYTES}


def read_manifest(directory: str) -> dict:
    """DIR/manifest.json; ValueError naming the file when it is missing or unreadable."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{directory}: not a feature cache ({MANIFEST} missing)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable feature-cache manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: not a feature-cache manifest (no shard list)")
    return manifest


def is_cache(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def check_manifest(found: dict, expected: dict, where: str) -> None:
    """One ValueError listing every fingerprint field in which the cache `found` differs from
    the run's `expected` (`cache_manifest`)."""
    diffs = [f"{key} ({FINGERPRINT[key]}): {found.get(key)!r} in the cache, "
             f"{expected[key]!r} now" for key in FINGERPRINT if found.get(key) != expected[key]]
    if diffs:
        raise ValueError(f"{where}: the feature cache was written for another run: "
                         + "; ".join(diffs))


class FeatureCacheWriter:
    """Writes one rank's samples into the cache `directory` (layout: module docstring).

        with FeatureCacheWriter(out, manifest=cache_manifest(...), rank=r, group=dp_group) as w:
            w.add(sample_id, tokens, loss_mask, features)

    Args:
        manifest: `cache_manifest(...)`; written (with the totals and shard list) by rank 0.
        rank: this writer's rank; its shards are named after it and its samples come after
            those of lower ranks in the cache.
        group: the process group of all writers (every rank of it opens and closes a writer, with
            its own rank); None: a single writer, or writers the caller synchronises so that rank
            0 opens first (it clears DIR.partial) and closes last (it publishes).
        shard_bytes: start a new shard once this many bytes are buffered.
    """

    def __init__(self, directory: str, *, manifest: dict, rank: int = 0, group=None,
                 shard_bytes: int = SHARD_BYTES):
        self.directory, self.manifest, self.rank, self.group = directory, manifest, rank, group
        self.partial = os.path.abspath(directory) + ".partial"
        self.shard_bytes = shard_bytes
        self._width = len(manifest["target_layer_ids"]) * manifest["hidden_size"]
        self._dtype = DTYPES[manifest["dtype"]]
        self._buffer: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._shards: list[dict] = []

    def __enter__(self) -> "FeatureCacheWriter":
        if is_cache(self.directory):
            raise ValueError(f"{self.directory}: already holds a feature cache")
        if os.path.exists(self.directory) and (not os.path.isdir(self.directory)
                                               or os.listdir(self.directory)):
            raise ValueError(f"{self.directory}: exists and is neither empty nor a feature cache")
        if self.rank == 0:
            atomic.make_partial(self.partial)  # drops what an interrupted write left
        self._barrier()
        os.makedirs(self.partial, exist_ok=True)
        return self

    def add(self, sample_id: str, tokens: torch.Tensor, loss_mask: torch.Tensor,
            features: torch.Tensor) -> None:
        """One sample: tokens and loss mask [T], its concatenated taps [T, K*H]."""
        n = tokens.shape[0]
        if tokens.dim() != 1 or loss_mask.shape != (n,) or features.shape != (n, self._width):
            raise ValueError(f"sample {sample_id}: tokens {list(tokens.shape)}, loss mask "
                             f"{list(loss_mask.shape)} and features {list(features.shape)} must "
                             f"be [T], [T] and [T, {self._width}]")
        self._buffer.append((str(sample_id), tokens.detach().to("cpu", torch.int32),
                             loss_mask.detach().to("cpu", torch.uint8),
                             features.detach().to("cpu", self._dtype)))
        self._buffered += n * self.manifest["bytes_per_token"]
        if self._buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        ids, tokens, masks, features = zip(*self._buffer)
        lengths = torch.tensor([0] + [t.shape[0] for t in tokens], dtype=torch.int64)
        name = f"shard-{self.rank}-{len(self._shards):05d}.safetensors"
        data = safetensors_bytes({"tokens": torch.cat(tokens), "loss_mask": torch.cat(masks),
                                  "offsets": lengths.cumsum(0),
                                  "features": torch.cat(features).contiguous()},
                                 metadata={"ids": json.dumps(list(ids))})
        path = os.path.join(self.partial, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self._shards.append({"file": name, "num_samples": len(ids),
                             "num_tokens": int(lengths.sum())})
        self._buffer, self._buffered = [], 0

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:  # leave DIR absent; the next writer starts DIR.partial afresh
            return
        self._flush()
        atomic.write_text(os.path.join(self.partial, f"rank-{self.rank}.json"),
                          json.dumps(self._shards))
        self._barrier()
        if self.rank == 0:
            self._publish()
        self._barrier()

    def _publish(self) -> None:
        """Merge the writers' part lists (in rank order) into the manifest and rename."""
        parts = sorted(glob.glob(os.path.join(self.partial, "rank-*.json")),
                       key=lambda p: int(os.path.basename(p)[5:-5]))
        shards = []
        for part in parts:
            with open(part) as f:
                shards += json.load(f)
            os.remove(part)
        manifest = dict(self.manifest, shards=shards,
                        num_samples=sum(s["num_samples"] for s in shards),
                        num_tokens=sum(s["num_tokens"] for s in shards))
        atomic.write_text(os.path.join(self.partial, MANIFEST), json.dumps(manifest, indent=1))
        os.makedirs(os.path.dirname(os.path.abspath(self.directory)), exist_ok=True)
        atomic.publish(self.partial, os.path.abspath(self.directory), file_mode=0o644,
                       dir_mode=0o755)

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


class FeatureCacheDataset(Dataset):
    """A cache's samples as {"tokens": int64 [T], "loss_mask": bool [T], "features": [T, K*H]}
    in cache order; refuses a cache whose fingerprint differs from `expected_manifest`
    (`cache_manifest` of this run) with one message naming what differs."""

    def __init__(self, directory: str, expected_manifest: dict):
        self.directory = directory
        self.manifest = read_manifest(directory)
        check_manifest(self.manifest, expected_manifest, directory)
        self._files, self._index = [], []
        for shard, entry in enumerate(self.manifest["shards"]):
            path = os.path.join(directory, entry["file"])
            if not os.path.isfile(path):
                raise ValueError(f"{directory}: shard {entry['file']} listed in {MANIFEST} is "
                                 "missing")
            self._files.append(path)
            self._index += [(shard, i) for i in range(entry["num_samples"])]
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, shard: int):
        if shard not in self._open:
            handle = safe_open(self._files[shard], framework="pt")
            self._open[shard] = (handle, handle.get_tensor("tokens"),
                                 handle.get_tensor("loss_mask"), handle.get_tensor("offsets"),
                                 handle.get_slice("features"))
        return self._open[shard]

    def __getitem__(self, idx: int) -> dict:
        shard, i = self._index[idx]
        _, tokens, loss_mask, offsets, features = self._shard(shard)
        a, b = int(offsets[i]), int(offsets[i + 1])
        return {"tokens": tokens[a:b].long(), "loss_mask": loss_mask[a:b].bool(),
                "features": features[a:b]}

    def sample_lengths(self):
        """Every sample's length in tokens, from the shards' offsets (no feature is read)."""
        lengths = []
        for path in self._files:
            with safe_open(path, framework="pt") as f:
                lengths.append(f.get_tensor("offsets").diff())
        return torch.cat(lengths).numpy()

    def ids(self) -> list[str]:
        """Every sample's id, in cache order."""
        out = []
        for path in self._files:
            with safe_open(path, framework="pt") as f:
                out += json.loads(f.metadata()["ids"])
        return out


def pad_features(samples: list[dict], length: int) -> torch.Tensor:
    """The samples' features right-padded with zeros to [b, length, K*H] (as `collate` pads
    tokens; padding is never attended to)."""
    return pad_to([s["features"] for s in samples], length, 0.0)


def disk_use(manifest: dict, datasets: Sequence[Dataset], directory: str) -> tuple[int, str]:
    """(bytes the cache of `datasets` takes, the line saying so); ValueError naming
    `directory` when its file system has less free space."""
    tokens = sum(len(ds[i]["tokens"]) for ds in datasets for i in range(len(ds)))
    per_token, total = manifest["bytes_per_token"], tokens * manifest["bytes_per_token"]
    k, h = len(manifest["target_layer_ids"]), manifest["hidden_size"]
    line = (f"feature cache {directory}: {tokens} tokens x {per_token} B/token ({k} taps x {h} "
            f"hidden x {DTYPES[manifest['dtype']].itemsize} B {manifest['dtype']} + "
            f"{TOKEN_BYTES} B token/mask) = {_size(total)}")
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if total > free:
        raise ValueError(f"{line}: only {_size(free)} free on {existing}'s file system")
    return total, line


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@torch.no_grad()
def write_feature_cache(directory: str, splits: dict[str, Dataset], target, layer_ids,
                        manifest: dict, *, micro_batch_size: int = 1, pad_multiple: int = 1,
                        pad_id: int = 0, log: Callable[[str], None] = print) -> None:
    """Run the frozen `target` (a `build_target(last_layer=max(layer_ids))` feature extractor,
    this TP rank's part, on its device) over `splits` ({"train": ds[, "valid": ds]}) and write
    `directory` (the train split) and `directory`/valid. Collective over the world: data-parallel
    ranks take disjoint, contiguous ranges of samples (so the cache keeps the datasets' order),
    tensor- and context-parallel ranks run together and the first of them writes (CP: each rank
    runs its chunks of the sequence, the taps are gathered back; `pad_multiple` must allow the
    split). Prints the disk use first and refuses (ValueError) when it does not fit."""
    total, line = disk_use(manifest, list(splits.values()), directory)
    log(line)
    dp, dp_size = parallel_state.get_data_parallel_rank(), \
        parallel_state.get_data_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    writes = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_context_parallel_rank() == 0)
    group = parallel_state.get_data_parallel_group() if writes else None
    device = next(target.parameters()).device
    capture = FeatureCapture(target, layer_ids)
    t0 = time.time()
    for split, dataset in splits.items():
        out = directory if split == "train" else os.path.join(directory, split)
        mine = range(dp * len(dataset) // dp_size, (dp + 1) * len(dataset) // dp_size)
        # every TP rank runs the same micro-batches; the DP ranks' counts may differ by one
        writer = FeatureCacheWriter(out, manifest=manifest, rank=dp, group=group) if writes \
            else contextlib.nullcontext()
        with writer:
            _write_split(target, capture, dataset, mine, writer if writes else None, tp_group,
                         micro_batch_size, pad_multiple, pad_id, device)
        dist.barrier()
    log(f"feature cache {directory}: {_size(total)} written in {time.time() - t0:.1f}s")


def _write_split(target, capture, dataset, indices: range, writer, tp_group,
                 micro_batch_size: int, pad_multiple: int, pad_id: int, device) -> None:
    """One split's samples `indices`, a micro-batch at a time: the target's forward, its taps
    (gathered over TP under sequence parallelism, over CP into sequence order) to `writer`
    (None: a rank that only computes)."""
    for start in range(indices.start, indices.stop, micro_batch_size):
        batch_ids = range(start, min(start + micro_batch_size, indices.stop))
        samples = [dataset[i] for i in batch_ids]
        tokens = collate(samples, pad_id, pad_to_multiple_of=pad_multiple)["tokens"].to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens).contiguous()
        with capture:
            target(*target_inputs(tokens, positions, target.pg_collection.cp),
                   attention_mask=None)
        features = capture.features()  # [s(/cp)(/tp), b, K*H]
        if target.config.sequence_parallel:
            features = tensor_parallel.gather_from_sequence_parallel_region(
                features, tensor_parallel_output_grad=False, group=tp_group)
        if target.config.context_parallel_size > 1:
            features = gather_sequence(features, target.pg_collection.cp)
        if writer is not None:
            for j, (i, s) in enumerate(zip(batch_ids, samples)):
                writer.add(str(i), s["tokens"], s["loss_mask"], features[:len(s["tokens"]), j])
