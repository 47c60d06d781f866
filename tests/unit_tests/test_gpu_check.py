"""tools/gpu_check.py's checks run on the CPU too (TE and FP8 variants skipped), so the script
that only a GPU machine runs in full is exercised here."""
import json

import pytest
import torch

from tests.dflash_testing import load_script

gpu_check = load_script("tools/gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine tools/gpu_check.sh "
                    "runs it for real, on NCCL (the test session's world is gloo)")
def test_gpu_check_passes_what_this_machine_can_run(utils, tmp_path):
    assert gpu_check.main(["--json", str(tmp_path / "checks.json")]) == 0
    rows = {r["check"]: r for r in json.loads((tmp_path / "checks.json").read_text())}
    ran = [name for name, r in rows.items() if r["ok"]]
    assert {"draft local sparse float32", "draft local dense bfloat16",
            "draft local sparse float32 dflash2", "draft local dense bfloat16 dflash2"} <= set(ran)
    assert "train local bf16" in ran  # the training job itself, from its flags
    assert all(rows[n]["ok"] is None for n in rows if "te " in n or "fp8" in n)
