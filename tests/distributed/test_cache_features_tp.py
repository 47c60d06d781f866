"""tools/cache_features.py under tensor and sequence parallelism: the cache written at TP2 + SP
holds the same samples and taps as the one written at TP1 (the two ranks then data-parallel).
Sequence parallelism forks megatron's model-parallel RNG tracker, which the tool's start-up seeds.
"""
import os

import pytest
import torch
import torch.distributed as dist

from megatron_dflash.feature_cache import FeatureCacheDataset, read_manifest
from tests.dflash_testing import load_script, pattern_dataset, tiny_target_dir
from tests.interop_testing import shared_tmp_dir


@pytest.mark.world(2)
def test_cache_at_tp2_with_sequence_parallel_equals_tp1(utils):
    tool = load_script("tools/cache_features.py")
    with shared_tmp_dir() as root:
        target, data = os.path.join(root, "target"), os.path.join(root, "data")
        if dist.get_rank() == 0:
            tiny_target_dir(target)
            pattern_dataset(data, 6, 40, seed=3)
        dist.barrier()
        caches = {}
        for name, layout in (("tp1", []), ("tp2_sp", ["--tensor-model-parallel-size", "2",
                                                      "--sequence-parallel"])):
            caches[name] = os.path.join(root, name)
            utils.destroy_model_parallel()
            assert tool.main(["--target", target, "--train-data", data, "--seq-length", "40",
                              "--target-layer-ids", "0", "2", "--offline-features",
                              caches[name], *layout]) == 0
            dist.barrier()
        manifest = {k: v for k, v in read_manifest(caches["tp1"]).items()
                    if k not in ("shards", "num_samples", "num_tokens")}
        tp1, tp2 = (FeatureCacheDataset(caches[n], manifest) for n in ("tp1", "tp2_sp"))
        assert len(tp1) == len(tp2) == 6
        for i in range(6):
            a, b = tp1[i], tp2[i]
            assert torch.equal(a["tokens"], b["tokens"])
            assert (a["features"] - b["features"]).abs().max() <= 1e-5
