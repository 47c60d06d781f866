"""FP8 flags (run/flags.py, run/checks.py) -> TransformerConfig fields (fp8.py) and block padding
(anchors.py); Transformer Engine stays optional."""
import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.dflash_testing import (build_draft, dflash_config, head_only_target, pattern_dataset,
                            randomize_, target_config, tiny_target_dir, weighted_loss)
from megatron_dflash.anchors import pad_blocks
from megatron_dflash.data.dataset import build_dataset
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.fp8 import FP8Settings, fp8_unavailable_reason, sequence_multiple
from megatron_dflash.run.checks import fp8_settings
from megatron_dflash.run.flags import add_precision_flags, run_config
from megatron_dflash.training.microbatches import MicroBatches
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.step import prepare_microbatch

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def parse(*argv, impl="transformer_engine"):
    p = argparse.ArgumentParser()
    add_precision_flags(p)
    return run_config(p.parse_args(["--transformer-impl", impl, *argv]))


def test_settings_map_onto_transformer_config():
    tcfg = target_config()
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        cfg = FP8Settings("hybrid", recipe).apply(tcfg)
        assert (cfg.fp8, cfg.fp8_recipe) == ("hybrid", recipe)
        assert FP8Settings("e4m3", recipe).align == (32 if recipe == "mxfp8" else 16)
    assert FP8Settings().fields() == {"fp8": None} and FP8Settings().align == 1
    with pytest.raises(ValueError, match="format"):
        FP8Settings("e5m2")
    with pytest.raises(ValueError, match="recipe"):
        FP8Settings("e4m3", "nvfp4")


def test_draft_does_not_inherit_the_targets_fp8():
    """The draft config is a copy of the target's: its FP8 fields must be passed explicitly."""
    tcfg = FP8Settings("e4m3", "tensorwise").apply(target_config())
    cfg = dflash_config(tcfg)
    assert draft_transformer_config(cfg, tcfg, **FP8Settings().fields()).fp8 is None
    draft = draft_transformer_config(cfg, tcfg, **FP8Settings("hybrid", "blockwise").fields())
    assert (draft.fp8, draft.fp8_recipe) == ("hybrid", "blockwise")


def test_flags_are_validated():
    assert fp8_settings(parse()) == (FP8Settings(), FP8Settings())
    with pytest.raises(ValueError, match="--fp8-recipe=tensorwise needs --fp8-format"):
        fp8_settings(parse("--fp8-recipe", "tensorwise"))
    with pytest.raises(ValueError, match="--target-fp8-recipe=delayed needs --target-fp8-format"):
        fp8_settings(parse("--target-fp8-recipe", "delayed"))
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine"):
        fp8_settings(parse("--fp8-format", "hybrid", impl="local"))
    args = parse("--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--target-fp8-format",
                 "e4m3")
    if not HAVE_TE:
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            fp8_settings(args)
        assert fp8_unavailable_reason(FP8Settings("hybrid")) is not None
    else:
        assert fp8_settings(args) == (FP8Settings("hybrid", "blockwise"), FP8Settings("e4m3"))
    with pytest.raises(SystemExit):
        parse("--fp8-recipe", "fancy")


def test_alignment_padding():
    fp8, mx = FP8Settings("hybrid"), FP8Settings("hybrid", "mxfp8")
    assert sequence_multiple(8, False) == 1 and sequence_multiple(8, True) == 8
    assert sequence_multiple(2, True, fp8, FP8Settings()) == 32
    assert sequence_multiple(1, False, fp8, mx) == 32
    anchors = torch.tensor([[3, 9, 20], [5, 0, 0]])
    keep = torch.tensor([[True, True, True], [True, False, False]])
    assert pad_blocks(anchors, keep, 16, 16)[0] is anchors
    padded, pkeep = pad_blocks(anchors, keep, 10, 16)  # 10*N % 16 == 0 needs N % 8 == 0
    assert padded.shape == pkeep.shape == (2, 8)
    assert torch.equal(padded[:, :3], anchors)
    assert not pkeep[:, 3:].any() and not padded[:, 3:].any()


def test_nothing_needs_transformer_engine_unless_asked():
    """In a fresh interpreter where Transformer Engine cannot be imported (hidden, as on a CPU
    machine): the package, the local and sparse specs and the FP8 mapping work, and only the
    TE backend fails, with a message saying what to install."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        class HideTE(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformer_engine", "transformer_engine_torch"):
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, HideTE())
        from megatron_dflash.fp8 import FP8Settings, fp8_unavailable_reason
        from megatron_dflash.specs import get_dflash_layer_spec, get_dflash_model_spec
        import megatron_dflash.model, megatron_dflash.sparse_attention
        get_dflash_layer_spec("local")
        get_dflash_model_spec(2, "local", "sparse")
        assert FP8Settings("hybrid").fields() == {"fp8": "hybrid", "fp8_recipe": "delayed"}
        assert fp8_unavailable_reason(FP8Settings("hybrid"))
        assert not [m for m in sys.modules if m.startswith("transformer_engine")]
        try:
            get_dflash_layer_spec("te")
        except ImportError as e:
            assert "Transformer Engine" in str(e), e
            print("OK")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.stdout.strip().endswith("OK"), run.stderr[-3000:]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_padded_blocks_change_neither_loss_nor_gradients(utils, attention):
    """The training step pads the blocks to the FP8 GEMM multiple (`block_multiple`); the added
    blocks are unkept: same weighted loss and draft gradients as without them (fp32)."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=8, num_anchors=5)
    draft = build_draft(tcfg, cfg, head_only_target(), attention=attention)
    randomize_(draft, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 64), generator=g)
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    loss_mask[:, :16] = False
    features = torch.randn(64, 2, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g)
    results = []
    for multiple in (1, 48):  # 48 tokens = 6 blocks of 8: 5 anchors become 6 blocks
        mb = prepare_microbatch(tokens, loss_mask, cfg, torch.Generator().manual_seed(5),
                                attention, block_multiple=multiple)
        assert mb["block_input_ids"].shape[1] == (40 if multiple == 1 else 48)
        draft.zero_grad()
        loss = weighted_loss(draft(mb["block_input_ids"], features, mb["attention_mask"],
                                   mb["block_position_ids"]), mb)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in draft.named_parameters()}))
    (loss, grads), (padded_loss, padded_grads) = results
    assert (padded_loss - loss).abs() <= 1e-6 * loss.abs()
    for n, grad in grads.items():
        assert (padded_grads[n] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), n


def test_training_microbatches_are_padded_for_fp8(utils, tmp_path):
    """What the training loop feeds the models under FP8: sequences padded to the larger of the
    draft's and the target's alignment (mxfp8: 32), block tokens to the draft's (16); padding is
    never supervised. (FP8 itself needs TE and a GPU; the settings are set directly here.)"""
    utils.initialize_model_parallel(1)
    data = pattern_dataset(tmp_path / "train", 8, 40)
    plan = parse_plan(["--target", tiny_target_dir(tmp_path / "target"), "--mask-token-id", "255",
                       "--train-data", data, "--seq-length", "40", "--block-size", "8",
                       "--num-anchors", "3", "--micro-batch-size", "2", "--global-batch-size", "2",
                       "--attention", "sparse"])
    train, _ = build_dataset(plan.data.train, None, 40)
    expected = {(FP8Settings(), FP8Settings()): (40, 24),
                (FP8Settings("hybrid"), FP8Settings()): (48, 32),
                (FP8Settings(), FP8Settings("e4m3", "mxfp8")): (64, 24),
                (FP8Settings("hybrid"), FP8Settings("e4m3", "mxfp8")): (64, 32)}
    for (draft, target), (seq_len, block_tokens) in expected.items():
        fp8 = dataclasses.replace(plan, draft_fp8=draft,
                                  target=dataclasses.replace(plan.target, fp8=target))
        mb = MicroBatches(train, fp8, pad_id=0, consumed_samples=0).next()
        assert mb["tokens"].shape == (2, seq_len)
        assert mb["block_input_ids"].shape == (2, block_tokens)
        assert mb["attention_mask"].anchors.shape == (2, block_tokens // 8)
        assert mb["weights"][:, 24:].eq(0).all() and not mb["attention_mask"].keep[:, 3:].any()
