"""Reference HF format <-> megatron draft checkpoints (TP=1): bit-exact round trips, the export
loads in the z-lab reference and gives our draft's block logits, one clear error per bad input."""
import json
import os
import stat

import pytest
import torch
from transformers import AutoTokenizer
from dflash.model import DFlashDraftModel as ReferenceDraft
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from safetensors.torch import save_file

from tests.dflash_testing import (build_draft, draft_inputs, head_only_target, head_state, params,
                            randomize_, target_config)
from tests.dflash_testing import dflash_config as resolved_config
from tests.regenerate_testing import chat_tokenizer_dir
from tests.interop_testing import (HIDDEN, TARGET_FIELDS, draft_config, draft_extra,
                             reference_block_logits, reference_model, reference_tensors,
                             same_bytes, target_dir, tool, write_reference_dir)
from megatron_dflash import state_dict_adapter
from megatron_dflash.draft_export import export_checkpoint
from megatron_dflash.draft_import import import_reference
from megatron_dflash.draft_reader import read_checkpoint


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".partial" in n]


@pytest.fixture
def reference_dir(tmp_path):
    cfg = draft_config()
    return write_reference_dir(tmp_path / "ref", cfg, reference_model(cfg, seed=1).state_dict())


def test_round_trip_reference_megatron_reference(utils, tmp_path, reference_dir):
    utils.initialize_model_parallel(1)
    import_reference(reference_dir, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000000",
                                                     "latest_checkpointed_iteration.txt"]
    out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    before, after = reference_tensors(reference_dir), reference_tensors(out)
    assert sorted(before) == sorted(after) and len(after) == 3 + 11 * 2
    assert all(same_bytes(before[k], after[k]) for k in before)
    assert _config(out) == _config(reference_dir)
    assert "auto_map" not in _config(out) and "eagle_aux_hidden_state_layer_ids" not in _config(out)


def test_round_trip_keeps_reference_written_config_and_bf16(utils, tmp_path):
    """A directory written by the reference's own save_pretrained, in bf16: every original key
    survives; only the transformers-4 RoPE keys and the explicit `is_causal` are added; tensors
    are bit-identical."""
    utils.initialize_model_parallel(1)
    ref = reference_model(draft_config(), seed=2).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    import_tool, export_tool = tool("import_hf"), tool("export_hf")
    assert import_tool.main(["--draft", str(tmp_path / "ref"),
                             "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert export_tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--output",
                             str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    before, after = reference_tensors(tmp_path / "ref"), reference_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    assert all(same_bytes(before[k], after[k]) for k in before)
    original, exported = _config(tmp_path / "ref"), _config(tmp_path / "out")
    assert {k: exported[k] for k in original} == original
    assert exported.keys() - original.keys() == {"rope_theta", "rope_scaling", "is_causal"}
    assert exported["is_causal"] is False


def test_export_matches_our_draft_in_reference_code(utils, tmp_path):
    """A training-layout checkpoint (with RNG and scheduler entries beside the draft, which the
    exporter skips) exports to a directory the reference loads cleanly, giving our draft's packed
    block logits."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = resolved_config(tcfg, block_size=8, num_anchors=5)
    target = head_only_target()
    draft = build_draft(tcfg, cfg, target)
    randomize_(draft, seed=11)
    root = tmp_path / "ckpt"
    (root / "iter_0000005").mkdir(parents=True)
    dist_checkpointing.save({"model": draft.sharded_state_dict(prefix="draft."),
                             "rng": ShardedObject("rng_state", {"seed": 1}, (1,), (0,)),
                             "scheduler": {"lr": 1e-3}, "extra": draft_extra(cfg)},
                            str(root / "iter_0000005"))
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    out = export_checkpoint(str(root), str(tmp_path / "out"))
    ref, info = ReferenceDraft.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ref.block_size == 8 and ref.mask_token_id == cfg.mask_token_id
    assert ref.target_layer_ids == cfg.target_layer_ids
    inputs = draft_inputs(cfg, batch=2, seq_len=48, seed=12)
    assert inputs["keep"].all() and inputs["anchors"].shape[1] == 5
    with torch.no_grad():
        ours = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                     inputs["position_ids"]).transpose(0, 1)
    head = head_state(target)
    theirs = reference_block_logits(ref.eval(), head["embedding"], head["output"], inputs)
    assert (ours - theirs).abs().max() < 1e-5
    assert _config(out)["num_target_layers"] == TARGET_FIELDS["num_target_layers"]


def test_export_dtype_and_tokenizer(utils, tmp_path, reference_dir):
    utils.initialize_model_parallel(1)
    import_reference(reference_dir, str(tmp_path / "ckpt"))
    tok = chat_tokenizer_dir(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").write_text("not a tokenizer file")
    out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), dtype="fp16",
                            tokenizer_dir=tok)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    saved = AutoTokenizer.from_pretrained(out)  # the tokenizer as save_pretrained writes it
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(tok).get_vocab()
    assert saved.chat_template == AutoTokenizer.from_pretrained(tok).chat_template
    fp32, fp16 = reference_tensors(reference_dir), reference_tensors(out)
    assert all(fp16[k].dtype == torch.float16 and torch.equal(fp16[k], fp32[k].half())
               for k in fp32)
    assert _config(out)["dtype"] == "float16"


def test_export_is_readable_by_others(utils, tmp_path, reference_dir):
    """The exported directory is 0755 and its files 0644, whatever the umask, the temporary file
    safetensors writes through (0600) or the tokenizer files' own modes."""
    utils.initialize_model_parallel(1)
    import_reference(reference_dir, str(tmp_path / "ckpt"))
    tok = chat_tokenizer_dir(tmp_path / "tok")
    os.chmod(tmp_path / "tok" / "tokenizer.json", 0o600)
    umask = os.umask(0o077)
    try:
        out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"),
                                tokenizer_dir=tok)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    modes = {f: stat.S_IMODE(os.stat(os.path.join(out, f)).st_mode) for f in os.listdir(out)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
    assert not _leftovers(tmp_path)


def test_import_at_tp1_loads_into_training_draft(utils, tmp_path, reference_dir):
    """The imported checkpoint loads into a draft built the training way (same sharded keys)."""
    utils.initialize_model_parallel(1)
    import_reference(reference_dir, str(tmp_path / "ckpt"))
    tcfg = target_config()
    cfg = resolved_config(tcfg, block_size=8)
    draft = build_draft(tcfg, cfg, head_only_target())
    loaded = dist_checkpointing.load({"model": draft.sharded_state_dict(prefix="draft.")},
                                     str(tmp_path / "ckpt" / "iter_0000000"))
    draft.load_state_dict({k[len("draft."):]: v for k, v in loaded["model"].items()},
                          strict=False)
    hf = state_dict_adapter.hf_to_megatron(reference_tensors(reference_dir), cfg)
    assert all(torch.equal(params(draft)[k], hf[k]) for k in hf)


# --------------------------------------------------------------------------------------------
# Errors: one clear message, nothing written
# --------------------------------------------------------------------------------------------

def _break_export(kind, root):
    it = root / "iter_0000000"
    if kind == "no_tracker":
        (root / "latest_checkpointed_iteration.txt").unlink()
    elif kind == "bad_tracker":
        (root / "latest_checkpointed_iteration.txt").write_text("seven")
    elif kind == "no_iteration":
        (root / "latest_checkpointed_iteration.txt").write_text("3")
    elif kind == "no_metadata":
        (it / ".metadata").unlink()
    elif kind == "truncated":
        for f in it.glob("*.distcp"):
            f.write_bytes(f.read_bytes()[:100])


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such checkpoint directory"),
    ("no_tracker", "no finished checkpoint"),
    ("bad_tracker", "corrupt"),
    ("no_iteration", "corrupt or points at a missing checkpoint"),
    ("no_metadata", "not a readable megatron draft checkpoint"),
    ("truncated", "not a readable megatron draft checkpoint"),
])
def test_export_errors(utils, tmp_path, reference_dir, capsys, kind, message):
    utils.initialize_model_parallel(1)
    root = tmp_path / "ckpt"
    if kind != "missing":
        import_reference(reference_dir, str(root))
        _break_export(kind, root)
    out = tmp_path / "out"
    assert tool("export_hf").main(["--checkpoint", str(root), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("export_hf: error:") and message in err and "\n" not in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_export_refuses_existing_output_and_missing_tokenizer(utils, tmp_path, reference_dir):
    utils.initialize_model_parallel(1)
    import_reference(reference_dir, str(tmp_path / "ckpt"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    (tmp_path / "tok").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out2"),
                          tokenizer_dir=str(tmp_path / "tok"))
    assert not (tmp_path / "out2").exists() and not _leftovers(tmp_path)


def _edit_config(path, **changes):
    config = _config(path)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _edit_tensors(path, edit):
    tensors = reference_tensors(path)
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))


IMPORT_ERRORS = {
    "no_config": (lambda p: os.remove(os.path.join(p, "config.json")), "config.json: not found"),
    "no_weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")),
                   "model.safetensors: not found"),
    "bad_json": (lambda p: open(os.path.join(p, "config.json"), "w").write("{oops"),
                 "not valid JSON"),
    "bad_safetensors": (lambda p: open(os.path.join(p, "model.safetensors"), "wb").write(
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!"), "not a readable safetensors file"),
    "missing_tensor": (lambda p: _edit_tensors(p, lambda t: t.pop("layers.1.mlp.up_proj.weight")),
                       "tensor 'layers.1.mlp.up_proj.weight' is missing"),
    "wrong_shape": (lambda p: _edit_tensors(p, lambda t: t.update(
        {"fc.weight": torch.zeros(HIDDEN, 3 * HIDDEN)})), "'fc.weight' has shape [64, 192]"),
    "extra_tensor": (lambda p: _edit_tensors(p, lambda t: t.update(
        {"embed_tokens.weight": torch.zeros(256, HIDDEN)})), "'embed_tokens.weight' is not part"),
    "sliding_window": (lambda p: _edit_config(p, layer_types=["sliding_attention"] * 2),
                       "layer_types has sliding_attention layers but use_sliding_window=False"),
    "dflash2_without_its_sizes": (lambda p: _edit_config(p, architectures=["DFlash2DraftModel"]),
                                  "a DFlash2 draft needs dflash_config.conv_kernel_size"),
    "not_a_draft": (lambda p: _edit_config(p, architectures=["Qwen3ForCausalLM"]),
                    "architectures=['Qwen3ForCausalLM']"),
    "no_mask_id": (lambda p: _edit_config(p, dflash_config={"target_layer_ids": [1, 4]}),
                   "mask_token_id is required"),
    "mask_outside_vocab": (lambda p: _edit_config(p, dflash_config={
        "mask_token_id": 256, "target_layer_ids": [1, 4]}), "mask_token_id=256 must be an integer"),
    "layer_id_outside_target": (lambda p: _edit_config(p, dflash_config={
        "mask_token_id": 3, "target_layer_ids": [1, 6]}), "outside the target's layers [0, 5]"),
}


@pytest.mark.parametrize("kind", sorted(IMPORT_ERRORS))
def test_import_errors(utils, tmp_path, reference_dir, capsys, kind):
    utils.initialize_model_parallel(1)
    breaker, message = IMPORT_ERRORS[kind]
    breaker(reference_dir)
    root = tmp_path / "ckpt"
    assert tool("import_hf").main(["--draft", reference_dir, "--checkpoint", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("import_hf: error:") and message in err and "\n" not in err, err
    assert not root.exists()


@pytest.mark.parametrize("target_kw,dflash,message", [
    (dict(hidden_size=32, head_dim=8), None,
     "hidden_size=64 must equal the target's hidden size 32"),
    (dict(vocab_size=200), {"mask_token_id": 220, "target_layer_ids": [1, 4]},
     "mask_token_id=220 must be an integer [0, 199]"),
    (dict(num_hidden_layers=4), None, "was trained on a 6-layer target; the target at"),
], ids=["hidden_size", "mask_id_vs_vocab", "layer_count"])
def test_import_checks_the_target(utils, tmp_path, reference_dir, target_kw, dflash, message):
    utils.initialize_model_parallel(1)
    good = dict(_config(reference_dir)["dflash_config"])
    if dflash:
        _edit_config(reference_dir, dflash_config=dflash)
    bad = target_dir(tmp_path / "target", **target_kw)
    with pytest.raises(ValueError) as e:
        import_reference(reference_dir, str(tmp_path / "ckpt"), target_dir=bad)
    assert message in str(e.value)
    assert not (tmp_path / "ckpt").exists()
    # The matching target is accepted and recorded the way training records it.
    _edit_config(reference_dir, dflash_config=good)
    target = target_dir(tmp_path / "good")
    import_reference(reference_dir, str(tmp_path / "ckpt"), target_dir=target)
    extra = read_checkpoint(str(tmp_path / "ckpt"))[0]
    assert extra["target"]["path"] == os.path.abspath(target)
    assert extra["target"]["hf_config"]["num_hidden_layers"] == 6


def test_import_refuses_non_empty_checkpoint_root(utils, tmp_path, reference_dir):
    utils.initialize_model_parallel(1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "other").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        import_reference(reference_dir, str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path / "ckpt") == ["other"]
