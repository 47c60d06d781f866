"""tools/regenerate_data.py across layouts: the merged output of disjoint data-parallel shards,
and the feature cache its replicas write, equal those of other layouts — TP=2 vs TP=1 (x DP2)
in a world of 2, TP=2 x DP=2 vs TP=1 x DP=4 in a world of 4, and a Qwen3-MoE target with its
experts split over an expert-parallel group that spans the data-parallel ranks (they generate
one shard together) vs plain DP. Run with
`torchrun --nproc-per-node 2 -m pytest -q tests/distributed/test_regenerate_tp.py` (and 4)."""
import os

import pytest
import torch
import torch.distributed as dist

from tests.dflash_testing import load_script, tiny_moe_target_dir
from tests.interop_testing import shared_tmp_dir
from tests.regenerate_testing import chat_target_dir, chat_tokenizer_dir, conversations_jsonl
from megatron_dflash.feature_cache import FeatureCacheDataset, read_manifest

LAYOUTS = {2: [("tp1", []), ("tp2", ["--tensor-model-parallel-size", "2"])],
           4: [("tp1", []), ("tp2", ["--tensor-model-parallel-size", "2"])]}


def _regenerate(tool, target, inputs, shared, name, flags):
    output = os.path.join(shared, f"{name}.jsonl")
    args = ["--target", target, "--input", inputs, "--output", output,
            "--batch-size", "2", "--max-new-tokens", "6", "--log-interval", "0",
            "--offline-features", os.path.join(shared, f"{name}_features"), "--seq-length", "64",
            "--target-layer-ids", "0", "2", *flags]
    assert tool.main(args) == 0
    with open(os.path.join(shared, f"{name}.jsonl")) as f:
        lines = f.read().splitlines()
    cache = FeatureCacheDataset(os.path.join(shared, f"{name}_features"),
                                read_manifest(os.path.join(shared, f"{name}_features")))
    return lines, {cid: cache[i] for i, cid in enumerate(cache.ids())}


def _assert_same(runs):
    (lines, features), *others = runs
    assert len(lines) == 9
    for other_lines, other_features in others:
        assert other_lines == lines
        assert sorted(other_features) == sorted(features)
        for cid, sample in features.items():
            assert torch.equal(other_features[cid]["tokens"], sample["tokens"])
            assert torch.equal(other_features[cid]["loss_mask"], sample["loss_mask"])
            assert (other_features[cid]["features"] - sample["features"]).abs().max() < 1e-5


def _layouts(utils, target_of, layouts):
    tool = load_script("tools/regenerate_data.py")
    with shared_tmp_dir() as shared:
        if dist.get_rank() == 0:
            target_of(os.path.join(shared, "target"))
            conversations_jsonl(os.path.join(shared, "in.jsonl"), count=9)
        dist.barrier()
        runs = [_regenerate(tool, os.path.join(shared, "target"),
                            os.path.join(shared, "in.jsonl"), shared, name, flags)
                for name, flags in layouts]
    _assert_same(runs)


@pytest.mark.world(2)
def test_tp2_equals_tp1_dp2(utils):
    _layouts(utils, lambda p: chat_target_dir(p, seed=5), LAYOUTS[2])


@pytest.mark.world(4)
def test_tp2_dp2_equals_tp1_dp4(utils):
    _layouts(utils, lambda p: chat_target_dir(p, seed=5), LAYOUTS[4])


@pytest.mark.world(2)
def test_moe_expert_parallel_equals_data_parallel(utils):
    def moe_target(path):
        tiny_moe_target_dir(path, seed=6)
        chat_tokenizer_dir(path)

    _layouts(utils, moe_target, [("dp2", []), ("ep2", ["--expert-model-parallel-size", "2"])])
