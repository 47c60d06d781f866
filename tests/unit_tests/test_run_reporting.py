"""What a run reports and how it survives bad steps: progress lines and the metrics file,
non-finite steps skipped by megatron's optimizer check, and a clear stop after too many."""
import json
import math

import pytest
import torch

from tests.layout_testing import Utils
from tests.dflash_testing import pattern_dataset, tiny_target_dir
from megatron_dflash.training.trainer import Trainer, TrainingError
from tests.training_testing import train

MASK = 255


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("data") / "train", 32, 48, seed=1)


def _flags(target, data, **kw):
    base = dict(target=target, mask_token_id=MASK, train_data=data, seq_length=48, block_size=8,
                num_draft_layers=1, num_anchors=4, micro_batch_size=2, global_batch_size=4,
                train_iters=6, lr=3e-3, log_interval=2, seed=7, distill_weight=0)
    base.update(kw)
    out = []
    for k, v in base.items():
        out += [f"--{k.replace('_', '-')}"] + ([str(v)] if v is not True else [])
    return out


def _run(argv):
    Utils.destroy_model_parallel()
    try:
        return train(argv)
    finally:
        Utils.destroy_model_parallel()


def _poison(monkeypatch, steps):
    """Make the gradients of the given optimizer steps (1-based) NaN after backward; record the
    draft's weights around each step."""
    real, seen = Trainer.run_step, {"step": 0, "weights": []}

    def run_step(trainer, microbatches, forward_only):
        model = trainer.model
        if not forward_only:
            seen["weights"].append([p.detach().clone() for p in model.parameters()
                                    if p.requires_grad])
        reports = real(trainer, microbatches, forward_only)
        if not forward_only:
            seen["step"] += 1
            if seen["step"] in steps:
                for buffer in model.buffers:
                    buffer.grad_data.fill_(math.nan)
        return reports

    monkeypatch.setattr(Trainer, "run_step", run_step)
    return seen


def test_nan_gradient_skips_exactly_that_step(target, data, monkeypatch, tmp_path, capsys):
    seen = _poison(monkeypatch, {3})
    result = _run(_flags(target, data, save=str(tmp_path / "ckpt")))
    assert result["skipped_iterations"] == 1 and len(result["losses"]) == 6
    norms = result["grad_norms"]
    assert math.isnan(norms[2]) and all(math.isfinite(n) for i, n in enumerate(norms) if i != 2)
    before, after = seen["weights"][2], seen["weights"][3]  # around step 3
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(seen["weights"][3], seen["weights"][4]))
    assert "update skipped (1 in a row)" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_iterations"] for m in lines] == [0, 0, 1, 1, 1, 1]


def test_run_stops_after_max_skipped_steps_in_a_row(target, data, monkeypatch):
    _poison(monkeypatch, {2, 3, 4, 5, 6})
    with pytest.raises(TrainingError, match=r"3 iterations in a row .*iteration 4.*"
                                                 r"--max-skipped-steps 3"):
        _run(_flags(target, data, max_skipped_steps=3))


def test_progress_lines_and_metrics_file(target, data, tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    _run(_flags(target, data, metrics_file=str(metrics)))
    out = capsys.readouterr().out
    assert "json" not in out
    lines = [line for line in out.splitlines() if line.startswith(" iteration")]
    assert len(lines) == 3  # every --log-interval 2 of 6
    for key in ("consumed samples:", "learning rate:", "loss:", "tau:", "acc@1..3:",
                "grad norm:", "target tokens/s:", "skipped iterations:", "ETA"):
        assert key in lines[-1], key
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert rows[-1]["consumed_samples"] == 24 and rows[-1]["tau"] >= 1.0
    assert len(rows[-1]["acc"]) == 7  # one accuracy per block position 1..B-1
