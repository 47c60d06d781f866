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
import re
import sys

from megatron_dflash.config import DFlashConfig, build_target_layer_ids
from megatron_dflash.fp8 import FP8_FORMATS, FP8_RECIPES, FP8Settings
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS
from megatron_dflash.specs import ATTENTIONS
from megatron_dflash.targets.gguf import SMOLLM2_MASK_TOKEN_ID

# The embedded default target (`training.embedded`), SmolLM2-135M-Instruct, converted on first
# use into --cache-dir/EMBEDDED_TARGET_DIR. Until then its config.json (as the conversion writes
# it) is this, so that the flags are checked against it before anything is converted.
EMBEDDED_TARGET_DIR = "smollm2-135m-instruct"
EMBEDDED_TARGET_TAPS = 5  # the reference's five tapped layers, even for a smaller draft
_EMBEDDED_TARGET_CONFIG = dict(
    architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)

EMBEDDED_RUN_DEFAULTS = dict(
    seq_length=160, block_size=8, num_anchors=12, num_draft_layers=1, micro_batch_size=4,
    global_batch_size=4, train_iters=120, lr=3e-3, min_lr=3e-4, lr_warmup_fraction=0.05,
    log_interval=10, seq_length_buckets=2)
"""Flag defaults when neither --target nor --train-data is given (the embedded default,
`training.embedded`, a CPU demo of minutes):
a block of 8 (on CPU a block's verification costs about one decoding step, and a small draft
trained for minutes rarely gets past position 8), short sequences (prompt + answer)."""


# The flag that sets each DFlashConfig field; the other fields are the target's.
DFLASH_FLAGS = {
    "block_size": "--block-size", "num_draft_layers": "--num-draft-layers",
    "target_layer_ids": "--target-layer-ids", "mask_token_id": "--mask-token-id",
    "num_attention_heads": "--draft-num-attention-heads",
    "num_key_value_heads": "--draft-num-query-groups", "head_dim": "--draft-kv-channels",
    "ffn_hidden_size": "--draft-ffn-hidden-size", "loss_gamma": "--loss-gamma",
    "num_anchors": "--num-anchors"}
_TARGET_FIELDS = {"hidden_size": "the target's hidden_size", "rope_theta": "the target's rope_theta",
                  "norm_eps": "the target's rms_norm_eps"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DFlash drafter for a frozen target with megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("target and data")
    g.add_argument("--target", default=None,
                   help="HF checkpoint dir (config.json + safetensors) of the target; default: the "
                        "embedded SmolLM2-135M-Instruct, converted once into --cache-dir")
    g.add_argument("--cache-dir", default="cache", help="converted weights and prepared data")
    g.add_argument("--embedded-answers", choices=("target", "human"), default="target",
                   help="the embedded default's training answers: the target's own (regenerated "
                        "once, taps cached) or, for comparison, the human replies in chitchat to "
                        "the same prompts (taps computed online)")
    g.add_argument("--train-data", nargs="+", default=None,
                   help="JSONL conversations (OpenAI messages or ShareGPT), or an indexed-dataset "
                        "prefix written by tools/preprocess_data.py; default: chitchat conversations")
    g.add_argument("--valid-data", nargs="+", default=None,
                   help="held-out conversations for tau; default: a held-out split of the default data")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the target's)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-train-samples", type=int, default=None,
                   help="use at most this many training conversations")
    g.add_argument("--offline-features", default=None, metavar="DIR",
                   help="train from the target's tapped hidden states cached in DIR "
                        "(megatron_dflash/feature_cache.py): no target decoder layer is built. "
                        "If DIR holds no cache, the job first writes it (train split, and the "
                        "held-out split in DIR/valid) with a target forward, as "
                        "tools/cache_features.py does; an existing cache must match --target, "
                        "the taps and --seq-length, and is then the data (--train-data is not "
                        "read). No distillation, no pipeline parallelism")
    g.add_argument("--offline-features-dtype", choices=["bf16", "fp32"], default=None,
                   help="dtype of the cached features (default: bf16 under --bf16, else fp32)")

    g = p.add_argument_group("DFlash")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-draft-layers", type=int, default=1)
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None)
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="default: found from the target's tokenizer (its mask token, a <|MASK|>/"
                        "[MASK]/<mask> token, a reserved special token, or the first embedding "
                        "row past its ids); the embedded default uses 16 (<empty_output>)")
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
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE targets: split each MoE layer's experts over this many ranks "
                        "(megatron's expert-parallel groups, across data-parallel ranks); must "
                        "divide the target's num_experts")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="MoE targets: split each expert's weights over this many ranks "
                        "(default: --tensor-model-parallel-size)")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"],
                   default="allgather",
                   help="MoE targets: how tokens reach their experts' ranks (megatron's "
                        "dispatchers); allgather needs every expert-parallel rank's micro-batch "
                        "to have the same shape (--seq-length-buckets 1 when expert-parallel "
                        "ranks hold different data)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="MoE targets: run each rank's experts as one grouped GEMM (Transformer "
                        "Engine, GPU only)")
    g.add_argument("--no-use-distributed-optimizer", dest="use_distributed_optimizer",
                   action="store_false", help="use megatron's plain DDP optimizer (needs --bf16:"
                                              " megatron's plain fp32 optimizer has no inf/NaN "
                                              "check)")
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
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="a step whose loss or gradients are not finite makes no update; stop "
                        "after this many such steps in a row")
    g.add_argument("--bf16", action="store_true")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this checkpoint directory")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="at the end of training (or after a signal exit that saved) write the "
                        "draft in the reference HF format (as tools/export_hf.py) to DIR, which "
                        "must be new, empty or an earlier export (replaced)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: load only the draft weights (e.g. from tools/import_hf.py) "
                        "and start the optimizer, LR schedule and data from scratch")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="measure held-out tau every N iterations (always at start and end)")
    g.add_argument("--eval-samples", type=int, default=16)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="every iteration's metrics as JSON lines (default: <--save>/metrics.jsonl"
                        " with --save, else none)")
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=True,
                   help="on SIGTERM or SIGUSR1 (SLURM pre-emption / time-limit warning) finish the "
                        "iteration, save a checkpoint to --save and exit 0 (all ranks together)")
    add_fp8_args(p)
    return p


def add_fp8_args(parser: argparse.ArgumentParser) -> None:
    """The FP8 flags (Megatron-LM's names for the draft; `--target-` for the frozen target)."""
    g = parser.add_argument_group("FP8 (Transformer Engine, needs --transformer-impl "
                                  "transformer_engine)")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                   help="train the draft's transformer layers in FP8 with this format "
                        "(hybrid: e4m3 forward, e5m2 gradients)")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                   help="draft FP8 scaling recipe (default delayed); mxfp8 needs Blackwell")
    g.add_argument("--target-fp8-format", choices=FP8_FORMATS, default=None,
                   help="run the frozen target's forward in FP8 with this format")
    g.add_argument("--target-fp8-recipe", choices=FP8_RECIPES, default=None,
                   help="target FP8 scaling recipe (default delayed)")


def fp8_settings(args: argparse.Namespace) -> tuple[FP8Settings, FP8Settings]:
    """(draft, target) settings from the flags; ValueError naming the flag when inconsistent."""
    out = []
    for prefix in ("", "target_"):
        fmt, recipe = getattr(args, f"{prefix}fp8_format"), getattr(args, f"{prefix}fp8_recipe")
        flag = f"--{prefix.replace('_', '-')}fp8"
        if recipe is not None and fmt is None:
            raise ValueError(f"{flag}-recipe={recipe} needs {flag}-format (e4m3 or hybrid)")
        out.append(FP8Settings(fmt, recipe or "delayed"))
    if any(s.enabled for s in out):
        if getattr(args, "transformer_impl", None) != "transformer_engine":
            raise ValueError("FP8 (--fp8-format / --target-fp8-format) needs --transformer-impl "
                             "transformer_engine: only Transformer Engine linears run in FP8")
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError("FP8 (--fp8-format / --target-fp8-format) needs Transformer Engine: "
                             "pip install 'megatron_dflash[te]' on a CUDA machine")
    return out[0], out[1]


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def validate_args(a: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Raise ValueError naming the first bad flag; fill derived values (data_parallel_size, ...)."""
    for flag in ("seq_length", "block_size", "num_draft_layers", "num_anchors", "micro_batch_size",
                 "global_batch_size", "train_iters", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "log_interval", "eval_samples",
                 "seq_length_buckets", "loss_chunk_size", "max_skipped_steps",
                 "expert_model_parallel_size"):
        v = getattr(a, flag)
        _check(v >= 1, f"--{flag.replace('_', '-')}={v} must be >= 1")
    _check(a.block_size >= 2, f"--block-size={a.block_size} must be >= 2")
    _check(a.seq_length > a.block_size,
           f"--seq-length={a.seq_length} must exceed --block-size={a.block_size}")
    for flag in ("save_interval", "eval_interval", "max_train_samples",
                 "expert_tensor_parallel_size"):
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
    _check(a.embedded_answers == "target" or a.train_data is None,
           f"--embedded-answers={a.embedded_answers} chooses the embedded default's data; "
           "with --train-data it has nothing to choose")
    model_parallel = a.tensor_model_parallel_size * a.pipeline_model_parallel_size
    _check(world_size % model_parallel == 0,
           f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
           f"--pipeline-model-parallel-size = {model_parallel}")
    _check_expert_layout(a, world_size)
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
    if a.target is not None:
        _check(os.path.isdir(a.target), f"--target={a.target}: not a directory")
    hf_config = _target_hf_config(a)
    layers = hf_config.num_hidden_layers
    _check(layers % a.pipeline_model_parallel_size == 0,
           f"--pipeline-model-parallel-size={a.pipeline_model_parallel_size} must divide the "
           f"target's {layers} layers (every stage holds the same number)")
    _check_moe_target(a, hf_config)
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
    _check(a.use_distributed_optimizer or a.bf16,
           "--no-use-distributed-optimizer needs --bf16: megatron's plain fp32 optimizer has no "
           "inf/NaN gradient check (drop the flag to use the distributed optimizer)")
    a.fp8, a.target_fp8 = fp8_settings(a)
    if a.attention == "auto":
        a.attention = "sparse"
    if a.target is not None and a.mask_token_id is None:
        a.mask_token_id = _resolve_mask_token(a, hf_config.vocab_size)
    cfg = _check_model_configs(a, hf_config)
    a.checkpoint_changes = _check_checkpoint(a, cfg) if a.load is not None else []
    _check_offline_features(a, cfg)
    if a.export is not None:
        _check_export(a.export)
    return a


def _check_offline_features(a: argparse.Namespace, cfg: DFlashConfig) -> None:
    """--offline-features: a layout and objective that can train from cached taps, and an
    existing cache that matches this run (one message naming what differs)."""
    _check(a.offline_features is not None or a.offline_features_dtype is None,
           "--offline-features-dtype needs --offline-features")
    if a.offline_features is None:
        return
    from megatron_dflash import feature_cache

    flag = f"--offline-features {a.offline_features}"
    if a.offline_features_dtype is None:
        a.offline_features_dtype = "bf16" if a.bf16 else "fp32"
    _check(a.pipeline_model_parallel_size == 1,
           f"{flag}: --pipeline-model-parallel-size={a.pipeline_model_parallel_size}: a run from "
           "cached features builds no target decoder layer, so there is nothing to pipeline; "
           "use data or tensor parallelism")
    distills = a.distill_weight > 0 if a.distill_weight is not None else a.train_data is None
    _check(not distills,
           f"{flag}: the cache holds the taps, not the teacher's next-token distribution: "
           "distillation (--distill-weight > 0, the embedded default data's default) needs the "
           "target online; pass --distill-weight 0 or drop --offline-features")
    directory = a.offline_features
    if not feature_cache.is_cache(directory):
        _check(not os.path.exists(directory)
               or (os.path.isdir(directory) and not os.listdir(directory)),
               f"{flag}: exists and holds no {feature_cache.MANIFEST} (an interrupted write "
               "leaves DIR.partial, never DIR): choose a new directory or remove it")
        _check(_writable(directory), f"{flag}: cannot be created (no write permission)")
        return
    target = a.target or os.path.join(a.cache_dir, EMBEDDED_TARGET_DIR)
    try:
        expected = feature_cache.cache_manifest(target, cfg.target_layer_ids, a.seq_length,
                                                a.offline_features_dtype)
        feature_cache.check_manifest(feature_cache.read_manifest(directory), expected, flag)
        valid = os.path.join(directory, feature_cache.VALID_SPLIT)
        if a.valid_data:
            _check(feature_cache.is_cache(valid),
                   f"{flag}: holds no held-out split ({valid}) for --valid-data (the cache was "
                   "written without it): drop --valid-data or write a new cache")
            feature_cache.check_manifest(feature_cache.read_manifest(valid), expected,
                                         f"{flag} ({valid})")
    except (OSError, ValueError) as e:
        raise ValueError(_one_line(e)) from None


def _check_export(path: str) -> None:
    """--export DIR: new, empty or an earlier export (only reference-format files), writable."""
    from megatron_dflash.draft_export import TOKENIZER_FILES
    from megatron_dflash.reference_format import CONFIG_FILE, WEIGHTS_FILE

    if os.path.exists(path):
        _check(os.path.isdir(path), f"--export {path}: exists and is not a directory")
        files = set(os.listdir(path))
        _check(not files or ({CONFIG_FILE, WEIGHTS_FILE} <= files
                             and files <= {CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES}),
               f"--export {path}: exists, is not empty and is not an earlier export "
               f"({CONFIG_FILE} + {WEIGHTS_FILE}): choose a new directory")
    _check(_writable(path), f"--export {path}: not writable (no write permission)")


def _writable(path: str) -> bool:
    """Whether `path` (and, for a rename into it, its parent) can be written, or created under
    its nearest existing ancestor."""
    path = os.path.abspath(path)
    checks = [path, os.path.dirname(path)] if os.path.exists(path) else []
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return all(os.access(p, os.W_OK | os.X_OK) for p in checks + [path])


def _check_expert_layout(a: argparse.Namespace, world_size: int) -> None:
    """The expert-parallel flags against the world (megatron's `initialize_model_parallel`: the
    world splits into TP x PP x DP for attention and ETP x EP x PP x expert-DP for experts) and
    the device, before the target is read."""
    ep, etp = a.expert_model_parallel_size, a.expert_tensor_parallel_size
    etp = a.tensor_model_parallel_size if etp is None else etp
    expert_parallel = etp * ep * a.pipeline_model_parallel_size
    _check(world_size % expert_parallel == 0,
           f"world size {world_size} is not divisible by --expert-tensor-parallel-size x "
           f"--expert-model-parallel-size x --pipeline-model-parallel-size = {etp} x {ep} x "
           f"{a.pipeline_model_parallel_size} = {expert_parallel} (--expert-tensor-parallel-size "
           "defaults to --tensor-model-parallel-size)")
    if a.moe_grouped_gemm:
        import torch

        _check(torch.cuda.is_available(),
               "--moe-grouped-gemm needs a GPU (Transformer Engine's grouped GEMM); on CPU the "
               "experts run one after another: drop the flag")
        _check(a.transformer_impl == "transformer_engine",
               "--moe-grouped-gemm needs --transformer-impl transformer_engine (the local layers "
               "run the experts one after another)")


def _check_moe_target(a: argparse.Namespace, hf_config) -> None:
    """The expert-parallel flags against the target's config.json: a dense target takes none,
    an MoE target's experts and per-expert FFN must split evenly, and the allgather dispatcher
    needs equal shapes across an expert group that holds different data."""
    from megatron_dflash.targets import moe

    where = (os.path.join(a.target, "config.json") if a.target is not None
             else f"the embedded target {EMBEDDED_TARGET_DIR}")
    ep, etp = a.expert_model_parallel_size, a.expert_tensor_parallel_size
    if not moe.is_moe(hf_config):
        dense = f"the target ({where}) is dense (no experts); it needs an MoE target"
        _check(ep == 1, f"--expert-model-parallel-size={ep}: {dense}")
        _check(etp is None, f"--expert-tensor-parallel-size={etp}: {dense}")
        _check(not a.moe_grouped_gemm, f"--moe-grouped-gemm: {dense}")
        return
    experts = moe.num_experts(hf_config)
    _check(experts % ep == 0,
           f"--expert-model-parallel-size={ep} must divide the target's num_experts={experts} "
           f"({where}): every expert-parallel rank holds the same number of experts")
    ffn = hf_config.moe_intermediate_size
    flag = (f"--expert-tensor-parallel-size={etp}" if etp is not None else
            f"--expert-tensor-parallel-size (default --tensor-model-parallel-size="
            f"{a.tensor_model_parallel_size})")
    etp = a.tensor_model_parallel_size if etp is None else etp
    _check(ffn % etp == 0, f"{flag} must divide the target's moe_intermediate_size={ffn} "
                           f"({where})")
    # An expert group (ETP x EP ranks) wider than the attention TP group spans data-parallel
    # ranks, whose micro-batches megatron's allgather dispatcher gathers as equal shapes.
    _check(a.moe_token_dispatcher_type != "allgather" or etp * ep <= a.tensor_model_parallel_size
           or a.seq_length_buckets == 1,
           f"--moe-token-dispatcher-type allgather with --seq-length-buckets="
           f"{a.seq_length_buckets}: the expert-parallel ranks ({etp * ep} = "
           "--expert-tensor-parallel-size x --expert-model-parallel-size) hold different "
           "data-parallel ranks' micro-batches, which allgather needs to be the same shape; use "
           "--seq-length-buckets 1 or --moe-token-dispatcher-type alltoall")


def moe_parallel(a: argparse.Namespace) -> dict:
    """`target_transformer_config`'s MoE arguments from the flags (`loop.build_models` passes
    the same)."""
    return dict(expert_model_parallel_size=a.expert_model_parallel_size,
                expert_tensor_parallel_size=a.expert_tensor_parallel_size,
                moe_token_dispatcher_type=a.moe_token_dispatcher_type,
                moe_grouped_gemm=a.moe_grouped_gemm)


def dflash_config(a: argparse.Namespace) -> DFlashConfig:
    """The run's DFlash settings as the flags give them (unresolved: `None` = the target's).
    Without --target, the embedded target's mask id and the reference's taps."""
    cfg = DFlashConfig(
        block_size=a.block_size, num_draft_layers=a.num_draft_layers,
        target_layer_ids=a.target_layer_ids, mask_token_id=a.mask_token_id,
        num_attention_heads=a.draft_num_attention_heads,
        num_key_value_heads=a.draft_num_query_groups, head_dim=a.draft_kv_channels,
        ffn_hidden_size=a.draft_ffn_hidden_size, loss_gamma=a.loss_gamma,
        num_anchors=a.num_anchors)
    if a.target is None:
        cfg.mask_token_id = SMOLLM2_MASK_TOKEN_ID
        if cfg.target_layer_ids is None:
            cfg.target_layer_ids = build_target_layer_ids(
                _EMBEDDED_TARGET_CONFIG["num_hidden_layers"], EMBEDDED_TARGET_TAPS)
    return cfg


def _resolve_mask_token(a: argparse.Namespace, vocab_size: int) -> int:
    """No --mask-token-id: the id `resolve_mask_token_id` finds from the target's tokenizer
    (or --tokenizer's), printed with how it was found (rank 0)."""
    from megatron_dflash.data.mask_token import resolve_mask_token_id
    from megatron_dflash.data.tokenize import (SentencePieceChatTokenizer, load_chat_tokenizer,
                                               tokenizer_spec)

    spec = tokenizer_spec(a.tokenizer, a.target)
    try:
        chat = load_chat_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"--mask-token-id is not given and the tokenizer to find it from cannot "
                         f"be loaded ({_one_line(e)}); pass --mask-token-id") from None
    tokenizer = chat.sp if isinstance(chat, SentencePieceChatTokenizer) else chat.tokenizer
    mask_id, how = resolve_mask_token_id(tokenizer, vocab_size)
    if os.environ.get("RANK", "0") == "0":
        print(f"mask token: id {mask_id} from {spec}: {how}", flush=True)
    return mask_id


def _target_hf_config(a: argparse.Namespace):
    """The target's config, checked as the import checks it (config.json, architecture, every
    safetensors header and tensor shape; no tensor data is read). Without --target: the embedded
    target's (its converted config.json once it exists)."""
    from transformers import LlamaConfig

    from megatron_dflash.targets import load_hf_config

    target = a.target
    if target is None:
        target = os.path.join(a.cache_dir, EMBEDDED_TARGET_DIR)
        if not os.path.isfile(os.path.join(target, "config.json")):
            return LlamaConfig(**_EMBEDDED_TARGET_CONFIG)
    try:
        return load_hf_config(target)
    except json.JSONDecodeError as e:
        raise ValueError(f"--target: {os.path.join(target, 'config.json')} is not valid JSON "
                         f"({e})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--target: {_one_line(e)}") from None
    except Exception as e:  # safetensors' own SafetensorError: a header it cannot read
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"--target: {_unreadable_safetensors(target) or target} is truncated or "
                         f"unreadable ({_one_line(e)})") from None


def _unreadable_safetensors(target: str) -> str | None:
    """The first safetensors file of `target` whose header cannot be read."""
    from pathlib import Path

    from safetensors import safe_open

    for shard in sorted(Path(target).glob("*.safetensors")):
        try:
            with safe_open(shard, framework="pt"):
                pass
        except Exception:
            return str(shard)
    return None


def _check_model_configs(a: argparse.Namespace, hf_config) -> DFlashConfig:
    """Build the run's configs without building a model: every error `DFlashConfig.resolve` or
    megatron's TransformerConfig would raise at set-up (`loop.build_models` builds the same
    three configs), with the flag it comes from."""
    import torch

    from megatron_dflash.config import draft_transformer_config
    from megatron_dflash.targets import target_transformer_config

    where = (os.path.join(a.target, "config.json") if a.target is not None
             else f"the embedded target {EMBEDDED_TARGET_DIR}")
    try:
        tcfg = target_transformer_config(
            hf_config, tensor_parallel_size=a.tensor_model_parallel_size,
            sequence_parallel=a.sequence_parallel,
            params_dtype=torch.bfloat16 if a.bf16 else torch.float32,
            pipeline_parallel_size=a.pipeline_model_parallel_size, **moe_parallel(a),
            **a.target_fp8.fields())
    except ValueError as e:  # megatron's checks of the target against the parallel layout
        tp = a.tensor_model_parallel_size
        flag = f"--tensor-model-parallel-size={tp}" if tp > 1 else "--target"
        raise ValueError(f"{flag}: the target ({where}): {_one_line(e)}") from None
    try:
        cfg = dflash_config(a).resolve(tcfg, vocab_size=hf_config.vocab_size,
                                       target_rope_theta=hf_config.rope_parameters["rope_theta"])
    except ValueError as e:
        raise ValueError(_with_flags(_one_line(e), a, where)) from None
    try:
        draft_transformer_config(cfg, tcfg, **a.fp8.fields())
    except ValueError as e:
        raise ValueError(f"the draft's TransformerConfig: {_one_line(e)}") from None
    return cfg


def _with_flags(msg: str, a: argparse.Namespace, where: str) -> str:
    """A `DFlashConfig.resolve` message with each field written as its flag; for a value the flag
    left to the target, say so."""
    field = re.match(r"\w*", msg).group()
    for name, flag in DFLASH_FLAGS.items():
        msg = re.sub(rf"(?<![\w-]){name}(?!\w)", flag, msg)
    flag = DFLASH_FLAGS.get(field)
    if flag is None:
        return f"--target: {where}: {msg}"
    if getattr(a, flag[2:].replace("-", "_")) is None:
        msg += f" (the target's value, from {where}; set {flag})"
    return msg


def _check_checkpoint(a: argparse.Namespace, cfg: DFlashConfig) -> list[str]:
    """--load: the checkpoint is readable and holds a draft of these settings; returns what
    changed that may (`checkpoint.check_compatible`)."""
    from megatron_dflash import checkpoint

    try:
        extra = checkpoint.read_extra(a.load)
        return checkpoint.check_compatible(extra.get("dflash_config"), cfg,
                                           flags={**DFLASH_FLAGS, **_TARGET_FIELDS},
                                           where=f"checkpoint {a.load}")
    except (OSError, ValueError) as e:
        raise ValueError(f"--load: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate; a bad flag exits with argparse's usage line and one error line (2).
    What --load's checkpoint was saved with and this run changes is printed (rank 0)."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    if not any(a.split("=")[0] in ("--target", "--train-data") for a in given):
        parser.set_defaults(**EMBEDDED_RUN_DEFAULTS)
    args = parser.parse_args(argv)
    try:
        args = validate_args(args, world_size)
    except ValueError as e:
        parser.error(_one_line(e))
    if os.environ.get("RANK", "0") == "0":
        for line in args.checkpoint_changes:
            print(f"--load {args.load}: {line}", flush=True)
    return args
