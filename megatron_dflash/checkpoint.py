"""Draft-only training checkpoints with megatron dist-checkpointing, safe against kills mid-save.

A checkpoint directory holds `iter_XXXXXXX/` dist checkpoints and `latest_checkpointed_iteration.txt`.
Each save is written to `iter_XXXXXXX.partial/`, renamed into place only after every rank has
finished, and only then does the tracker file (replaced atomically) point at it; a job killed
during a save therefore leaves the previous checkpoint as the latest loadable one.

Contents: the draft's sharded weights (never the target's: the training module's
`sharded_state_dict` holds only the draft), the DistributedOptimizer state in the
`fully_reshardable` format (so a checkpoint resumes at any TP/PP/DP layout), the LR scheduler,
per-rank RNG states, the data position and the DFlash/target description.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import queue
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException, maybe_load_config
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatron_dflash import atomic

TRACKER = "latest_checkpointed_iteration.txt"
DRAFT_PREFIX = "draft."  # the draft's keys under "model" (the training module's prefix)
_OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration the tracker points at, or None when `root` holds no finished checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit() or not os.path.isdir(iteration_dir(root, int(text))):
        raise ValueError(f"{path} is corrupt or points at a missing checkpoint ({text!r})")
    return int(text)


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["random"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def _sharded_state_dict(module, optimizer, is_loading: bool) -> dict:
    """Model, optimizer and RNG. With PP > 1 the stages before the last hold no draft and add no
    model or optimizer state, but still take part in the collective save and load.

    dist-checkpointing writes the plain (non-sharded) values from global rank 0 only, which with
    PP > 1 sits on such a stage: when saving, every stage receives its last stage's plain
    optimizer values (param groups, Adam's step), so rank 0 writes the right ones.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    model = module.sharded_state_dict()
    sd = {"model": model} if model else {}  # an empty dict would differ from rank 0's common
    state = None
    if _holds_params(optimizer):
        state = optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPTIM_FORMAT)
    if not is_loading and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        plain = None
        if state is not None:
            plain = extract_sharded_base(extract_nonpersistent(state)[1])[1]
        box = [plain]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        state = box[0] if state is None else state
    if state is not None:
        sd["optimizer"] = state
    sd["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def _holds_params(optimizer) -> bool:
    """False on pipeline stages before the last (no draft). Their data-parallel groups, the only
    groups the optimizer state is gathered over, hold no parameters either."""
    return any(group["params"] for group in optimizer.param_groups)


def _torch_adam_states(optimizer):
    """The torch AdamW optimizers inside a megatron (chained) optimizer."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(o.optimizer, torch.optim.AdamW):
            yield o.optimizer


def _save(sharded_state_dict: dict, path: str) -> None:
    """dist_checkpointing.save, which writes synchronously in this process. Its filesystem writer
    hands results over a multiprocessing Manager queue, made for async saves that write from
    another process; the first use starts the Manager's server, a spawned interpreter that
    re-imports the main script (~6 s of CPU per rank). In this process a plain queue does."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, path)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: dict) -> str:
    """Save the draft, optimizer, scheduler, RNG and `extra` (data position, configs) collectively."""
    final, partial = iteration_dir(root, iteration), _partial_dir(root, iteration)
    if dist.get_rank() == 0:
        atomic.make_partial(partial)
    dist.barrier()
    sd = _sharded_state_dict(unwrap_model(model), optimizer, is_loading=False)
    sd["scheduler"] = scheduler.state_dict()
    sd["extra"] = dict(extra, iteration=iteration)
    _save(sd, partial)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic.publish(partial, final, replace=True)
        _write_tracker(root, iteration)
    dist.barrier()
    return final


def save_model_checkpoint(root: str, draft, extra: dict, iteration: int = 0) -> str:
    """A draft-only checkpoint in the training layout ("model" = the draft's sharded state dict
    under "draft.", plus "extra"; no optimizer), written under `.partial` and renamed, then the
    tracker. Collective; `root` must not hold a checkpoint yet."""
    final, partial = iteration_dir(root, iteration), _partial_dir(root, iteration)
    created = not os.path.exists(root)
    dist.barrier()
    try:
        if dist.get_rank() == 0:
            atomic.make_partial(partial)
        dist.barrier()
        _save({"model": draft.sharded_state_dict(prefix=DRAFT_PREFIX),
               "extra": dict(extra, iteration=iteration)}, partial)
        dist.barrier()
        if dist.get_rank() == 0:
            atomic.publish(partial, final)
            _write_tracker(root, iteration)
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(root if created else partial, ignore_errors=True)
        raise
    dist.barrier()
    return final


def _partial_dir(root: str, iteration: int) -> str:
    """Where every rank writes an iteration before rank 0 renames it to `iteration_dir`."""
    return iteration_dir(root, iteration) + ".partial"


def _write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at a published iteration (replaced atomically; rank 0)."""
    atomic.write_text(os.path.join(root, TRACKER), str(iteration))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message is one line naming the
    checkpoint (and the file, where one is at fault)."""


# DFlashConfig fields a resumed or fine-tuned run may change: they shape the loss and which blocks
# are sampled, not the draft the saved weights belong to.
MAY_CHANGE = ("loss_gamma", "num_anchors", "selector_loss_weight")


def check_readable(path: str) -> None:
    """Raise CheckpointError naming the first file of the dist checkpoint `path` (an iteration
    directory) that is missing, truncated or unreadable.

    Reads only metadata.json, the torch_dist index (`.metadata`) and the data files' sizes, so
    every rank checks every file before any collective and all fail together, with one message.
    """
    config = _read_file(path, "metadata.json", lambda: maybe_load_config(path))
    if config is None:
        raise CheckpointError(f"checkpoint {path}: metadata.json is missing (not a megatron "
                              "dist checkpoint)")
    if config.sharded_backend != "torch_dist":
        return
    metadata = _read_file(path, ".metadata", lambda: FileSystemReader(path).read_metadata())
    ends = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path}: {name} is missing (listed in .metadata)")
        size = os.path.getsize(file)
        if size < end:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or unreadable ({size} "
                                  f"bytes, .metadata places data up to byte {end})")


def read_extra(root: str, iteration: int | None = None) -> dict:
    """The `extra` dict (data position, DFlash config, target) of the latest (or the given)
    checkpoint in `root`, after `check_readable`. Needs no process group."""
    path = iteration_dir(root, _resolve_iteration(root, iteration))
    check_readable(path)
    return _load_common(path)["extra"]


def check_compatible(saved: dict | None, cfg, flags: dict[str, str] | None = None,
                     where: str = "the checkpoint") -> list[str]:
    """Compare the DFlash settings a checkpoint was saved with (`extra["dflash_config"]`) with
    this run's resolved DFlashConfig `cfg`.

    Returns one line per setting that changed and may (`MAY_CHANGE`), e.g.
    "num_anchors: 512 in the checkpoint, 256 now". Every other difference changes the draft the
    saved weights belong to (block size, layers, taps, mask id, sizes, heads, RoPE, norm): they are
    all raised as one CheckpointError. `flags` names a field (e.g. its command-line flag).
    """
    if not saved:
        return [f"{where} records no DFlash settings: this run's are not checked against it"]
    flags = flags or {}
    changed, conflicts = [], []
    for name, now in dataclasses.asdict(cfg).items():
        if name not in saved or saved[name] == now:
            continue
        line = f"{flags.get(name, name)}: {_show(saved[name])} in the checkpoint, {_show(now)} now"
        (changed if name in MAY_CHANGE else conflicts).append(line)
    if conflicts:
        raise CheckpointError(f"{where} holds a draft built with other settings: "
                              f"{'; '.join(conflicts)} (these change the model; rerun with the "
                              "checkpoint's values)")
    return changed


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _read_file(path: str, name: str, read):
    """`read()`, with any failure reported as `name` in checkpoint `path` being unreadable."""
    try:
        return read()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: {name} is missing") from e
    except Exception as e:  # whatever the reader raises on a damaged file
        raise CheckpointError(f"checkpoint {path}: {name} is truncated or unreadable "
                              f"({_cause(e)})") from e


def _cause(e: BaseException) -> str:
    """One line for an exception (torch DCP puts the cause's traceback in its message: its last
    line)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {' '.join(lines[-1].split())}" if lines else type(e).__name__


def _load_common(path: str) -> dict:
    with _reading(path, "the common state"):
        return dist_checkpointing.load_common_state_dict(path)


@contextlib.contextmanager
def _reading(path: str, what: str):
    """Report a checkpoint that fails to load as one CheckpointError: what megatron rejects
    (CheckpointingException) or a file that cannot be read."""
    try:
        yield
    except CheckpointError:
        raise
    except CheckpointingException as e:
        raise CheckpointError(f"checkpoint {path}: {' '.join(str(e).split())}") from e
    except (EOFError, pickle.UnpicklingError, OSError, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path}: {what} is truncated or unreadable "
                              f"({_cause(e)})") from e


def load_weights(root: str, model, iteration: int | None = None) -> dict:
    """Only the draft's weights, e.g. a drafter imported with tools/import_hf.py (which writes no
    optimizer state) or a run to fine-tune from; returns the saved `extra` dict."""
    path = iteration_dir(root, _resolve_iteration(root, iteration))
    check_readable(path)
    extra = _load_common(path)["extra"]
    module = unwrap_model(model)
    with _reading(path, "the draft's weights"):
        loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, path)
    load_trainable(module, loaded.get("model", {}), path)
    return extra


def _resolve_iteration(root: str, iteration: int | None) -> int:
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no finished checkpoint in {root} ({TRACKER} missing)")
    return iteration


def load_checkpoint(root: str, model, optimizer, scheduler, iteration: int | None = None) -> dict:
    """Load into an already built model/optimizer/scheduler; returns the saved `extra` dict.

    The optimizer state resumes at any TP/PP/DP layout; per-rank RNG states are restored only when
    the world size matches the saved one (they are meaningless across layouts).
    """
    path = iteration_dir(root, _resolve_iteration(root, iteration))
    check_readable(path)
    common = _load_common(path)
    module = unwrap_model(model)
    _init_torch_adam_state(optimizer)
    sd = _sharded_state_dict(module, optimizer, is_loading=True)
    same_world = common["extra"].get("world_size") == dist.get_world_size()
    if not same_world:
        sd.pop("rng")
    with _reading(path, "the draft and optimizer state"):
        loaded = dist_checkpointing.load(sd, path)
    load_trainable(module, loaded.get("model", {}), path)
    if _holds_params(optimizer):
        with torch.no_grad(), _skip_torch_adam_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    for inner in _torch_adam_states(optimizer):
        # megatron's non-apex/TE load gives every param one shared 'step' tensor; AdamW would
        # then advance it once per parameter per step.
        for st in inner.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
    scheduler.load_state_dict(common["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return common["extra"]


@contextlib.contextmanager
def _skip_torch_adam_step(optimizer):
    """megatron-core 0.19.2's DistributedOptimizer, with torch AdamW (no apex/TE): loading the
    fully_reshardable state drops the checkpoint's per-parameter 'step' (it is restored from
    param_groups) but then copies every state tensor, 'step' included, and raises KeyError.
    For the duration of the load, give it a non-tensor 'step', which it skips."""
    patched = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
               if isinstance(o.optimizer, torch.optim.AdamW)
               and hasattr(o, "_set_main_param_and_optimizer_states")]
    for o in patched:
        original = o._set_main_param_and_optimizer_states
        o._set_main_param_and_optimizer_states = (
            lambda param, tensors, original=original: original(param, {"step": None, **tensors}))
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states


def _init_torch_adam_state(optimizer) -> None:
    """torch AdamW creates its state lazily, but DistributedOptimizer.state_dict() (used to build
    the loading state dict) expects one 'step' per parameter: create the zero state up front."""
    for inner in _torch_adam_states(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def load_trainable(module, state_dict, path: str = "") -> None:
    """Load the draft; the only keys allowed to be absent are frozen ones (the target's)."""
    result = module.load_state_dict(state_dict, strict=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    bad = sorted(set(result.missing_keys) & trainable) + sorted(result.unexpected_keys)
    if bad:
        raise CheckpointError(f"checkpoint {path or '?'} does not match the draft: {bad[:5]}")
