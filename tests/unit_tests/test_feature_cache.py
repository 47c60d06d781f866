"""The offline feature cache (--offline-features, tools/cache_features.py) and --export: training
from cached taps equals online training; the cache's format round-trips; a cache of another
target, taps or sequence length is refused with one message; the export at the end of training
equals the saved draft."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.layout_testing import Utils
from tests.dflash_testing import load_script, pattern_dataset, tiny_target_dir
from megatron_dflash import feature_cache
from megatron_dflash.data.dataset import IndexedConversationDataset
from megatron_dflash.draft_reader import read_checkpoint, read_reference
from megatron_dflash.training.pretrain import parse_plan
from tests.training_testing import train

MASK = 255  # never produced by pattern_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fewer conversations than the shared `data` fixture: the cache tests write them twice."""
    d = tmp_path_factory.mktemp("data")
    return pattern_dataset(d / "train", 16, 48, seed=1), pattern_dataset(d / "valid", 4, 48, seed=2)


def flags(target, train, valid=None, **kw):
    base = dict(target=target, mask_token_id=MASK, train_data=train, seq_length=48, block_size=8,
                num_draft_layers=1, num_anchors=4, micro_batch_size=2, global_batch_size=4,
                train_iters=3, lr=3e-3, min_lr=3e-4, log_interval=50, eval_samples=4, seed=7,
                distill_weight=0, target_layer_ids=[0, 2])
    if valid:
        base["valid_data"] = valid
    base.update(kw)
    out = []
    for k, v in base.items():
        values = v if isinstance(v, list) else [] if v is True else [v]
        out += [f"--{k.replace('_', '-')}"] + [str(x) for x in values]
    return out


def run_in_process(argv):
    Utils.destroy_model_parallel()
    try:
        return train(argv)
    finally:
        Utils.destroy_model_parallel()


@pytest.fixture(scope="module")
def tool_cache(target, data, tmp_path_factory):
    """A cache (train + held-out split) written by tools/cache_features.py, fp32, TP 1."""
    out = str(tmp_path_factory.mktemp("tool") / "cache")
    Utils.destroy_model_parallel()
    assert load_script("tools/cache_features.py").main(
        ["--target", target, "--train-data", data[0], "--valid-data", data[1], "--seq-length",
         "48", "--target-layer-ids", "0", "2", "--offline-features", out]) == 0
    return out


def test_training_from_the_cache_equals_online_training(target, data, tool_cache, tmp_path,
                                                        capsys):
    """Same losses, grad norms and held-out tau (<= 1e-5), whether the features come from the
    target online, from a cache the job writes first, or from the tool's cache; the disk use is
    printed before the cache is written."""
    online = run_in_process(flags(target, *data))
    capsys.readouterr()
    written = run_in_process(flags(target, *data, offline_features=str(tmp_path / "cache")))
    out = capsys.readouterr().out
    from_tool = run_in_process(flags(target, *data, offline_features=tool_cache))
    assert "B/token (2 taps x 64 hidden x 4 B fp32 + 5 B token/mask)" in out, out
    assert out.index("B/token") < out.index("written in"), out
    for run in (written, from_tool):
        for key in ("losses", "grad_norms"):
            assert max(abs(a - b) for a, b in zip(online[key], run[key], strict=True)) <= 1e-5, key
        for key in ("tau_start", "tau_end"):
            assert abs(online[key] - run[key]) <= 1e-5, key
    assert feature_cache.read_manifest(str(tmp_path / "cache")) == \
        feature_cache.read_manifest(tool_cache)


def test_packed_training_from_the_cache_equals_online_packed_training(target, tmp_path):
    """--pack-sequences packs the cache's per-conversation taps as it reads them (16-token
    conversations, three to a row): the same losses and grad norms as packing online."""
    short = pattern_dataset(tmp_path / "short", 12, 16, seed=3)
    online = run_in_process(flags(target, short, pack_sequences=True))
    cached = run_in_process(flags(target, short, pack_sequences=True,
                                  offline_features=str(tmp_path / "cache")))
    for key in ("losses", "grad_norms"):
        assert max(abs(a - b) for a, b in zip(online[key], cached[key], strict=True)) <= 1e-5, key


def test_manifest_and_shards_round_trip(target, tmp_path):
    """Two writer ranks, several shards each: the reader gives every sample back in rank order,
    bit for bit, and the shards hold the documented tensors."""
    manifest = feature_cache.cache_manifest(target, [0, 2], 48, "bf16")
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(7):
        n = 5 + i
        samples.append((f"s{i}", torch.randint(0, 256, (n,), generator=g),
                        torch.randint(0, 2, (n,), generator=g), torch.randn(n, 128, generator=g)))
    out = str(tmp_path / "cache")
    writers = [feature_cache.FeatureCacheWriter(out, manifest=manifest, rank=r, shard_bytes=2000)
               for r in (0, 1)]
    writers[0].__enter__()
    writers[1].__enter__()
    for sample in samples[4:]:
        writers[1].add(*sample)
    writers[1].__exit__(None, None, None)
    for sample in samples[:4]:
        writers[0].add(*sample)
    writers[0].__exit__(None, None, None)  # rank 0 last: merges the parts and publishes
    found = feature_cache.read_manifest(out)
    assert {k: found[k] for k in manifest} == manifest and found["num_samples"] == 7
    assert found["num_tokens"] == sum(len(s[1]) for s in samples)
    assert found["bytes_per_token"] == 2 * 64 * 2 + 5
    files = [s["file"] for s in found["shards"]]
    assert len(files) > 2 and files == sorted(files, key=lambda f: f.split("-")[1])
    assert sorted(os.listdir(out)) == sorted(files + ["manifest.json"])
    assert not os.path.exists(out + ".partial")
    with safe_open(os.path.join(out, files[0]), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
        assert json.loads(f.metadata()["ids"])[0] == "s0"
    assert dtypes == {"tokens": torch.int32, "loss_mask": torch.uint8, "offsets": torch.int64,
                      "features": torch.bfloat16}
    ds = feature_cache.FeatureCacheDataset(out, manifest)
    assert len(ds) == 7 and ds.ids() == [s[0] for s in samples]
    for i, (_, tokens, mask, features) in enumerate(samples):
        item = ds[i]
        assert torch.equal(item["tokens"], tokens) and torch.equal(item["loss_mask"], mask.bool())
        assert torch.equal(item["features"], features.to(torch.bfloat16))


def test_cache_that_does_not_fit_is_refused(target, data, monkeypatch):
    """The disk use is checked against the free space before anything is written."""
    manifest = feature_cache.cache_manifest(target, [0, 2], 48, "fp32")
    train = IndexedConversationDataset(data[0])
    total, line = feature_cache.disk_use(manifest, [train], "/nonexistent/cache")
    assert total == 16 * 48 * (2 * 64 * 4 + 5) and "768 tokens x 517 B/token" in line, line
    monkeypatch.setattr(feature_cache.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9, total - 1))
    with pytest.raises(ValueError, match="= 0.4 MiB: only 0.4 MiB free on /'s file system"):
        feature_cache.disk_use(manifest, [train], "/nonexistent/cache")


def _error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse_plan(argv)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_cache_of_another_run_is_refused(target, data, tool_cache, tmp_path, capsys):
    """Another target, other taps, another sequence length: one message each, naming what
    differs, from the flags and from the reader."""
    other = tiny_target_dir(tmp_path / "other", seed=1)
    cases = [({"target_": other}, "target (--target): "),
             ({"target_layer_ids": [1, 2]}, "target_layer_ids (--target-layer-ids): [0, 2] in "
                                           "the cache, [1, 2] now"),
             ({"seq_length": 40}, "seq_length (--seq-length): 48 in the cache, 40 now")]
    for change, message in cases:
        argv = flags(change.pop("target_", target), *data, offline_features=tool_cache,
                     **change)
        line = _error_line(argv, capsys)
        assert message in line and line.count("in the cache") == 1, line
    expected = feature_cache.cache_manifest(target, [0, 2], 40, "fp32")
    with pytest.raises(ValueError, match=r"seq_length \(--seq-length\): 48 in the cache, 40 now"):
        feature_cache.FeatureCacheDataset(tool_cache, expected)
    line = _error_line(flags(target, *data, offline_features=tool_cache, distill_weight=0.5),
                       capsys)
    assert "distillation" in line, line
    with pytest.raises(SystemExit):  # the tool never writes over a cache
        load_script("tools/cache_features.py").main(
            ["--target", target, "--train-data", data[0], "--offline-features", tool_cache])
    assert "already holds a feature cache" in capsys.readouterr().err


def test_export_at_the_end_equals_the_saved_draft(target, data, tmp_path):
    """--export writes the reference format from the final checkpoint: its tensors are the saved
    draft's; an earlier export is replaced, any other non-empty directory refused."""
    save, export = str(tmp_path / "ckpt"), str(tmp_path / "export")
    run_in_process(flags(target, data[0], train_iters=2, save=save, export=export))
    _, _, exported = read_reference(export)
    from megatron_dflash import state_dict_adapter
    extra, cfg, full = read_checkpoint(save)
    saved = state_dict_adapter.megatron_to_hf(full, cfg)
    assert sorted(exported) == sorted(saved)
    assert all(torch.equal(exported[k], saved[k].to(exported[k].dtype)) for k in saved)
    result = run_in_process(flags(target, data[0], train_iters=1, export=export))  # no --save
    assert result["export"] == os.path.abspath(export) and not any(
        ".partial" in n for n in os.listdir(tmp_path))
    replaced = read_reference(export)[2]
    assert sorted(replaced) == sorted(saved) and not all(
        torch.equal(replaced[k], exported[k]) for k in saved)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        parse_plan(flags(target, data[0], export=str(tmp_path / "busy")))
