"""tools/benchmark_dflash.py end to end on the `tiny` shape (CPU: FP8 cases are skipped), and the
pieces that keep its numbers honest: fresh micro-batches, counting that cannot lose a time, the
analytic FLOPs where the counter cannot see, the order cases run in."""
import json
import math

import pytest
import torch

from tests.dflash_testing import load_script
from megatron_dflash.anchors import sample_anchors
from megatron_dflash.masks import dflash_attention_mask
from megatron_dflash.sparse_attention import build_flex_block_mask, dflash_block_mask
from megatron_dflash.step_cost import flex_attention_pairs, step_flops

bench = load_script("tools/benchmark_dflash.py")
ours = load_script("tools/benchmark_step.py")
TINY = ["--shape", "tiny", "--seq-length", "64", "--num-anchors", "4", "--block-size", "8",
        "--num-draft-layers", "2", "--steps", "2", "--warmup", "1"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine "
                            "tools/gpu_check.sh runs it for real, on NCCL (the test session's "
                            "world is gloo)")


@cpu_only
def test_tiny_benchmark_writes_every_field_for_both_sides(tmp_path):
    """Every case in its own process (ours: sparse and dense; SpecForge's own step in its fastest
    configuration), with the derived figures and the ours/SpecForge ratios."""
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--precisions", "fp32", "fp8-tensorwise", "--json", str(out)])
    result = json.loads(out.read_text())
    [workload] = result["workloads"]
    flops = workload["flops"]
    parts = ("target_forward", "draft_forward", "draft_backward", "draft_lm_head")
    assert all(flops[k] > 0 for k in parts) and flops["total"] == sum(flops[k] for k in parts)
    assert 0 < flops["draft_attention_density"] < 1
    cases = {(c["side"], c["precision"], c.get("attention")): c for c in result["cases"]}
    assert sorted(cases) == sorted(
        [("megatron_dflash", p, a) for p in ("fp32", "fp8-tensorwise") for a in ("sparse", "dense")]
        + [("specforge", "fp32", "sdpa")])
    for key in [("megatron_dflash", "fp32", a) for a in ("sparse", "dense")] + \
            [("specforge", "fp32", "sdpa")]:
        c = cases[key]
        assert c["ms_per_step"] > 0 and c["target_tokens_per_s"] > 0 and math.isfinite(c["loss"])
        assert math.isclose(c["draft_tokens_per_s"], c["target_tokens_per_s"] * 4 * 8 / 64)
        assert math.isclose(c["mfu"], c["tflops"] / 989.0)
        assert c["useful_flops"] == flops["total"] and c["peak_memory_gib"] > 0
        # On CPU the counter sees the whole step, and the analytic count agrees with it.
        assert c["executed_flops_source"] == "counter" and c["executed_flops"] == c["counted_flops"]
        assert math.isclose(c["analytic_executed_flops"], c["counted_flops"], rel_tol=0.01)
        # A fresh micro-batch every step (warmup, timed, counted).
        assert c["batches"] == c["distinct_batches"] == 4
    assert cases["specforge", "fp32", "sdpa"]["specforge"] == {
        "configuration": "fastest", "wrapper": "none", "attention_backend": "sdpa",
        "objective_chunk_blocks": 0, "target_logits_to_keep": 1, "dtype": "fp32"}
    for attention in ("sparse", "dense"):
        assert cases["megatron_dflash", "fp8-tensorwise", attention]["skipped"]
    # Same data, same initial draft: the two attentions train the same model, exactly.
    assert abs(cases["megatron_dflash", "fp32", "sparse"]["loss"]
               - cases["megatron_dflash", "fp32", "dense"]["loss"]) < 1e-5
    assert {(r["precision"], r["attention"]) for r in result["ratios"]} == \
        {("fp32", "sparse"), ("fp32", "dense")}


@cpu_only
def test_a_failed_count_keeps_the_measured_step(tmp_path):
    """A counter that fails (forced here) leaves its reason; the case keeps ms/step, peak memory
    and loss, and its executed FLOPs come from the analytic count."""
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--precisions", "fp32", "--attention", "sparse", "--baseline", "none",
                       "--break-flop-counter", "--json", str(out)])
    [case] = json.loads(out.read_text())["cases"]
    assert "forced by --break-flop-counter" in case["counter_error"]
    assert case["ms_per_step"] > 0 and case["peak_memory_gib"] > 0 and math.isfinite(case["loss"])
    assert case["executed_flops_source"] == "analytic" and "counted_flops" not in case
    assert case["executed_flops"] == case["analytic_executed_flops"] > case["useful_flops"]


def test_every_step_gets_a_fresh_microbatch():
    """New random tokens and new anchors each call, prepared as training prepares them; the
    benchmark's FLOPs are those of exactly the micro-batches the timed steps take."""
    args = bench.build_parser().parse_args(TINY)
    w = bench.workload(args, "tiny", 2)
    produce = ours.microbatch_producer(args, 2, w["hf"].vocab_size, w["cfg"], "sparse")
    made = [produce() for _ in range(args.warmup + args.steps)]
    assert [p for _, p in made] == [2, 4, 6] and len(set(produce.digests)) == 3
    (first, _), (second, _) = made[:2]
    assert not torch.equal(first["tokens"], second["tokens"])
    assert not torch.equal(first["attention_mask"].anchors, second["attention_mask"].anchors)
    for (mb, _), (context, supervised) in zip(made[args.warmup:], w["batches"]):
        assert torch.equal(mb["attention_mask"].context_lengths(), context)
        assert int(mb["supervised"].sum()) == supervised


def test_flops_count_exactly_the_visible_attention():
    """The draft's attention FLOPs are those of the (query, key) pairs the mask leaves visible."""
    hf = bench.hf_config("tiny")
    t = bench.target_transformer_config(hf)
    cfg = bench.DFlashConfig(block_size=8, num_draft_layers=2, mask_token_id=255).resolve(
        t, vocab_size=hf.vocab_size, target_rope_theta=1e6)
    anchors = torch.tensor([[0, 5, 30, 0], [12, 40, 3, 0]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, True]])
    flops = step_flops(t, cfg, hf.vocab_size, 48, torch.where(keep, anchors, 0),
                       supervised=7 * 11)
    visible = (~dflash_attention_mask(anchors, keep, 48, 8)).double().mean()
    assert math.isclose(flops["draft_attention_density"], float(visible))


@pytest.mark.parametrize("seq_len,block_size,num_anchors,batch",
                         [(300, 16, 20, 2), (512, 8, 40, 1), (256, 10, 25, 2)])
def test_flex_attention_pairs_are_the_tiles_its_block_mask_keeps(seq_len, block_size,
                                                                 num_anchors, batch):
    """The analytic FlexAttention count is every 128x128 tile its BlockMask computes."""
    loss_mask = torch.arange(seq_len).expand(batch, seq_len) >= seq_len // 10
    anchors, keep = sample_anchors(loss_mask, block_size, num_anchors,
                                   torch.Generator().manual_seed(0))
    mask = dflash_block_mask(anchors, keep, seq_len, block_size)
    blocks = build_flex_block_mask(mask)
    tiles = int(blocks.kv_num_blocks.sum()) + int(blocks.full_kv_num_blocks.sum())
    assert flex_attention_pairs(mask.context_lengths(), seq_len, block_size) == tiles * 128 * 128


def test_cases_run_in_order_of_importance():
    """Per (shape, batch): ours bf16, SpecForge, then FP8 (all recipes first, the fastest of them
    after); the other recipes and attentions last."""
    args = bench.build_parser().parse_args(
        ["--shape", "qwen3-8b", "qwen3-1.7b", "--micro-batch-size", "1", "2", "--precisions",
         "bf16", "fp8-delayed", "fp8-tensorwise", "--attention", "sparse", "dense"])
    done = []
    order = []
    for case in bench.plan_cases(args, done):
        order.append((case["shape"], case["micro_batch_size"], case["side"], case["precision"],
                      case.get("attention", case.get("configuration"))))
        if case["precision"].startswith("fp8"):  # tensorwise is the faster here
            done.append(case | {"ms_per_step": 2.0 if "tensorwise" in case["precision"] else 3})
    main = [(s, b, side, p, a) for s in ("qwen3-8b", "qwen3-1.7b") for b in (1, 2)
            for side, p, a in [("megatron_dflash", "bf16", "sparse"),
                               ("specforge", "bf16", "fastest")]
            + ([("megatron_dflash", "fp8-delayed", "sparse")] if (s, b) == ("qwen3-8b", 1)
               else []) + [("megatron_dflash", "fp8-tensorwise", "sparse")]]
    assert order[:len(main)] == main
    rest = order[len(main):]
    assert len(rest) == 3 + 4 * 3 and all(c[2] == "megatron_dflash" for c in rest)
    assert [c[3] for c in rest[:1]] == ["bf16"] and rest[0][4] == "dense"
