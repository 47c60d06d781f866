"""GPU checks of the Transformer Engine backend, FP8 and sparse attention (run by gpu_check.sh).

  draft_backends  one draft's logits and gradients with each backend/attention/dtype against the
                  local dense fp32 draft: local sparse (FlexAttention, with its backward),
                  local bf16, TE bf16 dense (arbitrary mask), TE bf16 sparse; for a DFlash
                  and a DFlash2 draft (its convolutions; the selector runs in the loss)
  fp8_training    the training job itself (`parse_plan` + `pretrain` from command-line flags,
                  as examples/pretrain_dflash.py runs it) on a tiny learnable task, bf16 and,
                  per FP8 recipe, FP8 for the draft and the target together and for the frozen
                  target alone under a bf16 draft: the loss must fall, and FP8's about as far
                  as bf16's

Checks that this machine cannot run (no TE, no GPU, a recipe the GPU lacks) are reported as
skipped, so the script runs on CPU or GPU as is (`python tools/gpu_check.py`; without CUDA it
applies megatron-core's CPU adaptations, `megatron_dflash.cpu`). The small configs, targets and
data it checks on are built here, from configs, with random weights. Each row is printed and
appended to --json as soon as it is measured, so a run cut short keeps what it found.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from megatron_dflash.config import draft_transformer_config
from megatron_dflash.distributed import device as training_device
from megatron_dflash.distributed import distributed, init_distributed
from megatron_dflash.fp8 import FP8Settings, fp8_unavailable_reason
from megatron_dflash.model import target_head
from megatron_dflash.sparse_attention import dflash_block_mask
from megatron_dflash.specs import build_draft
from megatron_dflash.run.config import ParallelArgs
from megatron_dflash.synthetic import (dflash_config, draft_inputs, head_only_target, pattern_dataset,
                                       randomize_, target_config, tiny_target_dir)
from megatron_dflash.training.pretrain import parse_plan, pretrain

TE_REASON = (None if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")
             else "needs Transformer Engine and a GPU")
RECIPES = ("delayed", "tensorwise", "blockwise")
EPILOG = ("Runs on CPU or GPU as is: plain `python tools/gpu_check.py` (or inside a torchrun "
          "world); without CUDA megatron-core's CPU adaptations (megatron_dflash.cpu) are "
          "applied and the TE/FP8 checks are reported as skipped.")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _te_name(name: str) -> str:
    """The TE draft's name of a local draft parameter: TE fuses the pre-MLP norm into fc1 (not
    in a DFlash2 layer, whose convolution sits between them)."""
    return name.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")


def check_draft_backends(device, report) -> None:
    for variant in ("dflash", "dflash2"):
        _check_draft_backends(device, report, variant)


def _check_draft_backends(device, report, variant: str) -> None:
    tcfg = target_config()
    dflash2 = {} if variant == "dflash" else dict(draft_variant="dflash2", selector_rank=8)
    suffix = "" if variant == "dflash" else " dflash2"
    cfg = dflash_config(tcfg, head_dim=32, num_anchors=8, **dflash2)  # 8 blocks of 16: Q = 128
    inputs = {k: v.to(device) for k, v in draft_inputs(cfg, batch=2, seq_len=96, seed=1).items()}
    masks = {"dense": inputs["attention_mask"],
             "sparse": dflash_block_mask(inputs["anchors"], inputs["keep"], 96, cfg.block_size)}
    heads = {dtype: head_only_target().to(device, dtype)
             for dtype in (torch.float32, torch.bfloat16)}

    def run(backend, attention, dtype, weights):
        """(logits, {local name: weight}, {local name: gradient}) of one draft loaded with
        `weights` (None: random), after backward of a fixed random projection of the logits."""
        dcfg = draft_transformer_config(cfg, tcfg, params_dtype=dtype, pipeline_dtype=dtype,
                                        bf16=dtype == torch.bfloat16,
                                        use_cpu_initialization=device.type == "cpu")
        draft = build_draft(cfg, dcfg, backend, attention).to(device)
        draft.borrow_target_head(*target_head(heads[dtype]))
        rename = _te_name if backend == "te" and variant == "dflash" else str
        # the logits' parameters (DFlash2's selector only enters the loss)
        named = {n: p for n, p in draft.named_parameters() if "candidate_selector" not in n}
        names = sorted(named if weights is None else weights)  # the local backend's names
        if sorted(map(rename, names)) != sorted(named):
            raise AssertionError(f"parameters differ from the local draft's: {sorted(named)}")
        params = {n: named[rename(n)] for n in names}
        with torch.no_grad():
            if weights is None:
                randomize_(draft, seed=2)
            else:
                for n, w in weights.items():
                    params[n].copy_(w)
        logits = draft(inputs["block_input_ids"], inputs["features"].to(dtype), masks[attention],
                       inputs["position_ids"]).float()
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
        (logits * probe.to(device)).sum().backward()
        return logits.detach(), {n: p.detach().float() for n, p in params.items()}, \
            {n: p.grad.float() for n, p in params.items()}

    ref_logits, weights, ref_grads = run("local", "dense", torch.float32, None)
    report({"check": f"draft local dense float32{suffix}", "ok": True, "detail": "reference"})
    for backend, attention, dtype in (("local", "sparse", torch.float32),
                                      ("local", "dense", torch.bfloat16),
                                      ("te", "dense", torch.bfloat16),
                                      ("te", "sparse", torch.bfloat16)):
        name = f"draft {backend} {attention} {str(dtype)[6:]}{suffix}"
        if backend == "te" and TE_REASON:
            report({"check": name, "ok": None, "detail": f"skipped: {TE_REASON}"})
            continue
        try:
            logits, _, grads = run(backend, attention, dtype, weights)
        except Exception as e:  # noqa: BLE001 - report it, run the other variants
            report({"check": name, "ok": False, "detail": f"{type(e).__name__}: {e}"[:400]})
            continue
        logit_err = rel_err(logits, ref_logits)
        grad_err = max(rel_err(grads[n], g) for n, g in ref_grads.items())
        tol = (2e-3, 2e-3) if dtype == torch.float32 else (3e-2, 6e-2)
        report({"check": name, "ok": logit_err < tol[0] and grad_err < tol[1],
                "detail": f"rel err logits {logit_err:.2e} (< {tol[0]:g}), "
                          f"worst grad {grad_err:.2e} (< {tol[1]:g})"})


def check_fp8_training(device, report, steps: int = 40) -> None:
    """The training job itself (`parse_plan` + `pretrain` with command-line flags) for bf16 and,
    per recipe, FP8 for the draft and the frozen target together, and for the target alone
    (bf16 draft: the target's FP8 weights must be re-quantised though the draft's config has no
    FP8)."""
    impl = "local" if TE_REASON else "transformer_engine"
    bf16_last = None
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--target", tiny_target_dir(Path(tmp) / "target", layers=6, hidden=128),
                "--train-data", pattern_dataset(Path(tmp) / "train", 64, 64, seed=1),
                "--mask-token-id", "255", "--seq-length", "64", "--block-size", "16",
                "--num-anchors", "8", "--num-draft-layers", "1", "--target-layer-ids", "1", "4",
                "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(steps),
                "--lr", "1e-2", "--min-lr", "1e-2", "--lr-decay-style", "constant",
                "--lr-warmup-fraction", "0", "--log-interval", str(steps), "--bf16",
                "--transformer-impl", impl]
        cases = [("bf16", FP8Settings(), [])]
        for r in RECIPES:
            fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", r]
            target = ["--target-fp8-format", "hybrid", "--target-fp8-recipe", r]
            cases += [(f"fp8-{r}", FP8Settings("hybrid", r), fp8 + target),
                      (f"target-fp8-{r}", FP8Settings("hybrid", r), target)]
        for precision, fp8, extra in cases:
            name = f"train {'te' if impl == 'transformer_engine' else 'local'} {precision}"
            reason = fp8_unavailable_reason(fp8)
            if reason:
                report({"check": name, "ok": None, "detail": f"skipped: {reason}"})
                continue
            try:
                plan = parse_plan(base + extra)
                init_distributed(plan.run.parallel, plan.run.training.seed)
                losses = pretrain(plan)["losses"]
            except Exception as e:  # noqa: BLE001 - report it, run the other recipes
                report({"check": name, "ok": False, "detail": f"{type(e).__name__}: {e}"[:400]})
                continue
            first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
            bf16_last = last if bf16_last is None else bf16_last
            report({"check": name, "ok": last < 0.8 * first and last < 1.25 * bf16_last,
                    "detail": f"mean loss of the first/last 5 of {steps} steps {first:.3f} -> "
                              f"{last:.3f} (needs < 80%, and < 125% of bf16's {bf16_last:.3f})"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG)
    p.add_argument("--json", default=None, help="also write the rows as JSON (after each row)")
    args = p.parse_args(argv)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        status = {True: "ok", False: "FAIL", None: "skip"}[row["ok"]]
        print(f"{row['check']:34} {status:5} {row['detail']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    with distributed(ParallelArgs(), seed=0):
        device = training_device()
        for check in (check_draft_backends, check_fp8_training):
            try:
                check(device, report)
            except Exception as e:  # noqa: BLE001 - report it, run the other checks
                report({"check": check.__name__, "ok": False,
                        "detail": f"{type(e).__name__}: {e}"[:400]})
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
