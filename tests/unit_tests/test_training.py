"""Training end to end: learning, sparse == dense attention, bad data, flag validation, loading
with other settings (kill-and-resume and signals: test_resume.py)."""
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from megatron_dflash import checkpoint
from megatron_dflash.training.pretrain import parse_plan
from tests.dflash_testing import pattern_dataset
from tests.training_testing import REPO, flags, run_in_process


def test_training_lowers_loss_and_raises_tau(target, data):
    result = run_in_process(flags(target, *data, train_iters=200, distill_weight=0))
    losses = result["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert result["tau_end"] > result["tau_start"] + 1.0, (result["tau_start"], result["tau_end"])


def test_dflash2_learns_the_pattern_faster_than_dflash(target, data):
    """At equal steps on the same task, DFlash2's held-out τ̂ (its selector's path) is far above
    DFlash's: the selector's transitions learn the cycle (measured at 50 steps: 8.0 against
    1.2-2.4 over three seeds)."""
    tau = {v: run_in_process(flags(target, *data, train_iters=50, distill_weight=0,
                                   draft_variant=v))["tau_end"] for v in ("dflash", "dflash2")}
    assert tau["dflash2"] >= tau["dflash"] + 2.0, tau


@pytest.mark.parametrize("layers", [[], ["--num-draft-layers", "2", "--target-layer-ids", "1", "2",
                                           "--draft-layer-types", "sliding", "full",
                                           "--draft-sliding-window", "12"]],
                         ids=["full", "sliding"])
def test_sparse_attention_trains_like_dense(target, data, layers):
    """--attention sparse (the gather path on CPU) follows the dense-mask run step for step,
    also for a draft of a causal sliding-window layer (window 12 of 48 tokens) and a full one."""
    dense, sparse = (run_in_process(flags(target, data[0], train_iters=8, distill_weight=0.5,
                                          attention=attention) + layers)
                     for attention in ("dense", "sparse"))
    for key in ("losses", "grad_norms"):
        assert max(abs(a - b) for a, b in zip(dense[key], sparse[key], strict=True)) <= 1e-5, key
    assert dense["losses"][-1] < dense["losses"][0]


def test_distillation_trains_and_writes_tensorboard(target, data, tmp_path):
    result = run_in_process(flags(target, *data, train_iters=30, distill_weight=0.5,
                                  tensorboard_dir=str(tmp_path / "tb")))
    assert sum(result["losses"][-5:]) < sum(result["losses"][:5])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"train/loss", "train/tau_hat", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 30


def test_finetune_loads_weights_only(target, data, tmp_path):
    """--finetune starts from the checkpoint's draft (held-out tau as the run ended) at step 0."""
    first = run_in_process(flags(target, *data, train_iters=40, distill_weight=0,
                                 save=str(tmp_path / "ckpt")))
    again = run_in_process(flags(target, *data, train_iters=2, distill_weight=0,
                                 load=str(tmp_path / "ckpt"), finetune=True))
    assert first["tau_end"] > first["tau_start"]
    assert again["tau_start"] == first["tau_end"] and len(again["losses"]) == 2


def test_bad_data_is_skipped_and_reported(target, tmp_path, capsys):
    lines = [f"hello number {i} yes no maybe" for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, model_type="bpe",
        hard_vocab_limit=False, user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    good = {"messages": [{"role": "user", "content": "hello number 1"},
                         {"role": "assistant", "content": "yes no maybe " * 6}]}
    rows = [json.dumps(good)] * 3 + ['{"messages": [oops'] + [json.dumps(good)] * 2 + \
        [json.dumps({"messages": [{"role": "user", "content": "no answer"}]})] + \
        [json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "maybe " * 200}]})] + [json.dumps(good)] * 4
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = run_in_process(flags(target, str(path), tokenizer=f"sp:{tmp_path / 'sp.model'}",
                                  train_iters=3, micro_batch_size=1, global_batch_size=2))
    out = capsys.readouterr().out
    assert len(result["losses"]) == 3
    assert "12 conversations in 1 file(s): 10 kept (1 truncated), 2 skipped" in out, out
    for line, kind in ((4, "malformed JSON"), (7, "no assistant turn"), (8, "truncated")):
        assert any(f"chat.jsonl:{line}: {kind}" in l for l in out.splitlines()), (line, out)


@pytest.mark.parametrize("argv,flag", [
    (["--seq-length", "0"], "--seq-length"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--distill-weight", "2"], "--distill-weight"),
    (["--tensor-model-parallel-size", "3"], "world size"),
    (["--target", "/nonexistent", "--mask-token-id", "3"], "--target"),
    (["--block-size", "1"], "--block-size"),
    (["--finetune"], "--finetune"),
    (["--attention", "flash"], "--attention"),
    (["--fp8-recipe", "delayed"], "--fp8-recipe"),
    (["--fp8-format", "hybrid"], "--transformer-impl transformer_engine"),
    (["--target-fp8-format", "e4m3"], "--transformer-impl transformer_engine"),
    (["--train-data", "chat.jsonl", "--embedded-answers", "human"], "--embedded-answers=human"),
    (["--target-layer-ids", "1", "5", "40"],  # the embedded target has 30 layers
     "--target-layer-ids=[1, 5, 40]: 40 is outside the target's layers [0, 29]"),
])
def test_bad_flags_fail_before_any_work(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_plan(argv)
    assert flag in capsys.readouterr().err


def _parse_error(argv, capsys, world_size=1) -> str:
    """parse_plan must exit 2 with argparse's usage and one error line, no traceback: that line."""
    with pytest.raises(SystemExit) as exit_:
        parse_plan(argv, world_size=world_size)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert err.startswith("usage:") and len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize("extra,message", [
    (["--mask-token-id", "99999999"], "--mask-token-id=99999999 must be an integer [0, 255]"),
    (["--target-layer-ids", "1", "5", "40"],
     "--target-layer-ids=[1, 5, 40]: 5 is outside the target's layers [0, 3]"),
    (["--num-draft-layers", "5"], "--num-draft-layers=5: the default --target-layer-ids need"),
    (["--draft-num-attention-heads", "3", "--draft-num-query-groups", "1",
      "--tensor-model-parallel-size", "2"],
     "--draft-num-attention-heads=3 must be divisible by the tensor-parallel size 2"),
    (["--draft-num-query-groups", "3"],
     "--draft-num-query-groups=3 must divide --draft-num-attention-heads=4"),
    (["--draft-kv-channels", "7"], "--draft-kv-channels=7 must be even"),
    (["--draft-variant", "dflash2", "--conv-group-size", "24"],
     "--conv-group-size=24 must divide the hidden size 64"),
    (["--draft-variant", "dflash2", "--block-size", "4", "--conv-kernel-size", "5"],
     "--conv-kernel-size=5 must be <= --block-size=4"),
    (["--selector-top-k", "4"], "--selector-top-k=4 is a DFlash2 setting: it needs "
                                "--draft-variant='dflash2'"),
    (["--draft-layer-types", "sliding"],
     "--draft-layer-types=['sliding_attention'] has sliding layers: they need a "
     "--draft-sliding-window"),
    (["--draft-sliding-window", "4"], "--draft-sliding-window=4 must be an integer >= 8"),
])
def test_draft_flags_are_checked_against_the_target_config(target, data, extra, message, capsys):
    """What DFlashConfig.resolve rejects, found from the flags and the target's config.json by
    parse_plan (nothing is built), named by flag."""
    world = 2 if "--tensor-model-parallel-size" in extra else 1
    assert message in _parse_error(flags(target, data[0]) + extra, capsys, world)


def test_unreadable_target_weights_fail_in_parse_plan(target, data, tmp_path, capsys):
    broken = tmp_path / "target"
    shutil.copytree(target, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    line = _parse_error(flags(str(broken), data[0]), capsys)
    assert f"--target: {weights} is truncated or unreadable" in line, line


def test_bad_input_found_after_launch_is_one_line(target, tmp_path):
    """A data file that passes the flag checks but cannot be used: `error: ...` naming it, status
    1, no traceback (the data is read before the target is loaded)."""
    good, other = pattern_dataset(tmp_path / "good", 8, 48), pattern_dataset(tmp_path / "other", 6, 48)
    for ext in (".bin", ".idx"):  # a loss mask of another dataset
        shutil.copy(other + "_loss_mask" + ext, good + "_loss_mask" + ext)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["MASTER_PORT"] = str(30000 + os.getpid() % 20000)
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "pretrain_dflash.py"),
                           *flags(target, good)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert done.stderr.rstrip().splitlines()[-1] == \
        f"error: {good}: token and loss-mask datasets do not match", out


@pytest.fixture(scope="module")
def saved(target, data, tmp_path_factory):
    """A checkpoint of two steps with --block-size 8 and --num-anchors 4 (the `flags` defaults)."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    run_in_process(flags(target, data[0], train_iters=2, save=str(root)))
    return root


def test_truncated_checkpoint_file_is_named(target, data, saved, tmp_path, capsys):
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    path = checkpoint.iteration_dir(str(root), 2)
    shard = max((f for f in os.listdir(path) if f.endswith(".distcp")),
                key=lambda f: os.path.getsize(os.path.join(path, f)))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    expected = f"checkpoint {path}: {shard} is truncated or unreadable ("
    assert expected in _parse_error(flags(target, data[0], load=str(root)), capsys)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(expected)):  # the load side
        checkpoint.load_weights(str(root), model=None)


def test_load_with_other_settings(target, data, saved, capsys):
    """A setting that changes the model (--block-size) is a flag error, for a resume and for
    --finetune; one that may change (--num-anchors) is printed and the run resumes."""
    for extra in ({}, {"finetune": True}):
        line = _parse_error(flags(target, data[0], load=str(saved), block_size=4, **extra), capsys)
        assert "--block-size: 8 in the checkpoint, 4 now" in line, line
    result = run_in_process(flags(target, data[0], train_iters=4, load=str(saved), num_anchors=2))
    assert f"--load {saved}: --num-anchors: 4 in the checkpoint, 2 now" in capsys.readouterr().out
    assert len(result["losses"]) == 2  # iterations 3 and 4
    # The data position counts one stream: a resume keeps packing as it was (--finetune may not).
    line = _parse_error(flags(target, data[0], load=str(saved), pack_sequences=True), capsys)
    assert "--pack-sequences: checkpoint" in line and "trained without packed rows" in line, line
    assert parse_plan(flags(target, data[0], load=str(saved), pack_sequences=True,
                            finetune=True)).run.data.pack_sequences


def test_transformer_engine_impl_needs_transformer_engine(capsys):
    argv = ["--transformer-impl", "transformer_engine"]
    if importlib.util.find_spec("transformer_engine") is None:  # the CPU CI
        with pytest.raises(SystemExit):
            parse_plan(argv)
        assert "needs Transformer Engine: pip install" in capsys.readouterr().err
    else:
        assert parse_plan(argv).run.precision.transformer_impl == "transformer_engine"


def test_data_without_a_supervised_block_is_refused_before_training(target, tmp_path, capsys):
    """One-token answers at --block-size 8: no anchor has a supervised slot, so every step would
    be a no-op; the run stops before building a model, with one line saying so."""
    short = pattern_dataset(tmp_path / "short", 6, 48, response_length=1)
    with pytest.raises(ValueError, match="none of the 6 training conversations holds a block of "
                                         "--block-size 8 tokens"):
        run_in_process(flags(target, short))
    assert "iteration" not in capsys.readouterr().out


def test_tracker_ignores_partial_save(tmp_path):
    """A save killed before its rename leaves `iter_X.partial`; the tracker still names the last
    finished checkpoint."""
    os.makedirs(tmp_path / "iter_0000002")
    (tmp_path / checkpoint.TRACKER).write_text("2")
    os.makedirs(tmp_path / "iter_0000004.partial")
    assert checkpoint.latest_iteration(str(tmp_path)) == 2
    (tmp_path / checkpoint.TRACKER).write_text("4")
    with pytest.raises(ValueError, match="missing checkpoint"):
        checkpoint.latest_iteration(str(tmp_path))
