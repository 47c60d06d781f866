"""Run a tools/ script on a CPU-only machine: megatron-core's forward and checkpoint writer call
CUDA APIs that only the test-side shims (cpu_compat) answer on the CPU.

  python tests/cpu_run.py tools/evaluate_dflash.py --draft ... [args]
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cpu_compat  # noqa: E402

if __name__ == "__main__":
    cpu_compat.apply()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
