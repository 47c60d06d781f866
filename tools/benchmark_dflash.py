"""DFlash training steps timed side by side with SpecForge 0.2.0's own DFlash step.

    python tools/benchmark_dflash.py --shape qwen3-8b qwen3-1.7b --micro-batch-size 1 2 \
        --time-budget 400 --json bench.json                                             (GPU)
    python tools/benchmark_dflash.py --shape qwen3-cpu --seq-length 1024 --num-anchors 128 \
        --num-draft-layers 1 --precisions fp32 --attention sparse --specforge fastest default \
        --steps 2 --warmup 1                                                             (CPU)

Our step is exactly a training step (`trainer.train_step` over `run_schedule`): the frozen
target's forward up to its deepest tap, the draft's forward and backward with the chunked LM head
and loss over the supervised slots, the DistributedOptimizer's update. Each step takes a fresh
micro-batch prepared as training prepares one — new random tokens (last 90% response), anchors
from the data position, `prepare_microbatch` (mask included) — from a `Prefetcher` two ahead
(training's depth at one micro-batch per step). SpecForge's side (`tools/specforge_baseline.py`,
run as its own script) trains the same shape on new random tokens each step with its own code, in
the configurations named by --specforge (`fastest`: the fastest it offers for the device;
`default`: its defaults), written beside its row and into the JSON; it has no FP8.

Each case is a fresh process (its own peak memory: CUDA allocator peak, or peak RSS on CPU) that
writes ms/step, loss and peak memory to its JSON before one more step is counted by
FlopCounterMode (`step_cost.measure_step`); a counter that fails leaves its reason
(`counter_error`) and the case keeps its time. `executed_flops_source` is "counter" where the
counter sees the whole step, else "analytic": `step_cost.step_flops` told what the side runs (the
counter cannot see Transformer Engine's GEMMs or FlexAttention, so those are not counted at all)
— its target layers, the attention pairs its kernel computes (FlexAttention's 128x128 tiles, the
CPU gather path's chunks, all pairs for dense), its LM head rows and passes (SpecForge: all N*B
slots, plus a recompute when objective_chunk_blocks > 0; its harness's HF target: every layer
and logits_to_keep rows). Useful FLOPs, the objective's work and the same for both sides (MFU =
useful / time / --peak-tflops), are written out in `megatron_dflash/step_cost.py`; both counts
use the anchors of our timed micro-batches (SpecForge draws its own, from the same distribution).

Cases run in order of importance, the JSON rewritten after each: per (shape, batch), ours at each
fp32/bf16 precision with the first --attention, SpecForge at the same precisions, ours in FP8
(every recipe listed at the first (shape, batch), the fastest of them after); then the other
recipes and attentions. Under --time-budget a case that would not fit (by the longest of its side
so far) is skipped and a running one stopped (keeping what it wrote). FP8 needs --backend te and a
GPU with the recipe, SpecForge `pip install --no-deps specforge==0.2.0`; else they are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, Qwen3Config

from megatron_dflash.config import DFlashConfig
from megatron_dflash.distributed import launcher_free_env
from megatron_dflash.fp8 import FP8_RECIPES, FP8Settings, fp8_unavailable_reason
from megatron_dflash.head_loss import DEFAULT_CHUNK_ROWS
from megatron_dflash.step_cost import (dense_attention_pairs, flex_attention_pairs,
                                       gather_attention_pairs, step_flops)
from megatron_dflash.targets import target_transformer_config
from megatron_dflash.training.step import anchor_generator, prepare_microbatch

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
TOOLS = os.path.dirname(os.path.abspath(__file__))  # the two sides' scripts


def hf_config(shape: str):
    cls, kw = SHAPES[shape]
    return cls(architectures=[cls.__name__.replace("Config", "ForCausalLM")], **kw)


def workload(args, shape: str, batch: int) -> dict:
    """The timed steps' micro-batches as the FLOPs model takes them ([b, N] context lengths,
    supervised slots), drawn as `benchmark_step.microbatch_producer` draws them (anchors from
    the data position; tokens do not change the work), with the target's and DFlash configs."""
    hf = hf_config(shape)
    t = target_transformer_config(hf)
    cfg = DFlashConfig(block_size=args.block_size, num_draft_layers=args.num_draft_layers,
                       mask_token_id=hf.vocab_size - 1, num_anchors=args.num_anchors,
                       ).resolve(t, vocab_size=hf.vocab_size,
                                 target_rope_theta=hf.rope_parameters["rope_theta"])
    S = args.seq_length
    loss_mask = torch.arange(S).expand(batch, S) >= S // 10
    batches = []
    for k in range(args.warmup, args.warmup + args.steps):
        mb = prepare_microbatch(torch.zeros(batch, S, dtype=torch.long), loss_mask, cfg,
                                anchor_generator(args.seed, k * batch), "sparse", 1,
                                torch.full((batch,), S))
        batches.append((mb["attention_mask"].context_lengths(), int(mb["supervised"].sum())))
    return {"hf": hf, "t": t, "cfg": cfg, "seq_length": S, "batches": batches}


def mean_flops(w: dict, pairs=None, **executed) -> dict:
    """`step_flops` averaged over the workload's micro-batches (`pairs(context_lengths)`: the
    attention pairs a kernel computes; `executed`: what else a side runs)."""
    args = (w["t"], w["cfg"], w["hf"].vocab_size, w["seq_length"])
    per = [step_flops(*args, ctx, sup, attention_pairs=pairs and pairs(ctx), **executed)
           for ctx, sup in w["batches"]]
    return {k: sum(f[k] for f in per) / len(per) for k in per[0]}


def analytic_executed(case: dict, w: dict, cuda: bool) -> float:
    """The case's executed FLOPs per step as `step_flops` counts what its side runs."""
    S, B = w["seq_length"], w["cfg"].block_size
    if case["side"] == "specforge":
        sf = case["specforge"]
        b, n = w["batches"][0][0].shape
        flex = sf["attention_backend"] == "flex_attention"
        return mean_flops(
            w, (lambda c: flex_attention_pairs(c, S, B)) if flex
            else (lambda c: dense_attention_pairs(b, n, S, B)),
            target_layers=w["hf"].num_hidden_layers,
            target_head_rows=b * (sf["target_logits_to_keep"] or S), head_rows=b * n * B,
            head_passes=3 if sf["objective_chunk_blocks"] > 0 else 2)["total"]
    pairs = (lambda c: dense_attention_pairs(*c.shape, S, B)) if case["attention"] == "dense" \
        else (lambda c: flex_attention_pairs(c, S, B)) if cuda \
        else (lambda c: gather_attention_pairs(c, B))
    return mean_flops(w, pairs, context_queries=True)["total"]


def _run_child(argv: list[str], timeout: float | None) -> dict:
    """A case in a fresh process (its own peak memory, no state from other cases), stopped at
    `timeout`; what it wrote to its JSON before stopping or failing is kept."""
    with tempfile.TemporaryDirectory(prefix="dflash-bench-") as tmp:
        out = os.path.join(tmp, "case.json")
        child = subprocess.Popen(argv + ["--json", out], env=launcher_free_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            log, stopped = child.communicate(timeout=timeout)[0], None
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the case and its compile workers
            log, stopped = child.communicate()[0], f"stopped at the time budget ({timeout:.0f} s)"
        lines = [line for line in log.strip().splitlines() if line.strip()]
        failure = stopped or (f"exit {child.returncode}: " + (lines[-1] if lines else "")[:500]
                              if child.returncode else None)
        case = {}
        if os.path.exists(out):
            with open(out) as f:
                case = json.load(f)
        if "seconds" in case or "skipped" in case:
            if failure and "counted_flops" not in case:
                case["counter_error"] = failure
            return case
        return {"error": failure or "no result written"}


def _case_argv(args, case: dict, config_dir: str) -> list[str]:
    """The command line of a case: our side's script or SpecForge's, at the target `config_dir`."""
    argv = ["--target-config", config_dir, "--seq-length", str(args.seq_length),
            "--num-anchors", str(args.num_anchors), "--block-size", str(args.block_size),
            "--num-draft-layers", str(args.num_draft_layers), "--micro-batch-size",
            str(case["micro_batch_size"]), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--seed", str(args.seed)]
    argv += ["--break-flop-counter"] if args.break_flop_counter else []
    if case["side"] == "specforge":
        return [sys.executable, os.path.join(TOOLS, "specforge_baseline.py"), *argv, "--dtype",
                case["precision"], "--configuration", case["configuration"]]
    return [sys.executable, os.path.join(TOOLS, "benchmark_step.py"), *argv, "--precision",
            case["precision"], "--attention", case["attention"], "--backend", args.backend,
            "--fp8-format", args.fp8_format, "--loss-chunk-size", str(args.loss_chunk_size)]


def plan_cases(args, done: list[dict]):
    """The cases in order of importance (module docstring); reads `done` for the fastest FP8."""
    plain = [p for p in args.precisions if not p.startswith("fp8")]
    fp8 = [p for p in args.precisions if p.startswith("fp8")]
    first, others = args.attention[0], args.attention[1:]
    workloads = [(s, b) for s in args.shape for b in args.micro_batch_size]

    def ours(shape, batch, precision, attention):
        return dict(shape=shape, micro_batch_size=batch, side="megatron_dflash",
                    precision=precision, attention=attention)

    def fastest_fp8() -> list[str]:  # at the first (shape, batch), else the first listed
        timed = [c for c in done if (c["shape"], c["micro_batch_size"]) == workloads[0]
                 and c["side"] == "megatron_dflash" and c["precision"] in fp8
                 and c["attention"] == first and "ms_per_step" in c]
        return [min(timed, key=lambda c: c["ms_per_step"])["precision"]] if timed else fp8[:1]

    for i, (s, b) in enumerate(workloads):
        for p in plain:
            yield ours(s, b, p, first)
            for c in args.specforge if args.baseline == "specforge" else ():
                yield dict(shape=s, micro_batch_size=b, side="specforge", precision=p,
                           configuration=c)
        for p in fp8 if i == 0 else fastest_fp8():
            yield ours(s, b, p, first)
    best = fastest_fp8()
    for i, (s, b) in enumerate(workloads):
        for p in fp8 if i else ():
            if p not in best:
                yield ours(s, b, p, first)
        for a in others:
            for p in plain + fp8:
                yield ours(s, b, p, a)


def benchmark(args) -> dict:
    """Every case, each in its own process, in order of importance within --time-budget; then
    the derived figures and the ours/SpecForge ratios. The JSON is rewritten after every case."""
    start, cuda = time.monotonic(), torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "backend": args.backend,
              "threads": torch.get_num_threads(),
              "config": {k: getattr(args, k) for k in (
                  "shape", "micro_batch_size", "seq_length", "num_anchors", "block_size",
                  "num_draft_layers", "steps", "warmup", "fp8_format", "time_budget")},
              "workloads": [], "cases": []}
    workloads, longest = {}, {}
    with tempfile.TemporaryDirectory(prefix="dflash-bench-targets-") as config_root:
        for case in plan_cases(args, result["cases"]):
            key = (case["shape"], case["micro_batch_size"])
            if key not in workloads:
                w = workloads[key] = workload(args, *key)
                w["config_dir"] = os.path.join(config_root, case["shape"])
                w["hf"].save_pretrained(w["config_dir"])  # SpecForge's target config
                w["useful"] = mean_flops(w)
                result["workloads"].append({"shape": key[0], "micro_batch_size": key[1],
                                            "flops": w["useful"]})
            w = workloads[key]
            fp8 = case["precision"].startswith("fp8")
            left = args.time_budget - (time.monotonic() - start) if args.time_budget else None
            reason = fp8 and (fp8_unavailable_reason(FP8Settings(
                args.fp8_format, case["precision"].removeprefix("fp8-"))) or (
                "FP8 needs --backend te" if args.backend != "te" else None))
            if reason:
                case["skipped"] = reason
            elif left is not None and left < max(longest.get(case["side"], 0), 1):
                case["skipped"] = (f"time budget: {left:.0f} s left, a {case['side']} case "
                                   f"took {longest.get(case['side'], 0):.0f} s")
            else:
                t0, load = time.monotonic(), os.getloadavg()[0]
                case.update(_run_child(_case_argv(args, case, w["config_dir"]), left))
                longest[case["side"]] = max(longest.get(case["side"], 0), time.monotonic() - t0)
                case["load_average_1min"] = [load, os.getloadavg()[0]]  # before, after
            if "seconds" in case:
                _derive(case, w, args, cuda)
            result["cases"].append(case)
            print(_row(case), flush=True)
            _write(result, args.json)  # after every case: a run cut short keeps what it measured
    result["ratios"] = _ratios(result["cases"])
    _write(result, args.json)
    return result


def _derive(case: dict, w: dict, args, cuda: bool) -> None:
    """ms/step, tokens/s, FLOPs (useful, executed and their source), TFLOP/s and MFU."""
    s, useful = case.pop("seconds"), w["useful"]["total"]
    peak = args.peak_tflops_fp8 if case["precision"].startswith("fp8") else args.peak_tflops_bf16
    case["analytic_executed_flops"] = analytic_executed(case, w, cuda)
    counted = "counted_flops" in case
    cpu = case.pop("process_cpu_seconds", None)
    if not cuda and cpu is not None:  # < 1: the step waited for cores other processes held
        case["cpu_utilisation"] = cpu / s / torch.get_num_threads()
    case.update(ms_per_step=1e3 * s, target_tokens_per_s=case["tokens"] / s,
                draft_tokens_per_s=case["block_tokens"] / s, useful_flops=useful,
                tflops=useful / s / 1e12, mfu=useful / s / (peak * 1e12),
                executed_flops=case["counted_flops"] if counted
                else case["analytic_executed_flops"],
                executed_flops_source="counter" if counted else "analytic")
    case["executed_over_useful"] = case["executed_flops"] / useful


def _ratios(cases: list[dict]) -> list[dict]:
    """ours / SpecForge, for each of our measured cases and each SpecForge configuration
    measured at the same shape, batch and precision."""
    at = lambda c: (c["shape"], c["micro_batch_size"], c["precision"])  # noqa: E731
    out = []
    for c in cases:
        for ref in cases:
            if c["side"] == "megatron_dflash" and ref["side"] == "specforge" \
                    and "ms_per_step" in c and "ms_per_step" in ref and at(c) == at(ref):
                out.append({"shape": c["shape"], "micro_batch_size": c["micro_batch_size"],
                            "precision": c["precision"], "attention": c["attention"],
                            "specforge_configuration": ref["configuration"],
                            **{k: c[k] / ref[k] for k in ("ms_per_step", "target_tokens_per_s",
                                                          "peak_memory_gib", "executed_flops")}})
    return out


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


HEADER = (f"{'side':>15} {'shape':>11} {'b':>2} {'precision':>15} {'attention':>14} "
          f"{'ms/step':>10} {'tgt tok/s':>9} {'peak GiB':>8} {'exec TFLOP':>10} {'src':>4} "
          f"{'x use':>6} {'MFU %':>6} {'loss':>7}")


def _row(case: dict) -> str:
    head = (f"{case['side']:>15} {case['shape']:>11} {case['micro_batch_size']:>2} "
            f"{case['precision']:>15} {case.get('attention', '-'):>14} ")
    sf = case.get("specforge") or ({"configuration": case["configuration"]}
                                   if "configuration" in case else None)
    config = "" if sf is None else "  [" + ", ".join(f"{k} {v}" for k, v in sf.items()) + "]"
    if "load_average_1min" in case:
        config += " (load {:.1f} -> {:.1f}".format(*case["load_average_1min"]) + (
            f", CPU use {case['cpu_utilisation']:.2f})" if "cpu_utilisation" in case else ")")
    if "ms_per_step" not in case:
        return head + ("skipped: " + case["skipped"] if "skipped" in case
                       else "error: " + case["error"]) + config
    return head + (f"{case['ms_per_step']:10.1f} {case['target_tokens_per_s']:9.0f} "
                   f"{case['peak_memory_gib']:8.2f} {case['executed_flops'] / 1e12:10.3f} "
                   f"{case['executed_flops_source'][:4]:>4} {case['executed_over_useful']:6.3f} "
                   f"{100 * case['mfu']:6.1f} {case['loss']:7.3f}") + config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["qwen3-8b"])
    p.add_argument("--micro-batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--seq-length", type=int, default=3072)
    p.add_argument("--num-anchors", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-draft-layers", type=int, default=5)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                   default=["bf16", "fp8-delayed", "fp8-tensorwise", "fp8-blockwise"])
    p.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default="hybrid")
    p.add_argument("--attention", nargs="+", choices=("sparse", "dense"),
                   default=["sparse", "dense"], help="the first is the one every shape gets")
    p.add_argument("--baseline", choices=("specforge", "none"), default="specforge",
                   help="also run SpecForge 0.2.0's own DFlash step (fp32/bf16) at the same "
                        "shape (pip install --no-deps specforge==0.2.0; skipped without it)")
    p.add_argument("--specforge", nargs="+", choices=("fastest", "default"), default=["fastest"],
                   help="SpecForge configurations (tools/specforge_baseline.py)")
    p.add_argument("--loss-chunk-size", type=int, default=DEFAULT_CHUNK_ROWS)
    p.add_argument("--backend", choices=("local", "te"), default=None,
                   help="default: te when Transformer Engine and a GPU are there, else local")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: cases that would not fit are skipped")
    p.add_argument("--peak-tflops-bf16", type=float, default=989.0,
                   help="the device's dense bf16 (and, for MFU of fp32 cases, fp32) peak")
    p.add_argument("--peak-tflops-fp8", type=float, default=1979.0)
    p.add_argument("--json", default=None, help="write the results here (after every case)")
    p.add_argument("--break-flop-counter", action="store_true", help=argparse.SUPPRESS)  # tests
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.backend is None:
        args.backend = "te" if fp8_unavailable_reason(FP8Settings("hybrid")) is None else "local"
    print(HEADER, flush=True)
    result = benchmark(args)
    for w in result["workloads"]:
        f = w["flops"]
        print(f"useful TFLOP per step, {w['shape']} b={w['micro_batch_size']}: " + ", ".join(
            f"{k} {v / 1e12:.4g}" for k, v in f.items()
            if k not in ("total", "draft_attention_density"))
            + f"; total {f['total'] / 1e12:.4g} (draft attention density "
            f"{f['draft_attention_density']:.3f})")
    for r in result["ratios"]:
        print(f"ours/SpecForge[{r['specforge_configuration']}] {r['shape']} "
              f"b={r['micro_batch_size']} {r['precision']} {r['attention']}: ms/step "
              f"{r['ms_per_step']:.3f}, target tok/s {r['target_tokens_per_s']:.3f}, peak memory "
              f"{r['peak_memory_gib']:.3f}, executed FLOPs {r['executed_flops']:.3f}")
    return result


if __name__ == "__main__":
    main()
