#!/usr/bin/env bash
# GPU checks for the TE backend, FP8 and sparse attention, then the benchmark (issue 25's list):
# Qwen3-8B- and Qwen3-1.7B-shaped targets, batch 1 and 2, sequence 3072, 512 anchors x 16, 5 draft
# layers; bf16, every FP8 recipe at the first shape and the fastest after; SpecForge 0.2.0 in its
# fastest configuration beside each bf16 row. One device call: the checks get CHECKS_S=150 s (cold
# inductor/FlexAttention compiles and seven short training jobs; every row is written to
# checks.json as it finishes; CHECKS_S=0 skips them), the benchmark the rest of BUDGET_S=280 s. The
# benchmark runs its cases in order of importance, skips those that would not fit what is left and
# writes bench.json after every case, so a short budget measures the first of the list and a cut run
# keeps what it measured. The whole list alone: `CHECKS_S=0 BUDGET_S=570`, timeout_s 600.
#
# Once, in the checkout (megatron-core + Transformer Engine wheels, ../shared/gpu-wheels/README.md;
# SpecForge's side needs its wheel beside them, else its rows are skipped):
#     mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/ && echo /.whl/ >> .git/info/exclude
#     .venv/bin/pip download --no-deps specforge==0.2.0 -d .whl
# Device call: command "bash tools/gpu_check.sh", carry [".whl"], timeout_s 300.
# Results: $OUT/checks.json, $OUT/bench.json and their logs, and the table printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
START=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || { echo "installing .whl/*.whl failed (carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD NVTE_FRAMEWORK=pytorch CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "${CHECKS_S:-150}" -gt 0 ]; then
    echo "== checks: TE vs local draft, sparse vs dense attention, FP8 training"
    timeout -k 5 "${CHECKS_S:-150}" python3 tools/gpu_check.py --json "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log"
fi

LEFT=$((${BUDGET_S:-280} - (SECONDS - START)))
echo "== benchmark: qwen3-8b, qwen3-1.7b; batch 1, 2; seq 3072, 512 anchors x 16, 5 draft layers (${LEFT}s left)"
timeout -k 5 "$LEFT" python3 tools/benchmark_dflash.py --shape qwen3-8b qwen3-1.7b \
    --micro-batch-size 1 2 --precisions bf16 fp8-delayed fp8-tensorwise fp8-blockwise \
    --attention sparse dense --steps 3 --warmup 1 --time-budget $((LEFT - 10)) \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

echo "== summary ($((SECONDS - START))s)"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("checks.json", "bench.json"):
    if not (out / name).exists():
        print(f"{name}: missing (timed out or crashed: see {name[:-5]}.log)")
checks = json.loads((out / "checks.json").read_text()) if (out / "checks.json").exists() else []
for r in checks:
    print(f"{r['check']:34} {({True: 'ok', False: 'FAIL', None: 'skip'})[r['ok']]:5} {r['detail']}")
if (out / "bench.json").exists():
    b = json.loads((out / "bench.json").read_text())
    print(f"\non {b['device']} ({b['backend']})")
    for w in b["workloads"]:
        print(f"{w['shape']} b={w['micro_batch_size']}: useful TFLOP/step "
              f"{w['flops']['total'] / 1e12:.2f}, draft attention density "
              f"{w['flops']['draft_attention_density']:.3f}")
    print(f"{'side':>9} {'shape':>10} {'b':>1} {'precision':>14} {'attn':>14} {'ms/step':>8} "
          f"{'tgt tok/s':>9} {'MFU %':>5} {'GiB':>5} {'exec TFLOP':>10}")
    for c in b["cases"]:
        side = "ours" if c["side"] == "megatron_dflash" else c["side"]
        head = (f"{side:>9} {c['shape']:>10} {c['micro_batch_size']:>1} "
                f"{c['precision']:>14} {c.get('attention', '-'):>14} ")
        if "ms_per_step" in c:
            sf = c.get("specforge")
            print(head + f"{c['ms_per_step']:8.1f} {c['target_tokens_per_s']:9.0f} "
                  f"{100 * c['mfu']:5.1f} {c['peak_memory_gib']:5.1f} "
                  f"{c['executed_flops'] / 1e12:7.2f} {c['executed_flops_source'][:4]}"
                  + (f"  [{sf['configuration']}: wrapper {sf['wrapper']}, objective_chunk_blocks "
                     f"{sf['objective_chunk_blocks']}]" if sf else ""))
        else:
            print(head + c.get("skipped", c.get("error", "")))
    for r in b.get("ratios", []):
        print(f"ours/SpecForge {r['shape']} b={r['micro_batch_size']} {r['precision']} "
              f"{r['attention']}: ms/step {r['ms_per_step']:.2f}, peak memory "
              f"{r['peak_memory_gib']:.2f}")
PY
