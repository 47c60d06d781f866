"""The checks a run's flags can fail without reading any file: ranges, combinations and the
parallel layout against the world. Each failure is one `ValueError` naming the flag."""
from __future__ import annotations

import importlib.util
import os

from megatron_dflash.fp8 import FP8Settings
from megatron_dflash.run.config import RunConfig


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least_one(section, names) -> None:
    for name in names:
        v = getattr(section, name)
        check(v is None or v >= 1, f"{flag(name)}={v} must be >= 1")


def check_run(run: RunConfig, world_size: int) -> tuple[int, int]:
    """Every flag-only check of the main job, in the order a user would fix them; returns
    (data-parallel size, micro-batches per step)."""
    d, t, o, p = run.data, run.training, run.optimizer, run.parallel
    at_least_one(d, ("seq_length", "seq_length_buckets", "max_train_samples"))
    at_least_one(run.dflash, ("block_size", "num_draft_layers", "num_anchors", "loss_chunk_size"))
    at_least_one(t, ("micro_batch_size", "global_batch_size", "train_iters", "max_skipped_steps"))
    at_least_one(p, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size"))
    at_least_one(run.logging, ("log_interval", "eval_samples", "eval_interval"))
    at_least_one(run.checkpoint, ("save_interval",))
    dflash = run.dflash
    check(dflash.block_size >= 2, f"--block-size={dflash.block_size} must be >= 2")
    check(d.seq_length > dflash.block_size,
          f"--seq-length={d.seq_length} must exceed --block-size={dflash.block_size}")
    check(o.lr > 0, f"--lr={o.lr} must be > 0")
    check(0 <= o.min_lr <= o.lr, f"--min-lr={o.min_lr} must be in [0, --lr={o.lr}]")
    check(0 <= o.lr_warmup_fraction < 1,
          f"--lr-warmup-fraction={o.lr_warmup_fraction} must be in [0, 1)")
    check(o.clip_grad >= 0, f"--clip-grad={o.clip_grad} must be >= 0")
    check(o.weight_decay >= 0, f"--weight-decay={o.weight_decay} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        check(0 <= getattr(o, name) < 1, f"{flag(name)}={getattr(o, name)} must be in [0, 1)")
    check(dflash.distill_weight is None or 0 <= dflash.distill_weight <= 1,
          f"--distill-weight={dflash.distill_weight} must be in [0, 1]")
    check(dflash.loss_gamma is None or dflash.loss_gamma > 0,
          f"--loss-gamma={dflash.loss_gamma} must be > 0")
    dp = check_layout(run, world_size)
    check(not d.pack_sequences or p.context_parallel_size == 1,
          f"--pack-sequences does not combine with --context-parallel-size="
          f"{p.context_parallel_size}: packed rows need megatron's per-document CP split; train "
          "packed without CP, or CP unpacked")
    per_step = t.micro_batch_size * dp
    check(t.global_batch_size % per_step == 0,
          f"--global-batch-size={t.global_batch_size} must be a multiple of --micro-batch-size x "
          f"data-parallel size = {t.micro_batch_size} x {dp}")
    check(run.checkpoint.load is None or os.path.isdir(run.checkpoint.load),
          f"--load={run.checkpoint.load}: not a directory")
    check(not run.checkpoint.finetune or run.checkpoint.load is not None,
          "--finetune needs --load")
    check(run.precision.transformer_impl != "transformer_engine"
          or importlib.util.find_spec("transformer_engine") is not None,
          "--transformer-impl transformer_engine needs Transformer Engine: pip install "
          "'megatron_dflash[te]' on a CUDA machine (or use --transformer-impl local)")
    check(o.use_distributed_optimizer or run.precision.bf16,
          "--no-use-distributed-optimizer needs --bf16: megatron's plain fp32 optimizer has no "
          "inf/NaN gradient check (drop the flag to use the distributed optimizer)")
    check(d.offline_features is not None or d.offline_features_dtype is None,
          "--offline-features-dtype needs --offline-features")
    return dp, t.global_batch_size // per_step


def check_layout(run: RunConfig, world_size: int) -> int:
    """The parallel flags against the world (megatron's `initialize_model_parallel`: the world
    splits into TP x PP x CP x DP for attention and ETP x EP x PP x expert-DP for experts, CP
    folded into expert-DP) and the device; returns the data-parallel size."""
    p = run.parallel
    at_least_one(p, ("context_parallel_size",))
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    model_parallel = tp * pp * cp
    check(world_size % model_parallel == 0,
          f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
          f"--pipeline-model-parallel-size x --context-parallel-size = {tp} x {pp} x {cp}")
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    etp = p.tensor_model_parallel_size if etp is None else etp
    expert_parallel = etp * ep * p.pipeline_model_parallel_size
    check(world_size % expert_parallel == 0,
          f"world size {world_size} is not divisible by --expert-tensor-parallel-size x "
          f"--expert-model-parallel-size x --pipeline-model-parallel-size = {etp} x {ep} x "
          f"{p.pipeline_model_parallel_size} = {expert_parallel} (--expert-tensor-parallel-size "
          "defaults to --tensor-model-parallel-size)")
    if p.moe_grouped_gemm:
        import torch

        check(torch.cuda.is_available(),
              "--moe-grouped-gemm needs a GPU (Transformer Engine's grouped GEMM); on CPU the "
              "experts run one after another: drop the flag")
        check(run.precision.transformer_impl == "transformer_engine",
              "--moe-grouped-gemm needs --transformer-impl transformer_engine (the local layers "
              "run the experts one after another)")
    check(not p.sequence_parallel or p.tensor_model_parallel_size > 1,
          "--sequence-parallel needs --tensor-model-parallel-size > 1")
    check(p.virtual_pipeline_model_parallel_size is None,
          "--virtual-pipeline-model-parallel-size: virtual (interleaved) pipeline stages are not "
          "supported; the captured target features travel in the non-interleaved 1F1B schedule")
    return world_size // model_parallel


def fp8_settings(run: RunConfig) -> tuple[FP8Settings, FP8Settings]:
    """(draft, target) FP8 settings; ValueError naming the flag when inconsistent."""
    out = []
    for prefix in ("", "target_"):
        fmt = getattr(run.precision, f"{prefix}fp8_format")
        recipe = getattr(run.precision, f"{prefix}fp8_recipe")
        name = f"--{prefix.replace('_', '-')}fp8"
        check(recipe is None or fmt is not None,
              f"{name}-recipe={recipe} needs {name}-format (e4m3 or hybrid)")
        out.append(FP8Settings(fmt, recipe or "delayed"))
    if any(s.enabled for s in out):
        check(run.precision.transformer_impl == "transformer_engine",
              "FP8 (--fp8-format / --target-fp8-format) needs --transformer-impl "
              "transformer_engine: only Transformer Engine linears run in FP8")
        check(importlib.util.find_spec("transformer_engine") is not None,
              "FP8 (--fp8-format / --target-fp8-format) needs Transformer Engine: "
              "pip install 'megatron_dflash[te]' on a CUDA machine")
    return out[0], out[1]


def writable(path: str) -> bool:
    """Whether `path` (and, for a rename into it, its parent) can be written, or created under
    its nearest existing ancestor."""
    path = os.path.abspath(path)
    checks = [path, os.path.dirname(path)] if os.path.exists(path) else []
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return all(os.access(p, os.W_OK | os.X_OK) for p in checks + [path])


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
