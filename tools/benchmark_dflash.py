"""One DFlash training step, timed side by side with SpecForge 0.2.0's own DFlash step.

    python tools/benchmark_dflash.py --shape qwen3-8b --json bench.json                  (GPU)
    python tools/benchmark_dflash.py --shape qwen3-cpu --seq-length 1024 --num-anchors 128 \
        --num-draft-layers 1 --precisions fp32 --attention sparse --steps 2 --warmup 1    (CPU)

Runs on CPU or GPU as it is. Our step is exactly a training step (`training.trainer.train_step`):
the frozen target's forward up to its deepest tapped layer with feature capture (as training
builds it without distillation), the draft's forward and backward with the chunked LM head and
loss over the supervised slots, and the DistributedOptimizer's update, on one micro-batch of
`--micro-batch-size` random sequences whose last 90% are response tokens. SpecForge's side
(`tools/specforge_baseline.py`: its `OnlineDFlashModel`, FSDP/DDP backend, BF16Optimizer and
`TrainerCore.train_step`) trains the same shape: target (random HF model, hidden states only),
anchors, block size and draft layers; it has no FP8. Each case runs in a fresh process, so its
peak memory (CUDA allocator peak; peak RSS on CPU, weights included) is its own. A case that
cannot run here (FP8 without Transformer Engine or a GPU that has the recipe; SpecForge not
installed: `pip install --no-deps specforge==0.2.0`) is reported as skipped; one that fails
(e.g. dense attention out of memory) is reported with its error, and the others still run.

Useful FLOPs per step (a multiply-add is 2; only work the objective needs, the same for both
sides, so neither masked-out attention, nor the unused query rows of the context, nor target
layers past the deepest tap, nor any target LM head counts). S = sequence, Q = N*B block tokens,
c_j = context block j sees (its anchor, 0 when unkept), M = supervised slots (at most N*(B-1)),
H hidden, V vocab, q/kv = query/key-value width (heads x head_dim), F = FFN width, K taps,
L' = deepest tap + 1:
  target forward   L' x per layer 2S*H*(2q + 2kv) + 6S*H*F + 2q*S*(S+1) (causal attention)
  draft forward    fc 2S*K*H*H; per layer 2Q*H*(2q + 2kv) + 2S*H*2kv (context K/V) + 6Q*H*F
                   + 4q*B*sum_j(c_j + B) (block-sparse attention)
  draft backward   2x the layers and attention; 1x fc (weight gradient only: its input is the
                   frozen target's)
  draft LM head    2M*H*V forward + 2M*H*V input gradient (the head is frozen)
Executed FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one more step
(CPU flash attention counted as GPU SDPA is, halved when causal); executed / useful shows the
work a side spends beyond the objective (SpecForge: e.g. the LM head recomputed in backward).
MFU = useful FLOPs / step time / peak (--peak-tflops-bf16, default 989 for H100 SXM dense bf16;
--peak-tflops-fp8, default 1979, for the FP8 cases).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, Qwen3Config

from megatron_dflash.distributed import distributed
from megatron_dflash.anchors import block_loss_mask, sample_anchors
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.fp8 import FP8_RECIPES, FP8Settings, fp8_unavailable_reason, sequence_multiple
from megatron_dflash.masks import block_context_lengths
from megatron_dflash.targets import build_target, target_transformer_config
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS
from megatron_dflash.run.config import OptimizerArgs, ParallelArgs
from megatron_dflash.specs import build_draft
from megatron_dflash.training.builders import build_optimizer, wrap_training_chunk
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.step import anchor_generator, prepare_microbatch, to_device
from megatron_dflash.training.trainer import run_schedule, train_step

_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 1e6}
SHAPES = {
    "tiny": (Qwen3Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=256, rope_parameters=_QWEN3_ROPE)),
    # Qwen3 layer widths at 1/4 scale, 2 layers, the real vocabulary: a CPU-sized step whose
    # vocabulary work is what an 8B-class step's is.
    "qwen3-cpu": (Qwen3Config, dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                                    vocab_size=151936, rope_parameters=_QWEN3_ROPE,
                                    max_position_embeddings=40960)),
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
PRECISIONS = ("fp32", "bf16") + tuple(f"fp8-{r}" for r in FP8_RECIPES)


def hf_config(shape: str):
    cls, kw = SHAPES[shape]
    return cls(architectures=[cls.__name__.replace("Config", "ForCausalLM")], **kw)


def model_flops(t, d: DFlashConfig, vocab: int, seq_len: int, context_lengths: torch.Tensor,
                supervised: int) -> dict:
    """The useful FLOPs of one step by part (see the module docstring); `t` is the target's
    TransformerConfig, `context_lengths` [b, N] what each block sees, `supervised` the number of
    supervised block slots (the rows the LM head needs)."""
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
        "target_forward": b * (max(d.target_layer_ids) + 1) * target_layer,
        "draft_forward": d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_backward": 2 * d.num_draft_layers * (b * draft_layer + attention) + b * fc,
        "draft_lm_head": 2 * 2 * supervised * H * vocab,
    }
    out["total"] = sum(out.values())
    out["draft_attention_density"] = attention / (4 * dq * b * Q * (S + Q))
    return out


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode has no formula for torch's CPU flash attention (SDPA on CPU, as the
    target's `SDPACoreAttention` and SpecForge's draft run it): count its two matmuls per
    (query, key) pair as torch counts GPU SDPA (backward: four), GQA included, halved when
    causal (the kernel skips the masked half)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    def matmuls(query, key, value, is_causal):  # shapes
        b, heads, s_q, d = query
        return 2 * b * heads * s_q * key[-2] * (d + value[-1]) // (2 if is_causal else 1)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_val=None,
                 **kwargs):
        return matmuls(query, key, value, is_causal)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                  *args, out_val=None, **kwargs):
        return 2 * matmuls(query, key, value, is_causal)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_and_count(step, args) -> dict:
    """ms/step over `args.steps` after `args.warmup`, then one more step counted by
    FlopCounterMode, and the process's peak memory (CUDA allocator, or peak RSS on CPU)."""
    for _ in range(args.warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync()
    seconds = (time.perf_counter() - start) / args.steps
    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "loss": float(loss), "executed_flops": counter.get_total_flops(),
            "peak_memory_gib": peak / 2**30}


def _precision(name: str) -> tuple[torch.dtype, FP8Settings | None]:
    """(parameter dtype, FP8 settings) of a --precisions entry."""
    if name in ("fp32", "bf16"):
        return (torch.float32 if name == "fp32" else torch.bfloat16), FP8Settings()
    return torch.bfloat16, None


def _inputs(args, hf):
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, hf.vocab_size - 1, (args.micro_batch_size, args.seq_length),
                           generator=g)
    loss_mask = torch.arange(args.seq_length).expand_as(tokens) >= args.seq_length // 10
    return tokens, loss_mask


def _dflash_config(args, hf, tcfg) -> DFlashConfig:
    return DFlashConfig(block_size=args.block_size, num_draft_layers=args.num_draft_layers,
                        mask_token_id=hf.vocab_size - 1, num_anchors=args.num_anchors,
                        ).resolve(tcfg, vocab_size=hf.vocab_size,
                                  target_rope_theta=hf.rope_parameters["rope_theta"])


def run_ours(args, precision: str, attention: str, device) -> dict:
    """One case of our step: exactly `training.trainer.train_step` on one micro-batch, with the
    target built as training builds it without distillation (up to the deepest tap)."""
    hf = hf_config(args.shape)
    dtype, fp8 = _precision(precision)
    if fp8 is None:
        fp8 = FP8Settings(args.fp8_format, precision.removeprefix("fp8-"))
    tcfg = target_transformer_config(hf, params_dtype=dtype, **fp8.fields())
    # Random weights, initialised where they live (megatron's init on the GPU is fast).
    tcfg = dataclasses.replace(tcfg, perform_initialization=True,
                               use_cpu_initialization=device.type == "cpu")
    cfg = _dflash_config(args, hf, tcfg)
    tokens, loss_mask = _inputs(args, hf)
    align = sequence_multiple(1, False, fp8)  # FP8 GEMMs: 16 (mxfp8 32) tokens
    tokens, loss_mask = F.pad(tokens, (0, -tokens.shape[1] % align)), \
        F.pad(loss_mask, (0, -tokens.shape[1] % align))
    mb = prepare_microbatch(tokens, loss_mask, cfg, anchor_generator(args.seed, 0), attention,
                            align)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    target = build_target(hf, tcfg, backend=args.backend, last_layer=max(cfg.target_layer_ids))
    dcfg = draft_transformer_config(cfg, tcfg, perform_initialization=True,
                                    use_cpu_initialization=device.type == "cpu", **fp8.fields())
    draft = build_draft(cfg, dcfg, args.backend, attention)
    model = wrap_training_chunk(DFlashTrainingModule(target, draft).to(device), dcfg,
                                use_distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(
        OptimizerArgs(lr=1e-4, min_lr=1e-5, lr_warmup_fraction=0.0, lr_decay_style="constant"),
        model, bf16=dtype == torch.bfloat16, train_iters=args.warmup + args.steps + 1)
    mb = to_device(mb, device)

    def run_step(microbatches, forward_only):
        return run_schedule(model, microbatches, cfg, 0.0, args.loss_chunk_size,
                            args.micro_batch_size, forward_only)

    def step():
        reports, _ = train_step(model, optimizer, scheduler, [mb], run_step)
        return sum(r["loss"][0] for r in reports) / sum(r["loss"][1] for r in reports)

    return {"attention": attention, **_time_and_count(step, args),
            "block_tokens": mb["block_input_ids"].numel(), "tokens": mb["tokens"].numel()}


def run_specforge(args, precision: str, device) -> dict:
    """SpecForge 0.2.0's own DFlash step (tools/specforge_baseline.py) at the same shape."""
    dtype, _ = _precision(precision)
    step = _specforge().build_specforge_step(
        hf_config(args.shape), seq_length=args.seq_length, num_anchors=args.num_anchors,
        block_size=args.block_size, num_draft_layers=args.num_draft_layers,
        batch_size=args.micro_batch_size, device=device, dtype=dtype, seed=args.seed,
        target_logits=False)
    try:
        return {"attention": step.attention_backend, **_time_and_count(step, args),
                "block_tokens": args.micro_batch_size * args.num_anchors * args.block_size,
                "tokens": args.micro_batch_size * args.seq_length}
    finally:
        step.close()


def useful_flops(args) -> dict:
    """`model_flops` of the benchmark's micro-batch (the same work for both sides)."""
    hf = hf_config(args.shape)
    tcfg = target_transformer_config(hf)
    cfg = _dflash_config(args, hf, tcfg)
    tokens, loss_mask = _inputs(args, hf)
    anchors, keep = sample_anchors(loss_mask, cfg.block_size, cfg.num_anchors,
                                   anchor_generator(args.seed, 0))
    supervised = int(block_loss_mask(loss_mask, anchors, keep, cfg.block_size).sum())
    return model_flops(tcfg, cfg, hf.vocab_size, tokens.shape[1],
                       block_context_lengths(anchors, keep), supervised)


def _case_process(args, side: str, precision: str, attention: str) -> dict:
    """Run one case in a fresh process (its own peak memory, no state from other cases)."""
    with tempfile.TemporaryDirectory(prefix="dflash-bench-") as tmp:
        out = os.path.join(tmp, "case.json")
        argv = [sys.executable, os.path.abspath(__file__), *args.passthrough,
                "--case", f"{side}:{precision}:{attention}", "--json", out]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        run = subprocess.run(argv, env=env, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(out):
            return {"error": (run.stderr or run.stdout).strip().splitlines()[-1][:500]
                    if (run.stderr or run.stdout).strip() else f"exit {run.returncode}"}
        with open(out) as f:
            return json.load(f)


def _run_case_here(args) -> dict:
    side, precision, attention = args.case.split(":")
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    if side == "specforge":
        return run_specforge(args, precision, device)
    return run_ours(args, precision, attention, device)


def benchmark(args) -> dict:
    """Every case, each in its own process; then the derived figures and ours/SpecForge ratios."""
    flops = useful_flops(args)
    peak_tflops = {"fp32": args.peak_tflops_bf16, "bf16": args.peak_tflops_bf16}
    result = {"shape": args.shape,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "backend": args.backend,
              "config": {k: getattr(args, k) for k in ("seq_length", "num_anchors", "block_size",
                                                       "num_draft_layers", "micro_batch_size",
                                                       "steps", "warmup", "fp8_format")},
              "flops": flops, "cases": []}
    specforge_reason = (_specforge().specforge_unavailable_reason()
                        if args.baseline == "specforge" else None)
    for precision in args.precisions:
        fp8 = None if precision in ("fp32", "bf16") else \
            FP8Settings(args.fp8_format, precision.removeprefix("fp8-"))
        reason = fp8 is not None and (fp8_unavailable_reason(fp8) or (
            "FP8 needs --backend te" if args.backend != "te" else None))
        sides = [("megatron_dflash", a) for a in args.attention]
        if args.baseline == "specforge" and fp8 is None:
            sides.append(("specforge", "default"))
        for side, attention in sides:
            case = {"side": side, "precision": precision, "attention": attention}
            if reason:
                case["skipped"] = reason
            elif side == "specforge" and specforge_reason:
                case["skipped"] = specforge_reason
            else:
                case.update(_case_process(args, side, precision, attention))
            if "seconds" in case:
                s = case.pop("seconds")
                peak = args.peak_tflops_fp8 if fp8 is not None else peak_tflops[precision]
                case.update(ms_per_step=1e3 * s, target_tokens_per_s=case["tokens"] / s,
                            draft_tokens_per_s=case["block_tokens"] / s,
                            tflops=flops["total"] / s / 1e12,
                            mfu=flops["total"] / s / (peak * 1e12),
                            executed_over_useful=case["executed_flops"] / flops["total"])
            result["cases"].append(case)
            print(_row(case), flush=True)
            _write(result, args.json)  # after every case: a run cut short keeps what it measured
    result["ratios"] = _ratios(result["cases"])
    _write(result, args.json)
    return result


def _ratios(cases: list[dict]) -> list[dict]:
    """ours / SpecForge for each of our measured cases with a measured SpecForge case of the
    same precision."""
    theirs = {c["precision"]: c for c in cases if c["side"] == "specforge" and "ms_per_step" in c}
    out = []
    for c in cases:
        ref = theirs.get(c["precision"])
        if c["side"] == "megatron_dflash" and "ms_per_step" in c and ref is not None:
            out.append({"precision": c["precision"], "attention": c["attention"],
                        **{k: c[k] / ref[k] for k in ("ms_per_step", "target_tokens_per_s",
                                                      "peak_memory_gib", "executed_flops")}})
    return out


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _row(case: dict) -> str:
    head = f"{case['side']:>15} {case['precision']:>15} {case['attention']:>14} "
    if "ms_per_step" not in case:
        return head + ("skipped: " + case["skipped"] if "skipped" in case
                       else "error: " + case["error"])
    return head + (f"{case['ms_per_step']:10.1f} {case['target_tokens_per_s']:10.0f} "
                   f"{case['peak_memory_gib']:8.2f} {case['executed_flops'] / 1e12:9.3f} "
                   f"{case['executed_over_useful']:6.3f} {100 * case['mfu']:6.1f} "
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
    p.add_argument("--baseline", choices=("specforge", "none"), default="specforge",
                   help="also run SpecForge 0.2.0's own DFlash step (fp32/bf16) at the same "
                        "shape (pip install --no-deps specforge==0.2.0; skipped without it)")
    p.add_argument("--loss-chunk-size", type=int, default=DEFAULT_CHUNK_ROWS)
    p.add_argument("--backend", choices=("local", "te"), default=None,
                   help="default: te when Transformer Engine and a GPU are there, else local")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops-bf16", type=float, default=989.0,
                   help="the device's dense bf16 (and, for MFU of fp32 cases, fp32) peak")
    p.add_argument("--peak-tflops-fp8", type=float, default=1979.0)
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # side:precision:attention
    return p


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.backend is None:
        args.backend = "te" if fp8_unavailable_reason(FP8Settings("hybrid")) is None else "local"
    if args.case is not None:
        return _case_main(args)
    args.passthrough = [a for a in argv if a not in ("--json", args.json)] + \
        ["--backend", args.backend]
    print(f"{'side':>15} {'precision':>15} {'attention':>14} {'ms/step':>10} {'tgt tok/s':>10} "
          f"{'peak GiB':>8} {'exec TFLOP':>9} {'x use':>6} {'MFU %':>6} {'loss':>8}", flush=True)
    result = benchmark(args)
    f = result["flops"]
    print("useful TFLOP per step: " + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in f.items()
                                                if k not in ("total", "draft_attention_density"))
          + f"; total {f['total'] / 1e12:.4g} (draft attention density "
          f"{f['draft_attention_density']:.3f})")
    for r in result["ratios"]:
        print(f"ours/SpecForge {r['precision']} {r['attention']}: ms/step "
              f"{r['ms_per_step']:.3f}, target tok/s {r['target_tokens_per_s']:.3f}, peak memory "
              f"{r['peak_memory_gib']:.3f}, executed FLOPs {r['executed_flops']:.3f}")
    return result


def _case_main(args) -> dict:
    """A child process: one case, in its own world of one."""
    with distributed(ParallelArgs(), seed=args.seed):
        result = _run_case_here(args)
    _write(result, args.json)
    return result


def _specforge():
    """tools/specforge_baseline.py, the sibling script (a tool, not part of the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specforge_baseline.py")
    spec = importlib.util.spec_from_file_location("specforge_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
