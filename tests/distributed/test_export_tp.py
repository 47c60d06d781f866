"""Export from tensor- and pipeline-parallel checkpoints: reference -> megatron checkpoint at TP=2
-> reference is bit-exact (the CLI in a separate single process, as a user runs it after
training); a draft saved at TP=2 exports to the reference code with our TP=1 logits (the export
collective over the TP=2 world: every rank reads, rank 0 writes); and a PP=2 training job's own
--export gives the reference code our logits."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from dflash.model import DFlash2DraftModel
from dflash.model import DFlashDraftModel as ReferenceDraft
from megatron.core import parallel_state

from tests.dflash_testing import (build_draft, draft_inputs, head_only_target, head_state, params,
                            randomize_, target_config)
from tests.dflash_testing import dflash_config as resolved_config
from tests.interop_testing import (REPO, draft_config, reference_block_logits, reference_model,
                             reference_tensors, same_bytes, shared_tmp_dir,
                             write_draft_checkpoint, write_reference_dir)
from megatron_dflash import state_dict_adapter
from tests.dflash2_testing import DFLASH2
from megatron_dflash.draft_export import export_checkpoint
from megatron_dflash.draft_import import import_reference, load_draft_weights
from megatron_dflash.draft_reader import read_checkpoint


@pytest.fixture
def shared():
    with shared_tmp_dir() as path:
        yield path


def _export_in_one_process(root, out):
    """tools/export_hf.py in a fresh single process on rank 0; the other ranks wait."""
    if dist.get_rank() == 0:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               and not k.startswith("TORCHELASTIC")}
        run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"),
                              "--checkpoint", root, "--output", out], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    dist.barrier()


@pytest.mark.world(2)
def test_reference_tp2_checkpoint_reference_is_bit_exact(utils, shared):
    cfg = draft_config()
    ref_dir, root, out = (os.path.join(shared, n) for n in ("ref", "ckpt", "out"))
    if dist.get_rank() == 0:
        write_reference_dir(ref_dir, cfg, reference_model(cfg, seed=21).state_dict())
    dist.barrier()
    utils.initialize_model_parallel(2)
    import_reference(ref_dir, root)
    files = sorted(os.listdir(os.path.join(root, "iter_0000000")))
    assert "__0_0.distcp" in files and "__1_0.distcp" in files  # written by both TP ranks
    # Every rank can read the whole draft back collectively (what evaluation at TP>1 does).
    extra, resolved, full = read_checkpoint(root)
    assert extra["world_size"] == 2
    original = reference_tensors(ref_dir)
    assert all(same_bytes(v, original[k])
               for k, v in state_dict_adapter.megatron_to_hf(full, resolved).items())
    _export_in_one_process(root, out)
    exported = reference_tensors(out)
    assert sorted(exported) == sorted(original)
    assert all(same_bytes(exported[k], original[k]) for k in original)
    with open(os.path.join(ref_dir, "config.json")) as a, open(os.path.join(out, "config.json")) as b:
        assert json.load(a) == json.load(b)


@pytest.mark.world(2)
def test_tp2_checkpoint_exports_our_tp1_logits(utils, shared):
    utils.initialize_model_parallel(1)
    tcfg1 = target_config()
    cfg1 = resolved_config(tcfg1, block_size=8, num_anchors=5)
    target1 = head_only_target()
    draft1 = build_draft(tcfg1, cfg1, target1)
    randomize_(draft1, seed=22)
    inputs = draft_inputs(cfg1, batch=2, seq_len=48, seed=23)
    with torch.no_grad():
        logits1 = draft1(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                         inputs["position_ids"]).transpose(0, 1)
    full, head = params(draft1), head_state(target1)

    utils.initialize_model_parallel(2)
    tcfg2 = target_config(tp=2)
    cfg2 = resolved_config(tcfg2, block_size=8, num_anchors=5)
    draft2 = build_draft(tcfg2, cfg2, head_only_target(tp=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    load_draft_weights(draft2, full)
    assert torch.equal(params(draft2)["decoder.layers.0.self_attention.linear_qkv.weight"],
                       state_dict_adapter.shard(full, cfg2, rank, 2)[
                           "decoder.layers.0.self_attention.linear_qkv.weight"])
    root, out = os.path.join(shared, "ckpt"), os.path.join(shared, "out")
    write_draft_checkpoint(root, draft2, cfg2)
    assert export_checkpoint(root, out) == out  # collective
    dist.barrier()
    ref, info = ReferenceDraft.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs = reference_block_logits(ref.eval(), head["embedding"], head["output"], inputs)
    assert (theirs - logits1).abs().max() < 1e-5


@pytest.mark.world(2)
def test_pp2_training_checkpoint_exports_our_logits(utils, shared):
    """Pipeline-parallel training (PP=2) with --export: the export gives the reference code the
    same block logits as our draft holding the saved checkpoint's weights."""
    from tests.dflash_testing import pattern_dataset, tiny_target_dir
    from tests.training_testing import train

    target, data, root, out = (os.path.join(shared, n) for n in ("target", "data", "ckpt", "out"))
    if dist.get_rank() == 0:
        tiny_target_dir(target)
        pattern_dataset(data, 16, 48, seed=3)
    dist.barrier()
    utils.destroy_model_parallel()
    train(["--target", target, "--mask-token-id", "255", "--train-data", data,
           "--seq-length", "48", "--block-size", "8", "--num-anchors", "4",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
           "--pipeline-model-parallel-size", "2", "--save", root, "--export", out])
    utils.initialize_model_parallel(1)
    extra, cfg, full = read_checkpoint(root)
    assert extra["world_size"] == 2 and extra["iteration"] == 2
    head_target = head_only_target()
    draft = build_draft(target_config(), cfg, head_target)
    load_draft_weights(draft, full)
    inputs = draft_inputs(cfg, batch=2, seq_len=48, seed=24)
    with torch.no_grad():
        ours = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                     inputs["position_ids"]).transpose(0, 1)
    ref, info = ReferenceDraft.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    head = head_state(head_target)
    theirs = reference_block_logits(ref.eval(), head["embedding"], head["output"], inputs)
    assert (theirs - ours).abs().max() < 1e-5


@pytest.mark.world(2)
def test_dflash2_tp2_checkpoint_exports_the_tp1_tensors(utils, shared):
    """A DFlash2 draft saved at TP=2 (codebooks split over the vocabulary) exports exactly the
    TP=1 draft's reference tensors, which the reference loads with strict keys."""
    utils.initialize_model_parallel(1)
    cfg1 = resolved_config(target_config(), block_size=8, **DFLASH2)
    draft1 = build_draft(target_config(), cfg1, head_only_target())
    randomize_(draft1, seed=25)
    full = params(draft1)
    expected = state_dict_adapter.megatron_to_hf(full, cfg1)

    utils.initialize_model_parallel(2)
    tcfg2 = target_config(tp=2)
    cfg2 = resolved_config(tcfg2, block_size=8, **DFLASH2)
    draft2 = build_draft(tcfg2, cfg2, head_only_target(tp=2))
    load_draft_weights(draft2, full)
    assert draft2.candidate_selector.successor_codebook.weight.shape == (128, 8)
    root, out = os.path.join(shared, "ckpt"), os.path.join(shared, "out")
    write_draft_checkpoint(root, draft2, cfg2)
    export_checkpoint(root, out)
    dist.barrier()
    exported = reference_tensors(out)
    assert sorted(exported) == sorted(expected)
    assert all(same_bytes(exported[k], expected[k]) for k in expected)
    _, info = DFlash2DraftModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
