"""Megatron-LM-style flags, in groups that fill the `run.config` dataclasses.

The main job composes every group; a tool composes only the groups it uses (the feature-cache
writer runs the target, so it takes no optimizer flag). Each flag's `dest` is its dataclass field,
so `run_config` fills a `RunConfig` from any composition; sections a tool does not take keep
their defaults.
"""
from __future__ import annotations

import argparse
import dataclasses

from megatron_dflash.config import VARIANTS
from megatron_dflash.fp8 import FP8_FORMATS, FP8_RECIPES
from megatron_dflash.run.config import (CheckpointArgs, DataArgs, DFlashArgs, LoggingArgs,
                                        OptimizerArgs, ParallelArgs, PrecisionArgs, RunConfig,
                                        TargetArgs, TrainingArgs)

ATTENTION_CHOICES = ("dense", "sparse", "auto")
DISPATCHERS = ("allgather", "alltoall")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")  # megatron's / Transformer Engine's
# --draft-layer-types: the reference's layer types without their `_attention`.
LAYER_TYPE_CHOICES = ("full", "sliding")


def _group(parser: argparse.ArgumentParser, title: str, section, flags: list[tuple]) -> None:
    """Add `flags` = [(flag, kwargs)] to a group; defaults come from the section's dataclass."""
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    g = parser.add_argument_group(title)
    for flag, kw in flags:
        dest = kw.pop("dest", flag.lstrip("-").replace("-", "_"))
        kw.setdefault("default", defaults[dest])
        g.add_argument(flag, dest=dest, **kw)


def add_target_flags(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    _group(p, "target", TargetArgs, [
        ("--target", dict(required=required, help="HF checkpoint dir (config.json + "
                          "safetensors) of the target" + ("" if required else
                          "; default: the embedded SmolLM2-135M-Instruct, converted once into "
                          "--cache-dir"))),
        ("--tokenizer", dict(help="HF tokenizer dir, or sp:MODEL for SentencePiece (default: "
                             "the target's)")),
    ] + ([] if required else [("--cache-dir", dict(help="converted weights and prepared "
                                                        "data of the embedded default"))]))


def add_data_flags(p: argparse.ArgumentParser, *, embedded: bool = True) -> None:
    flags = [
        ("--train-data", dict(nargs="+", required=not embedded,
                              help="JSONL conversations (OpenAI messages or ShareGPT), or an "
                                   "indexed-dataset prefix written by tools/preprocess_data.py"
                                   + ("; default: chitchat conversations" if embedded else ""))),
        ("--valid-data", dict(nargs="+", help="held-out conversations")),
        ("--seq-length", dict(type=int)),
        ("--max-train-samples", dict(type=int, help="use at most this many training "
                                                    "conversations")),
        ("--offline-features", dict(metavar="DIR", required=not embedded, help=(
            "train from the target's tapped hidden states cached in DIR "
            "(megatron_dflash/feature_cache.py): no target decoder layer is built. If DIR holds "
            "no cache, the job first writes it (train split, and the held-out split in "
            "DIR/valid) with a target forward, as tools/cache_features.py does; an existing "
            "cache must match --target, the taps and --seq-length, and is then the data "
            "(--train-data is not read). No distillation, no pipeline parallelism")
            if embedded else "the feature cache directory to write")),
        ("--offline-features-dtype", dict(choices=["bf16", "fp32"], help="dtype of the cached "
                                          "features (default: bf16 under --bf16, else fp32)")),
    ]
    if embedded:
        flags += [
            ("--seq-length-buckets", dict(type=int, help=(
                "pad every micro-batch to the smallest of this many evenly spaced lengths up "
                "to --seq-length (1: always --seq-length), so compiled attention sees at most "
                "this many shapes"))),
            ("--pack-sequences", dict(action="store_true", help=(
                "pack consecutive training conversations (in sampler order, greedily, whole) "
                "into rows of up to --seq-length tokens, so long-context training does not "
                "compute padding; each conversation stays a document of its own: the target "
                "attends and positions it alone (megatron's THD packed sequences, what "
                "--reset-attention-mask and --reset-position-ids do in megatron's GPT "
                "training), no block crosses a document boundary and a block sees only its own "
                "document's context. The data position still counts conversations; held-out "
                "tau is measured unpacked. Not with --context-parallel-size > 1"))),
            ("--embedded-answers", dict(choices=("target", "human"), help=(
                "the embedded default's training answers: the target's own (regenerated once, "
                "taps cached) or, for comparison, the human replies in chitchat to the same "
                "prompts (taps computed online)"))),
        ]
    _group(p, "data", DataArgs, flags)


def add_taps_flags(p: argparse.ArgumentParser) -> None:
    """Which target layers feed the draft (default: spread as the reference for the draft's
    depth)."""
    _group(p, "taps", DFlashArgs, [
        ("--num-draft-layers", dict(type=int)),
        ("--target-layer-ids", dict(type=int, nargs="+")),
    ])


def add_dflash_flags(p: argparse.ArgumentParser) -> None:
    add_taps_flags(p)
    _group(p, "DFlash", DFlashArgs, [
        ("--block-size", dict(type=int)),
        ("--mask-token-id", dict(type=int, help=(
            "default: found from the target's tokenizer (its mask token, a <|MASK|>/[MASK]/"
            "<mask> token, a reserved special token, or the first embedding row past its "
            "ids); the embedded default uses 16 (<empty_output>)"))),
        ("--num-anchors", dict(type=int)),
        ("--loss-gamma", dict(type=float)),
        ("--distill-weight", dict(type=float, help=(
            "weight of distillation to the target's next-token distribution (0 = hard labels "
            "only, 1 = distillation only); default 0"))),
        ("--attention", dict(choices=ATTENTION_CHOICES, help=(
            "draft training attention: 'dense' scores every block against the whole packed "
            "sequence under a mask; 'sparse' computes only what each block sees "
            "(FlexAttention on GPU), so its cost follows the number of anchors; 'auto': "
            "sparse (both are exact; sparse was the faster one on GPU and CPU)"))),
        ("--loss-chunk-size", dict(type=int, help=(
            "supervised block slots projected through the LM head per chunk: the loss never "
            "holds more than this many rows of vocabulary logits"))),
        ("--draft-num-attention-heads", dict(type=int)),
        ("--draft-num-query-groups", dict(type=int)),
        ("--draft-kv-channels", dict(type=int)),
        ("--draft-ffn-hidden-size", dict(type=int)),
    ])
    _group(p, "DFlash2 and the draft's logits", DFlashArgs, [
        ("--draft-variant", dict(choices=VARIANTS, help=(
            "dflash2: the DFlash layers with a two-tap grouped dynamic causal convolution around "
            "each attention and MLP, and a low-rank candidate selector that re-ranks each slot's "
            "top-K tokens along the block (architectures DFlash2DraftModel)"))),
        ("--conv-kernel-size", dict(type=int, help="DFlash2: taps of each convolution, at most "
                                                   "--block-size (default 2)")),
        ("--conv-group-size", dict(type=int, help="DFlash2: channels sharing one dynamic tap; "
                                                  "divides the hidden size (default 16)")),
        ("--selector-rank", dict(type=int, help="DFlash2: rank of the selector's codebooks "
                                                "(default 256)")),
        ("--selector-top-k", dict(type=int, help="DFlash2: candidates the selector re-ranks per "
                                                 "slot, at most the vocabulary (default 16)")),
        ("--selector-loss-weight", dict(type=float, help=(
            "DFlash2: weight of the selector's K-way cross-entropy (over the top-K candidates, "
            "the gold token injected when missing) added to the DFlash loss"))),
        ("--output-multiplier", dict(type=float, help="scale of the draft's logits (before the "
                                                      "softcap, the loss and the proposal)")),
        ("--final-logit-softcapping", dict(type=float, help="c: the draft's logits become "
                                                            "c*tanh(logits/c) (default: off)")),
        ("--input-embedding-scale", dict(type=float, help="scale of the block tokens' target "
                                                          "embedding")),
    ])
    _group(p, "sliding-window draft layers (exported as layer_types, sliding_window, is_causal)",
           DFlashArgs, [
        ("--draft-sliding-window", dict(type=int, metavar="W", help=(
            "sliding-window draft layers: a block query at position P sees only the context "
            "keys after P-W (its own block whole: W >= --block-size), so a long context costs "
            "the draft at most W keys per query; every draft layer slides unless "
            "--draft-layer-types says which"))),
        ("--draft-layer-types", dict(nargs="+", choices=LAYER_TYPE_CHOICES, help=(
            "one per draft layer: full (sees the whole context) or sliding (the "
            "--draft-sliding-window keys before it), e.g. 'sliding sliding sliding full'"))),
        ("--draft-causal", dict(action=argparse.BooleanOptionalAction, help=(
            "causal attention within the block on every draft layer (--draft-causal) or on none "
            "(--no-draft-causal; the published Qwen3.6 drafters); default: the reference's, "
            "sliding layers causal and full ones not"))),
    ])


def add_parallel_flags(p: argparse.ArgumentParser, *, pipeline: bool = True,
                       context: bool = True) -> None:
    flags = [("--tensor-model-parallel-size", dict(type=int))]
    if pipeline:
        flags += [
            ("--pipeline-model-parallel-size", dict(type=int, help=(
                "split the target's layers over this many stages; the draft runs on the last "
                "one"))),
            ("--virtual-pipeline-model-parallel-size", dict(type=int, help=(
                "not supported (the features travel in the non-interleaved 1F1B schedule); "
                "accepted only to reject it with a clear message"))),
        ]
    flags += [("--sequence-parallel", dict(action="store_true"))]
    if context:
        flags += [
            ("--context-parallel-size", dict(type=int, help=(
                "split the target's sequence over this many ranks (megatron's 2 x CP "
                "load-balanced chunks; TE's CP attention on GPU, all-gathered K/V on the local "
                "backend); the draft gathers the taps back and each rank trains its share of "
                "the blocks. World = TP x PP x CP x DP"))),
            ("--cp-comm-type", dict(choices=CP_COMM_TYPES, help=(
                "Transformer Engine's K/V exchange for CP attention (megatron's cp_comm_type; "
                "the local backend always all-gathers)"))),
        ]
    flags += [
        ("--expert-model-parallel-size", dict(type=int, help=(
            "MoE targets: split each MoE layer's experts over this many ranks (megatron's "
            "expert-parallel groups, across data-parallel ranks); must divide the target's "
            "num_experts"))),
        ("--expert-tensor-parallel-size", dict(type=int, help=(
            "MoE targets: split each expert's weights over this many ranks (default: "
            "--tensor-model-parallel-size)"))),
        ("--moe-token-dispatcher-type", dict(choices=DISPATCHERS, help=(
            "MoE targets: how tokens reach their experts' ranks (megatron's dispatchers); "
            "allgather needs every expert-parallel rank's micro-batch to have the same shape "
            "(--seq-length-buckets 1 when expert-parallel ranks hold different data)"))),
        ("--moe-grouped-gemm", dict(action="store_true", help=(
            "MoE targets: run each rank's experts as one grouped GEMM (Transformer Engine, "
            "GPU only)"))),
    ]
    _group(p, "parallelism", ParallelArgs, flags)


def add_precision_flags(p: argparse.ArgumentParser, *, draft: bool = True) -> None:
    flags = [
        ("--bf16", dict(action="store_true")),
        ("--transformer-impl", dict(choices=["local", "transformer_engine"], help=(
            "megatron's layer implementation for target and draft: 'local' (torch, runs on "
            "CPU) or Transformer Engine's fused kernels (GPU, needed for FP8)"))),
    ]
    if draft:
        flags += [
            ("--fp8-format", dict(choices=FP8_FORMATS, help=(
                "train the draft's transformer layers in FP8 with this format (hybrid: e4m3 "
                "forward, e5m2 gradients)"))),
            ("--fp8-recipe", dict(choices=FP8_RECIPES, help=(
                "draft FP8 scaling recipe (default delayed); mxfp8 needs Blackwell"))),
        ]
    flags += [
        ("--target-fp8-format", dict(choices=FP8_FORMATS, help=(
            "run the frozen target's forward in FP8 with this format"))),
        ("--target-fp8-recipe", dict(choices=FP8_RECIPES, help=(
            "target FP8 scaling recipe (default delayed)"))),
    ]
    _group(p, "precision (FP8: Transformer Engine, --transformer-impl transformer_engine)",
           PrecisionArgs, flags)


def add_training_flags(p: argparse.ArgumentParser) -> None:
    _group(p, "training", TrainingArgs, [
        ("--micro-batch-size", dict(type=int)),
        ("--global-batch-size", dict(type=int)),
        ("--train-iters", dict(type=int)),
        ("--seed", dict(type=int)),
        ("--max-skipped-steps", dict(type=int, help=(
            "a step whose loss or gradients are not finite makes no update; stop after this "
            "many such steps in a row"))),
    ])


def add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    _group(p, "optimizer", OptimizerArgs, [
        ("--lr", dict(type=float)),
        ("--min-lr", dict(type=float)),
        ("--lr-warmup-fraction", dict(type=float)),
        ("--lr-decay-style", dict(choices=["cosine", "linear", "constant"])),
        ("--clip-grad", dict(type=float)),
        ("--weight-decay", dict(type=float)),
        ("--adam-beta1", dict(type=float)),
        ("--adam-beta2", dict(type=float)),
        ("--no-use-distributed-optimizer", dict(
            dest="use_distributed_optimizer", action="store_false",
            help="use megatron's plain DDP optimizer (needs --bf16: megatron's plain fp32 "
                 "optimizer has no inf/NaN check)")),
    ])


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    _group(p, "checkpointing", CheckpointArgs, [
        ("--save", dict(help="checkpoint directory")),
        ("--load", dict(help="resume from this checkpoint directory")),
        ("--export", dict(metavar="DIR", help=(
            "at the end of training (or after a signal exit that saved) write the draft in the "
            "reference HF format (as tools/export_hf.py) to DIR, which must be new, empty or "
            "an earlier export (replaced)"))),
        ("--finetune", dict(action="store_true", help=(
            "with --load: load only the draft weights (e.g. from tools/import_hf.py) and start "
            "the optimizer, LR schedule and data from scratch"))),
        ("--save-interval", dict(type=int)),
        ("--exit-signal-handler", dict(action=argparse.BooleanOptionalAction, help=(
            "on SIGTERM or SIGUSR1 (SLURM pre-emption / time-limit warning) finish the "
            "iteration, save a checkpoint to --save and exit 0 (all ranks together)"))),
    ])


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    _group(p, "logging", LoggingArgs, [
        ("--log-interval", dict(type=int)),
        ("--eval-interval", dict(type=int, help="measure held-out tau every N iterations "
                                                "(always at start and end)")),
        ("--eval-samples", dict(type=int)),
        ("--tensorboard-dir", dict()),
        ("--metrics-file", dict(help="every iteration's metrics as JSON lines (default: "
                                     "<--save>/metrics.jsonl with --save, else none)")),
    ])


def build_parser() -> argparse.ArgumentParser:
    """The main job's flags (`examples/pretrain_dflash.py`)."""
    p = argparse.ArgumentParser(
        description="Train a DFlash drafter for a frozen target with megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (add_target_flags, add_data_flags, add_dflash_flags, add_parallel_flags,
                add_precision_flags, add_training_flags, add_optimizer_flags,
                add_checkpoint_flags, add_logging_flags):
        add(p)
    return p


_CLASSES = {"target": TargetArgs, "data": DataArgs, "dflash": DFlashArgs,
            "parallel": ParallelArgs, "precision": PrecisionArgs, "training": TrainingArgs,
            "optimizer": OptimizerArgs, "checkpoint": CheckpointArgs, "logging": LoggingArgs}


def run_config(ns: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed flags; fields without a flag keep their dataclass default."""
    given = vars(ns)
    return RunConfig(**{
        name: cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
        for name, cls in _CLASSES.items()})


def embedded_flags_given(argv: list[str]) -> bool:
    """Whether the flags name a target or data (else the embedded default runs)."""
    return any(a.split("=")[0] in ("--target", "--train-data") for a in argv)


def parse_run_config(parser: argparse.ArgumentParser, argv: list[str],
                     embedded_defaults: dict | None = None) -> RunConfig:
    """Parse `argv`; with neither --target nor --train-data, `embedded_defaults` replace the
    flag defaults (the embedded demo's small shapes)."""
    if embedded_defaults and not embedded_flags_given(argv):
        parser.set_defaults(**embedded_defaults)
    return run_config(parser.parse_args(argv))
