"""Our side of `tools/benchmark_dflash.py`: one training step configuration, measured.

    python tools/benchmark_step.py --target-config DIR --seq-length 1024 --num-anchors 128 \\
        --num-draft-layers 1 --precision fp32 --attention sparse --steps 2 --json case.json

The step is exactly a training step (`training.trainer.train_step` over `run_schedule`, as
`Trainer` runs it): the frozen target (random weights from DIR's HF `config.json`) built as
training builds it without distillation, up to its deepest tapped layer, with feature capture; the
draft's forward and backward with the chunked LM head and loss over the supervised slots; the
DistributedOptimizer's update. Every step takes a fresh micro-batch prepared as training prepares
one (`microbatch_producer`: new random tokens, their last 90% response, anchors from the data
position, `prepare_microbatch` with the mask), from a `Prefetcher` that prepares it two ahead in
its background thread (training's depth at one micro-batch per step: `Trainer.prefetch_depth`),
pins it and copies it to the device — so preparation costs the step what it costs training.

`step_cost.measure_step` writes seconds per step, loss and peak memory to --json before one more
step is counted by FlopCounterMode; the counter is not run where it cannot see the step
(Transformer Engine GEMMs, FlexAttention on CUDA), and a counter failure is recorded, not raised.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib

import torch
from megatron.core import tensor_parallel
from transformers import AutoConfig

from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.distributed import device as training_device, distributed
from megatron_dflash.fp8 import FP8_RECIPES, FP8Settings, sequence_multiple
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS
from megatron_dflash.run.config import OptimizerArgs, ParallelArgs
from megatron_dflash.specs import build_draft
from megatron_dflash.step_cost import add_case_arguments, json_recorder, measure_step
from megatron_dflash.targets import build_target, target_transformer_config
from megatron_dflash.training.builders import build_optimizer, wrap_training_chunk
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.prefetch import Prefetcher
from megatron_dflash.training.step import anchor_generator, prepare_microbatch
from megatron_dflash.training.trainer import run_schedule, train_step

PRECISIONS = ("fp32", "bf16") + tuple(f"fp8-{r}" for r in FP8_RECIPES)


def dflash_config(args, hf, tcfg) -> DFlashConfig:
    """The benchmark's drafter: --block-size, --num-draft-layers, --num-anchors, mask id V-1."""
    return DFlashConfig(block_size=args.block_size, num_draft_layers=args.num_draft_layers,
                        mask_token_id=hf.vocab_size - 1, num_anchors=args.num_anchors,
                        ).resolve(tcfg, vocab_size=hf.vocab_size,
                                  target_rope_theta=hf.rope_parameters["rope_theta"])


def microbatch_producer(args, batch: int, vocab: int, cfg: DFlashConfig, attention: str,
                        align: int = 1):
    """`produce()` -> (micro-batch, data position after it), as `MicroBatches.next` feeds a
    `Prefetcher` in training: `batch` sequences of new random tokens each call (padded to
    `align` for FP8 GEMMs), their last 90% response, prepared by `prepare_microbatch` with the
    anchors of their data position. `produce.digests` lists a digest of each micro-batch made."""
    g = torch.Generator().manual_seed(args.seed)
    seq = args.seq_length + (-args.seq_length % align)
    positions = torch.arange(seq).expand(batch, seq)
    loss_mask = ((positions >= args.seq_length // 10) & (positions < args.seq_length)).contiguous()
    lengths = torch.full((batch,), args.seq_length)
    position = 0

    def produce():
        nonlocal position
        tokens = torch.randint(0, vocab - 1, (batch, seq), generator=g)
        tokens[:, args.seq_length:] = 0  # alignment padding
        mb = prepare_microbatch(tokens, loss_mask, cfg, anchor_generator(args.seed, position),
                                attention, align, lengths)
        position += batch
        produce.digests.append(hashlib.sha1(tokens.numpy().tobytes()
                                            + mb["block_input_ids"].numpy().tobytes()
                                            ).hexdigest()[:16])
        return mb, position

    produce.digests = []
    return produce


def run(args, device: torch.device, record) -> None:
    """Build the case, then `measure_step` over `train_step`; `record(case)` writes it down."""
    hf = AutoConfig.from_pretrained(args.target_config)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    fp8 = (FP8Settings(args.fp8_format, args.precision.removeprefix("fp8-"))
           if args.precision.startswith("fp8") else FP8Settings())
    tcfg = target_transformer_config(hf, params_dtype=dtype, **fp8.fields())
    # Random weights, initialised where they live (megatron's init on the GPU is fast).
    tcfg = dataclasses.replace(tcfg, perform_initialization=True,
                               use_cpu_initialization=device.type == "cpu")
    cfg = dflash_config(args, hf, tcfg)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    target = build_target(hf, tcfg, backend=args.backend, last_layer=max(cfg.target_layer_ids))
    dcfg = draft_transformer_config(cfg, tcfg, perform_initialization=True,
                                    use_cpu_initialization=device.type == "cpu", **fp8.fields())
    draft = build_draft(cfg, dcfg, args.backend, args.attention)
    model = wrap_training_chunk(DFlashTrainingModule(target, draft).to(device), dcfg,
                                use_distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(
        OptimizerArgs(lr=1e-4, min_lr=1e-5, lr_warmup_fraction=0.0, lr_decay_style="constant"),
        model, bf16=dtype == torch.bfloat16, train_iters=args.warmup + args.steps + 1)
    b = args.micro_batch_size
    produce = microbatch_producer(args, b, hf.vocab_size, cfg, args.attention,
                                  sequence_multiple(1, False, fp8))  # FP8 GEMMs: 16/32 tokens
    consumed = 0
    case = {"attention": args.attention, "tokens": b * args.seq_length,
            "block_tokens": b * min(args.num_anchors, args.seq_length - args.block_size + 1)
            * args.block_size}

    def run_step(microbatches, forward_only):
        return run_schedule(model, microbatches, cfg, 0.0, args.loss_chunk_size, b, forward_only)

    with Prefetcher(produce, device, depth=2) as ahead:
        def step():
            nonlocal consumed
            mb, _ = ahead.next()
            consumed += 1
            reports, _ = train_step(model, optimizer, scheduler, [mb], run_step)
            return sum(r["loss"][0] for r in reports) / sum(r["loss"][1] for r in reports)

        def write(result: dict) -> None:
            record(case | result | {"batches": consumed,
                                    "distinct_batches": len(set(produce.digests[:consumed]))})

        def broken():  # --break-flop-counter: a step that fails under the counter
            raise TypeError("flop counter failure forced by --break-flop-counter")

        blind = ("Transformer Engine's GEMMs bypass the dispatcher" if args.backend == "te"
                 else "FlexAttention is invisible to FlopCounterMode"
                 if args.attention == "sparse" and device.type == "cuda" else None)
        if blind:
            case["counter_error"] = f"not counted: {blind}"
        measure_step(step, args.warmup, args.steps, write,
                     None if blind else broken if args.break_flop_counter else step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default="hybrid")
    p.add_argument("--attention", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--backend", choices=("local", "te"), default="local")
    p.add_argument("--loss-chunk-size", type=int, default=DEFAULT_CHUNK_ROWS)
    return p


def main(argv=None) -> dict:
    """One case in its own world of one; the result also goes to --json."""
    args = build_parser().parse_args(argv)
    result = {}
    record = json_recorder(args.json, result)
    with distributed(ParallelArgs(), seed=args.seed):
        run(args, training_device(), record)
    return result


if __name__ == "__main__":
    main()
