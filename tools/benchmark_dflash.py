"""Throughput of one DFlash training step, for bf16 and each FP8 recipe, dense and sparse attention.

    python tools/benchmark_dflash.py --shape qwen3-8b --json bench.json            (GPU)
    python tests/cpu_run.py tools/benchmark_dflash.py --shape tiny --seq-length 64 \
        --num-anchors 4 --block-size 8 --num-draft-layers 2 --steps 1 --json out.json   (CPU smoke)

One step is exactly a training step (`training.loop.train_step`): the frozen target's forward with
feature capture, the draft's forward and backward, and the DistributedOptimizer's update, on one
micro-batch of `--micro-batch-size` random sequences whose last 90% are response tokens. The
target is random-initialised with the layer shape of the named model (`SHAPES`); the draft has
the target's layer geometry. A case that cannot run here (FP8 without Transformer Engine or a
GPU that has the recipe) is reported as skipped; one that fails (e.g. dense attention out of
memory) is reported with its error, and the others still run.

Model FLOPs per step (a multiply-add is 2; only work the model needs, so neither the masked-out
part of dense attention nor the unused query projection of the context counts). S = sequence,
Q = N*B block tokens, c_j = context block j sees (its anchor, 0 when unkept), H hidden, V vocab,
q/kv = query/key-value width (heads x head_dim), F = FFN width, K taps:
  target forward   per layer 2S*H*(2q + 2kv) + 6S*H*F + 2q*S*(S+1) (causal attention)
  target LM head   2S*H*V
  draft forward    fc 2S*K*H*H; per layer 2Q*H*(2q + 2kv) + 2S*H*2kv (context K/V) + 6Q*H*F
                   + 4q*B*sum_j(c_j + B) (block-sparse attention)
  draft backward   2x the layers and attention; 1x fc (weight gradient only: its input is the
                   frozen target's)
  draft LM head    2Q*H*V forward + 2Q*H*V input gradient (the head is frozen)
MFU = model FLOPs / step time / peak (--peak-tflops-bf16, default 989 for H100 SXM dense bf16;
--peak-tflops-fp8, default 1979, for the FP8 cases).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import build_module
from transformers import LlamaConfig, Qwen3Config

from megatron_dflash.anchors import sample_anchors
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.fp8 import FP8_RECIPES, FP8Settings, fp8_unavailable_reason, sequence_multiple
from megatron_dflash.masks import block_context_lengths
from megatron_dflash.specs import get_dflash_model_spec
from megatron_dflash.target import build_target, target_transformer_config
from megatron_dflash.training.loop import build_optimizer, train_step, wrap_training_chunk
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.step import anchor_generator, prepare_microbatch

_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 1e6}
SHAPES = {
    "tiny": (Qwen3Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=256, rope_parameters=_QWEN3_ROPE)),
    "qwen3-1.7b": (Qwen3Config, dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                     vocab_size=151936, tie_word_embeddings=True,
                                     rope_parameters=_QWEN3_ROPE, max_position_embeddings=40960)),
    "qwen3-8b": (Qwen3Config, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   vocab_size=151936, rope_parameters=_QWEN3_ROPE,
                                   max_position_embeddings=40960)),
    "llama3.1-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})),
}
PRECISIONS = ("bf16",) + tuple(f"fp8-{r}" for r in FP8_RECIPES)


def hf_config(shape: str):
    cls, kw = SHAPES[shape]
    return cls(architectures=[cls.__name__.replace("Config", "ForCausalLM")], **kw)


def model_flops(t, d: DFlashConfig, vocab: int, seq_len: int,
                context_lengths: torch.Tensor) -> dict:
    """The model FLOPs of one step by part (see the module docstring); `t` is the target's
    TransformerConfig, `context_lengths` [b, N] what each block sees."""
    b, n = context_lengths.shape
    S, B, H = seq_len, d.block_size, t.hidden_size
    Q = n * B
    tq, tkv = t.num_attention_heads * t.kv_channels, t.num_query_groups * t.kv_channels
    dq, dkv = d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim
    target_layer = 2 * S * H * (2 * tq + 2 * tkv) + 6 * S * H * t.ffn_hidden_size \
        + 2 * tq * S * (S + 1)
    draft_layer = 2 * Q * H * (2 * dq + 2 * dkv) + 2 * S * H * 2 * dkv \
        + 6 * Q * H * d.ffn_hidden_size
    attention = 4 * dq * B * (int(context_lengths.sum()) + b * n * B)  # whole micro-batch
    fc = 2 * S * len(d.target_layer_ids) * H * H
    out = {
        "target_forward": b * t.num_layers * target_layer,
        "target_lm_head": b * 2 * S * H * vocab,
        "draft_forward": d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_backward": 2 * d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_lm_head": b * 2 * 2 * Q * H * vocab,
    }
    out["total"] = sum(out.values())
    out["draft_attention_density"] = attention / (4 * dq * b * Q * (S + Q))
    return out


def build_draft_chunk(target, tcfg, cfg, backend, attention, fp8: FP8Settings, device):
    """The DDP-wrapped training chunk around `target` with a fresh draft (as
    `loop.build_models` builds it)."""
    dcfg = draft_transformer_config(cfg, tcfg, **fp8.fields())
    draft = build_module(get_dflash_model_spec(cfg.num_draft_layers, backend, attention),
                         config=dcfg, dflash_config=cfg)
    return wrap_training_chunk(DFlashTrainingModule(target, draft).to(device), dcfg,
                               use_distributed_optimizer=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    parallel_state.get_global_memory_buffer().buffer.clear()  # dense attention's score buffers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_case(target, tcfg, cfg, mb, flops, args, attention, fp8, peak_tflops, device) -> dict:
    torch.manual_seed(args.seed)  # every case starts from the same draft weights
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = build_draft_chunk(target, tcfg, cfg, args.backend, attention, fp8, device)
    opt_args = SimpleNamespace(lr=1e-4, min_lr=1e-5, weight_decay=0.0, adam_beta1=0.9,
                               adam_beta2=0.95, clip_grad=1.0, bf16=tcfg.bf16,
                               use_distributed_optimizer=True, lr_warmup_fraction=0.0,
                               train_iters=args.warmup + args.steps, lr_decay_style="constant",
                               distill_weight=0.0, micro_batch_size=args.micro_batch_size)
    optimizer, scheduler = build_optimizer(opt_args, model)
    for _ in range(args.warmup):
        train_step(model, optimizer, scheduler, [mb], cfg, opt_args)
    _sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        reports, _ = train_step(model, optimizer, scheduler, [mb], cfg, opt_args)
    _sync()
    seconds = (time.perf_counter() - start) / args.steps
    loss = sum(r["loss"][0] for r in reports) / sum(r["loss"][1] for r in reports)
    tokens = mb["tokens"].numel()
    return {
        "ms_per_step": 1e3 * seconds,
        "target_tokens_per_s": tokens / seconds,
        "draft_tokens_per_s": mb["block_input_ids"].numel() / seconds,
        "tflops": flops["total"] / seconds / 1e12,
        "mfu": flops["total"] / seconds / (peak_tflops * 1e12),
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if torch.cuda.is_available() else None),
        "loss": float(loss),
    }


def benchmark(args) -> dict:
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    hf = hf_config(args.shape)
    base = target_transformer_config(hf, params_dtype=torch.bfloat16)
    # Random weights, initialised where they live (megatron's init on the GPU is fast).
    base = dataclasses.replace(base, perform_initialization=True,
                               use_cpu_initialization=device.type == "cpu")
    cfg = DFlashConfig(block_size=args.block_size, num_draft_layers=args.num_draft_layers,
                       mask_token_id=hf.vocab_size - 1, num_anchors=args.num_anchors,
                       ).resolve(base, vocab_size=hf.vocab_size,
                                 target_rope_theta=hf.rope_parameters["rope_theta"])
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, hf.vocab_size - 1, (args.micro_batch_size, args.seq_length),
                           generator=g)
    loss_mask = torch.arange(args.seq_length).expand_as(tokens) >= args.seq_length // 10
    # Padded to what FP8 GEMMs need (a no-op for the default shapes: 3072 and 512 x 16).
    align = sequence_multiple(1, False, *(FP8Settings(args.fp8_format, p.removeprefix("fp8-"))
                                          for p in args.precisions if p != "bf16"))
    tokens = F.pad(tokens, (0, -args.seq_length % align))
    loss_mask = F.pad(loss_mask, (0, -args.seq_length % align))
    mbs = {a: prepare_microbatch(tokens, loss_mask, cfg, anchor_generator(args.seed, 0), a, align)
           for a in args.attention}
    anchors, keep = sample_anchors(loss_mask, cfg.block_size, cfg.num_anchors,
                                   anchor_generator(args.seed, 0))
    flops = model_flops(base, cfg, hf.vocab_size, tokens.shape[1],
                        block_context_lengths(anchors, keep))
    result = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "backend": args.backend,
              "config": {k: getattr(args, k) for k in ("seq_length", "num_anchors", "block_size",
                                                       "num_draft_layers", "micro_batch_size",
                                                       "steps", "warmup", "fp8_format")},
              "flops": flops, "cases": []}
    for precision in args.precisions:
        fp8 = (FP8Settings() if precision == "bf16"
               else FP8Settings(args.fp8_format, precision.removeprefix("fp8-")))
        reason = fp8_unavailable_reason(fp8) or (
            "FP8 needs --backend te" if fp8.enabled and args.backend != "te" else None)
        if reason is not None:
            result["cases"] += [{"precision": precision, "attention": a, "skipped": reason}
                                for a in args.attention]
            _write(result, args.json)
            continue
        tcfg = fp8.apply(base)  # the target runs its forward in the same precision
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        target = build_target(hf, tcfg, backend=args.backend)
        peak = args.peak_tflops_fp8 if fp8.enabled else args.peak_tflops_bf16
        for attention in args.attention:
            case = {"precision": precision, "attention": attention}
            try:
                case.update(run_case(target, tcfg, cfg, mbs[attention], flops, args, attention,
                                     fp8, peak, device))
            except torch.OutOfMemoryError:
                case["error"] = "out of memory"
            except Exception as e:  # noqa: BLE001 - report the case and go on with the others
                case["error"] = f"{type(e).__name__}: {e}"[:500]
            result["cases"].append(case)
            print(_row(case), flush=True)
            _write(result, args.json)  # after every case: a run cut short keeps what it measured
            _free()
        del target
        _free()
    return result


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _row(case: dict) -> str:
    head = f"{case['precision']:>15} {case['attention']:>7} "
    if "ms_per_step" not in case:
        return head + ("skipped: " + case["skipped"] if "skipped" in case
                       else "error: " + case["error"])
    mem = case["peak_memory_gib"]
    return head + (f"{case['ms_per_step']:10.1f} {case['target_tokens_per_s']:12.0f} "
                   f"{case['draft_tokens_per_s']:12.0f} {case['tflops']:8.1f} "
                   f"{100 * case['mfu']:6.1f} {'-' if mem is None else f'{mem:8.1f}':>8} "
                   f"{case['loss']:8.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--seq-length", type=int, default=3072)
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-draft-layers", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                   default=["bf16", "fp8-delayed", "fp8-tensorwise", "fp8-blockwise"])
    p.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default="hybrid")
    p.add_argument("--attention", nargs="+", choices=("sparse", "dense"),
                   default=["sparse", "dense"], help="dense last: it may run out of memory")
    p.add_argument("--backend", choices=("local", "te"), default=None,
                   help="default: te when Transformer Engine and a GPU are there, else local")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops-bf16", type=float, default=989.0)
    p.add_argument("--peak-tflops-fp8", type=float, default=1979.0)
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.backend is None:
        args.backend = "te" if fp8_unavailable_reason(FP8Settings("hybrid")) is None else "local"
    own_group = not dist.is_initialized()  # a caller (a test) may have one already
    if own_group:
        if "RANK" not in os.environ:  # plain `python tools/benchmark_dflash.py`
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    parallel_state.initialize_model_parallel(1, 1)
    try:
        print(f"{'precision':>15} {'attn':>7} {'ms/step':>10} {'target tok/s':>12} "
              f"{'draft tok/s':>12} {'TFLOP/s':>8} {'MFU %':>6} {'peak GiB':>8} {'loss':>8}",
              flush=True)
        result = benchmark(args)
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()
    f = result["flops"]
    print("model TFLOP per step: " + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in f.items()
                                               if k not in ("total", "draft_attention_density"))
          + f"; total {f['total'] / 1e12:.4g} (draft attention density "
          f"{f['draft_attention_density']:.3f})")
    return result


if __name__ == "__main__":
    main()
