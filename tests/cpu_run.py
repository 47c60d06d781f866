"""Run a tools/ script on a CPU-only machine with megatron-core's CPU adaptations applied
(`megatron_dflash.cpu`), for the tools that do not apply them themselves yet.

  python tests/cpu_run.py tools/evaluate_dflash.py --draft ... [args]
"""
import os
import runpy
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from megatron_dflash import cpu  # noqa: E402

if __name__ == "__main__":
    cpu.apply()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
