#!/usr/bin/env bash
# GPU checks for the TE backend, FP8 and sparse attention, then the Qwen3-8B-shape benchmark:
# one device call of at most about 5 minutes on an H100: the checks get CHECKS_S=150 s (cold
# inductor/FlexAttention compiles and seven short training jobs; every row is written to
# checks.json as it finishes), the benchmark the rest of BUDGET_S=280 s (it writes bench.json
# after every case). A cut run keeps what it measured.
#
# Once, in the checkout (megatron-core + Transformer Engine wheels, ../shared/gpu-wheels/README.md):
#     mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/ && echo /.whl/ >> .git/info/exclude
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

echo "== checks: TE vs local draft, sparse vs dense attention, FP8 training"
timeout -k 5 "${CHECKS_S:-150}" python3 tools/gpu_check.py --json "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log"

LEFT=$((${BUDGET_S:-280} - (SECONDS - START)))
echo "== benchmark: qwen3-8b shape, seq 3072, 512 anchors x 16, 5 draft layers (${LEFT}s left)"
timeout -k 5 "$LEFT" python3 tools/benchmark_dflash.py --shape qwen3-8b --steps 3 --warmup 1 \
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
    print(f"\n{b['shape']} on {b['device']} ({b['backend']}), model TFLOP/step "
          f"{b['flops']['total'] / 1e12:.1f}, draft attention density "
          f"{b['flops']['draft_attention_density']:.3f}")
    print(f"{'precision':>15} {'attn':>6} {'ms/step':>9} {'tgt tok/s':>10} {'drf tok/s':>10} "
          f"{'MFU %':>6} {'GiB':>6}")
    for c in b["cases"]:
        head = f"{c['precision']:>15} {c['attention']:>6} "
        if "ms_per_step" in c:
            print(head + f"{c['ms_per_step']:9.1f} {c['target_tokens_per_s']:10.0f} "
                  f"{c['draft_tokens_per_s']:10.0f} {100 * c['mfu']:6.1f} "
                  f"{c['peak_memory_gib'] or 0:6.1f}")
        else:
            print(head + c.get("skipped", c.get("error", "")))
PY
