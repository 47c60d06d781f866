"""The tools with a Qwen3-MoE target: train a few steps (expert-parallel over the whole world),
export the checkpoint with tools/export_hf.py, re-import it with tools/import_hf.py (bit-exact),
evaluate the draft with lossless greedy speculative decoding (its tokens equal target-only greedy
decoding through megatron and HF `generate` of the same checkpoint), and measure per-rank memory
with tools/measure_memory.py's own accounting (each expert-parallel rank holds 1/EP of the
experts; attention, dense layers and the draft are replicated). World size 2:
`torchrun --nproc-per-node 2 -m pytest tests/distributed/test_moe_tools.py`.
"""
import os

import pytest
import torch
import torch.distributed as dist

from tests.dflash_testing import pattern_dataset, tiny_moe_config, tiny_moe_target_dir
from tests.families_testing import perturbed_model
from tests.interop_testing import reference_tensors, same_bytes, shared_tmp_dir, tool
from megatron_dflash import state_dict_adapter
from megatron_dflash.draft_reader import read_checkpoint
from megatron_dflash.evaluate import build_decoder, evaluate
from megatron_dflash.distributed import init_distributed
from megatron_dflash.training.pretrain import parse_plan
from tests.training_testing import train

MASK, SEED = 255, 0
WORLDS = [pytest.param(n, marks=pytest.mark.world(n)) for n in (2,)]  # make test runs worlds 2 and 4


@pytest.fixture(scope="module")
def shared():
    with shared_tmp_dir() as path:
        if dist.get_rank() == 0:
            tiny_moe_target_dir(os.path.join(path, "target"), seed=SEED)
            pattern_dataset(os.path.join(path, "data"), 16, 48, seed=1)
        dist.barrier()
        yield path


def _train_flags(shared, **kw):
    flags = ["--target", os.path.join(shared, "target"), "--mask-token-id", str(MASK),
             "--train-data", os.path.join(shared, "data"), "--seq-length", "48",
             "--block-size", "4", "--num-anchors", "4", "--num-draft-layers", "1",
             "--target-layer-ids", "0", "1", "3", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--lr", "3e-3", "--seq-length-buckets", "1"]
    for k, v in kw.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def _export(root, out):
    """tools/export_hf.py's main on every rank: the export reads the whole draft collectively
    over whatever world exists and rank 0 writes `out` (the checks below compare it)."""
    assert tool("export_hf").main(["--checkpoint", root, "--output", out]) == 0
    dist.barrier()
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def _hf_greedy(model, prompt, new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("world", WORLDS)
def test_train_export_import_evaluate(world, shared, utils):
    """EP = world: each rank trains with half (world 2) or all of the experts."""
    target, root, out, imported = (os.path.join(shared, n) for n in
                                   ("target", f"ckpt{world}", f"export{world}", f"imported{world}"))
    utils.destroy_model_parallel()
    result = train(_train_flags(shared, expert_model_parallel_size=world, train_iters=3,
                                save=root))
    assert len(result["losses"]) == 3
    utils.destroy_model_parallel()
    _export(root, out)

    utils.initialize_model_parallel(world)  # the tools' layout: every rank a TP rank
    assert tool("import_hf").main(["--draft", out, "--checkpoint", imported,
                                   "--target", target]) == 0
    _, trained_cfg, trained = read_checkpoint(root)
    _, cfg, again = read_checkpoint(imported)
    exported = reference_tensors(out)
    assert all(same_bytes(v, exported[k])
               for k, v in state_dict_adapter.megatron_to_hf(again, cfg).items())
    assert sorted(again) == sorted(trained)
    assert all(same_bytes(again[k], trained[k]) for k in trained)

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 250, (6,), generator=g).tolist() for _ in range(2)]
    report, pairs = evaluate(build_decoder(target, imported), prompts, 12, warmup=False)
    assert report.lossless and report.block_size == 4 and 1 <= report.tau <= 4
    hf = perturbed_model(tiny_moe_config(), SEED)
    for prompt, (dflash, baseline) in zip(prompts, pairs, strict=True):
        assert dflash.tokens == baseline.tokens == _hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("world", WORLDS)
def test_measure_memory_accounting(world, shared, utils):
    """tools/measure_memory.py's per-rank figures at EP = world, against the HF checkpoint's
    tensors: each rank holds num_experts / EP experts of every MoE layer, the rest of the target
    whole, the draft whole, and 1/DP of the draft's Adam moments (distributed optimizer)."""
    utils.destroy_model_parallel()
    plan = parse_plan(_train_flags(shared, expert_model_parallel_size=world, train_iters=1,
                                   distill_weight=0.5))
    init_distributed(plan.run.parallel, plan.run.training.seed)
    row = tool("measure_memory").measure(plan)
    hf = dict(perturbed_model(tiny_moe_config(), SEED).named_parameters())
    experts = sum(p.numel() * 4 for n, p in hf.items() if ".experts." in n)
    assert row["experts"] * world == experts
    assert row["target"] == sum(p.numel() * 4 for n, p in hf.items() if ".experts." not in n)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    assert all(r["draft"] == row["draft"] and r["target"] == row["target"] for r in rows)
    # Adam's two fp32 moments of the draft, each element on one data-parallel rank.
    shares = [r["optimizer"] for r in rows]
    assert sum(shares) == 2 * row["draft"], (shares, row["draft"])
    assert max(shares) * world <= 2 * row["draft"] * 1.05, shares
