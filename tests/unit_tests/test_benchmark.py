"""tools/benchmark_dflash.py end to end on the `tiny` shape (CPU: FP8 cases are skipped)."""
import json
import math

import pytest
import torch

from tests.dflash_testing import load_script
from megatron_dflash.masks import dflash_attention_mask

bench = load_script("tools/benchmark_dflash.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine tools/gpu_check.sh "
                    "runs it for real, on NCCL (the test session's world is gloo)")
def test_tiny_benchmark_writes_every_field_for_both_sides(tmp_path):
    """Every case in its own process (ours: sparse and dense; SpecForge's own step), with the
    derived figures and the ours/SpecForge ratios."""
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--seq-length", "64", "--num-anchors", "4", "--block-size",
                "8", "--num-draft-layers", "2", "--steps", "2", "--warmup", "1",
                "--precisions", "fp32", "fp8-tensorwise", "--json", str(out)])
    result = json.loads(out.read_text())
    flops = result["flops"]
    parts = ("target_forward", "draft_forward", "draft_backward", "draft_lm_head")
    assert all(flops[k] > 0 for k in parts) and flops["total"] == sum(flops[k] for k in parts)
    assert 0 < flops["draft_attention_density"] < 1
    cases = {(c["side"], c["precision"], c["attention"]): c for c in result["cases"]}
    assert sorted(cases) == sorted(
        [("megatron_dflash", p, a) for p in ("fp32", "fp8-tensorwise") for a in ("sparse", "dense")]
        + [("specforge", "fp32", "sdpa")])
    for key in [("megatron_dflash", "fp32", a) for a in ("sparse", "dense")] + \
            [("specforge", "fp32", "sdpa")]:
        c = cases[key]
        assert c["ms_per_step"] > 0 and c["target_tokens_per_s"] > 0 and math.isfinite(c["loss"])
        assert math.isclose(c["draft_tokens_per_s"], c["target_tokens_per_s"] * 4 * 8 / 64)
        assert math.isclose(c["mfu"], c["tflops"] / 989.0)
        assert c["peak_memory_gib"] > 0 and c["executed_flops"] > 0
    for attention in ("sparse", "dense"):
        assert cases["megatron_dflash", "fp8-tensorwise", attention]["skipped"]
    # Same data, same initial draft: the two attentions train the same model, exactly.
    assert abs(cases["megatron_dflash", "fp32", "sparse"]["loss"]
               - cases["megatron_dflash", "fp32", "dense"]["loss"]) < 1e-5
    assert {(r["precision"], r["attention"]) for r in result["ratios"]} == \
        {("fp32", "sparse"), ("fp32", "dense")}


def test_flops_count_exactly_the_visible_attention():
    """The draft's attention FLOPs are those of the (query, key) pairs the mask leaves visible."""
    hf = bench.hf_config("tiny")
    t = bench.target_transformer_config(hf)
    cfg = bench.DFlashConfig(block_size=8, num_draft_layers=2, mask_token_id=255).resolve(
        t, vocab_size=hf.vocab_size, target_rope_theta=1e6)
    anchors = torch.tensor([[0, 5, 30, 0], [12, 40, 3, 0]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, True]])
    flops = bench.model_flops(t, cfg, hf.vocab_size, 48, bench.block_context_lengths(anchors, keep),
                              supervised=7 * 11)
    visible = (~dflash_attention_mask(anchors, keep, 48, 8)).double().mean()
    assert math.isclose(flops["draft_attention_density"], float(visible))
