"""Megatron-style command-line arguments for `examples/pretrain_dflash.py`, validated up front.

Every bad value is reported by `parse_args` with one message naming the flag, before any model,
data or process group is built. Defaults describe the embedded CPU demo (SmolLM2-135M target,
chitchat conversations); flags use Megatron-LM's names where Megatron-LM has one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

from megatron_dflash.fp8 import add_fp8_args, fp8_settings
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS
from megatron_dflash.specs import ATTENTIONS

_EMBEDDED_TARGET_LAYERS = 30  # SmolLM2-135M-Instruct


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DFlash drafter for a frozen target with megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("target and data")
    g.add_argument("--target", default=None,
                   help="HF checkpoint dir (config.json + safetensors) of the target; default: the "
                        "embedded SmolLM2-135M-Instruct, converted once into --cache-dir")
    g.add_argument("--cache-dir", default="cache", help="converted weights and prepared data")
    g.add_argument("--train-data", nargs="+", default=None,
                   help="JSONL conversations (OpenAI messages or ShareGPT), or an indexed-dataset "
                        "prefix written by tools/preprocess_data.py; default: chitchat conversations")
    g.add_argument("--valid-data", nargs="+", default=None,
                   help="held-out conversations for tau; default: a held-out split of the default data")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the target's)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-train-samples", type=int, default=None,
                   help="use at most this many training conversations")

    g = p.add_argument_group("DFlash")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-draft-layers", type=int, default=1)
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None)
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="required for --target; the embedded default uses 16 (<empty_output>)")
    g.add_argument("--num-anchors", type=int, default=16)
    g.add_argument("--loss-gamma", type=float, default=None)
    g.add_argument("--distill-weight", type=float, default=None,
                   help="weight of distillation to the target's next-token distribution "
                        "(0 = hard labels only, 1 = distillation only); default 0, or 1 with the "
                        "embedded default data, which the target did not write")
    g.add_argument("--attention", choices=ATTENTIONS + ("auto",), default="auto",
                   help="draft training attention: 'dense' scores every block against the whole "
                        "packed sequence under a mask; 'sparse' computes only what each block "
                        "sees (FlexAttention on GPU), so its cost follows the number of anchors; "
                        "'auto': sparse (both are exact; sparse was the faster one on GPU and "
                        "CPU)")
    g.add_argument("--seq-length-buckets", type=int, default=1,
                   help="pad every micro-batch to the smallest of this many evenly spaced "
                        "lengths up to --seq-length (1: always --seq-length), so compiled "
                        "attention sees at most this many shapes")
    g.add_argument("--loss-chunk-size", type=int, default=DEFAULT_CHUNK_ROWS,
                   help="supervised block slots projected through the LM head per chunk: the "
                        "loss never holds more than this many rows of vocabulary logits")
    g.add_argument("--draft-num-attention-heads", type=int, default=None)
    g.add_argument("--draft-num-query-groups", type=int, default=None)
    g.add_argument("--draft-kv-channels", type=int, default=None)
    g.add_argument("--draft-ffn-hidden-size", type=int, default=None)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="split the target's layers over this many stages; the draft runs on the "
                        "last one")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="not supported (the features travel in the non-interleaved 1F1B "
                        "schedule); accepted only to reject it with a clear message")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--no-use-distributed-optimizer", dest="use_distributed_optimizer",
                   action="store_false", help="use megatron's plain DDP optimizer")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="megatron's layer implementation for target and draft: 'local' (torch, "
                        "runs on CPU) or Transformer Engine's fused kernels (GPU, needed for FP8)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=4)
    g.add_argument("--train-iters", type=int, default=150)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.04)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this checkpoint directory")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: load only the draft weights (e.g. from tools/import_hf.py) "
                        "and start the optimizer, LR schedule and data from scratch")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="measure held-out tau every N iterations (always at start and end)")
    g.add_argument("--eval-samples", type=int, default=16)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=True,
                   help="on SIGTERM or SIGUSR1 (SLURM pre-emption / time-limit warning) finish the "
                        "iteration, save a checkpoint to --save and exit 0 (all ranks together)")
    add_fp8_args(p)
    return p


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def validate_args(a: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Raise ValueError naming the first bad flag; fill derived values (data_parallel_size, ...)."""
    for flag in ("seq_length", "block_size", "num_draft_layers", "num_anchors", "micro_batch_size",
                 "global_batch_size", "train_iters", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "log_interval", "eval_samples",
                 "seq_length_buckets", "loss_chunk_size"):
        v = getattr(a, flag)
        _check(v >= 1, f"--{flag.replace('_', '-')}={v} must be >= 1")
    _check(a.block_size >= 2, f"--block-size={a.block_size} must be >= 2")
    _check(a.seq_length > a.block_size,
           f"--seq-length={a.seq_length} must exceed --block-size={a.block_size}")
    for flag in ("save_interval", "eval_interval", "max_train_samples"):
        v = getattr(a, flag)
        _check(v is None or v >= 1, f"--{flag.replace('_', '-')}={v} must be >= 1")
    _check(a.lr > 0, f"--lr={a.lr} must be > 0")
    _check(0 <= a.min_lr <= a.lr, f"--min-lr={a.min_lr} must be in [0, --lr={a.lr}]")
    _check(0 <= a.lr_warmup_fraction < 1, f"--lr-warmup-fraction={a.lr_warmup_fraction} must be in [0, 1)")
    _check(a.clip_grad >= 0, f"--clip-grad={a.clip_grad} must be >= 0")
    _check(a.weight_decay >= 0, f"--weight-decay={a.weight_decay} must be >= 0")
    for flag in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(a, flag) < 1, f"--{flag.replace('_', '-')}={getattr(a, flag)} must be in [0, 1)")
    _check(a.distill_weight is None or 0 <= a.distill_weight <= 1,
           f"--distill-weight={a.distill_weight} must be in [0, 1]")
    _check(a.loss_gamma is None or a.loss_gamma > 0, f"--loss-gamma={a.loss_gamma} must be > 0")
    model_parallel = a.tensor_model_parallel_size * a.pipeline_model_parallel_size
    _check(world_size % model_parallel == 0,
           f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
           f"--pipeline-model-parallel-size = {model_parallel}")
    _check(not a.sequence_parallel or a.tensor_model_parallel_size > 1,
           "--sequence-parallel needs --tensor-model-parallel-size > 1")
    _check(a.virtual_pipeline_model_parallel_size is None,
           "--virtual-pipeline-model-parallel-size: virtual (interleaved) pipeline stages are not "
           "supported; the captured target features travel in the non-interleaved 1F1B schedule")
    a.data_parallel_size = world_size // model_parallel
    per_step = a.micro_batch_size * a.data_parallel_size
    _check(a.global_batch_size % per_step == 0,
           f"--global-batch-size={a.global_batch_size} must be a multiple of --micro-batch-size x "
           f"data-parallel size = {a.micro_batch_size} x {a.data_parallel_size}")
    a.num_microbatches = a.global_batch_size // per_step
    _check(a.target is not None or a.mask_token_id in (None, 16),
           "--mask-token-id: the embedded SmolLM2 target uses 16; pass --target to choose another")
    _check(a.target is None or a.mask_token_id is not None,
           "--mask-token-id is required with --target (an id the target's embedding holds that "
           "your data never uses)")
    if a.target is not None:
        _check(os.path.isdir(a.target), f"--target={a.target}: not a directory")
    layers = _num_target_layers(a.target) if a.target is not None else _EMBEDDED_TARGET_LAYERS
    _check(layers is None or layers % a.pipeline_model_parallel_size == 0,
           f"--pipeline-model-parallel-size={a.pipeline_model_parallel_size} must divide the "
           f"target's {layers} layers (every stage holds the same number)")
    for flag in ("train_data", "valid_data"):
        for path in getattr(a, flag) or []:
            _check(os.path.exists(path) or os.path.exists(path + ".bin"),
                   f"--{flag.replace('_', '-')}: {path} does not exist")
    _check(a.load is None or os.path.isdir(a.load), f"--load={a.load}: not a directory")
    _check(not a.finetune or a.load is not None, "--finetune needs --load")
    _check(a.transformer_impl != "transformer_engine"
           or importlib.util.find_spec("transformer_engine") is not None,
           "--transformer-impl transformer_engine needs Transformer Engine: pip install "
           "'megatron_dflash[te]' on a CUDA machine (or use --transformer-impl local)")
    a.fp8, a.target_fp8 = fp8_settings(a)
    if a.attention == "auto":
        a.attention = "sparse"
    return a


def _num_target_layers(target: str) -> int | None:
    """The target config.json's num_hidden_layers (None if unreadable: the import reports it)."""
    try:
        with open(os.path.join(target, "config.json")) as f:
            return int(json.load(f)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate_args(args, world_size)
    except ValueError as e:
        parser.error(str(e))
