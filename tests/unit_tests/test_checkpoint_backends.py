"""Checkpoints across backends: the local draft writes the keys a Transformer Engine draft reads.

The TE draft's keys are derived here without TE, from the TE spec (its module classes, read with
`HAVE_TE` forced as in test_te_spec.py) and what each TE class holds in megatron's sharded state
dict. The local draft's are its real `sharded_state_dict`, with the local layer spec's
`sharded_state_dict_keys_map` applied. A local checkpoint saved by training resumes exactly.
"""
import dataclasses

import megatron.core.extensions.transformer_engine as te_ext
import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                         TEDotProductAttention,
                                                         TELayerNormColumnParallelLinear, TELinear,
                                                         TENorm, TERowParallelLinear)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from tests.layout_testing import Utils
from tests.dflash_testing import dflash_config, params, pattern_dataset, randomize_, target_config
from tests.dflash_testing import tiny_target_dir
from megatron_dflash import checkpoint
from megatron_dflash.attention import DFlashSelfAttention, DFlashTransformerLayer
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.sparse_attention import DFlashSparseAttention
from megatron_dflash.specs import build_draft, get_dflash_model_spec
from tests.training_testing import train

# What each module of the TE draft puts in megatron's sharded state dict (no biases: the draft has
# none). TE modules carry an `_extra_state` (FP8 metadata): the linears from
# TransformerEngineBaseModule, TE's RMSNorm (TENorm) as a fusible op (transformer_engine/pytorch/
# ops/op.py, TE >= 2). TELayerNormColumnParallelLinear holds its fused norm as
# `layer_norm_weight` (RMSNorm: no `layer_norm_bias`). TEDotProductAttention's sharded state
# dict is empty unless its softmax offset is learnable.
TE_STATE = {
    TENorm: ("weight", "_extra_state"),
    TELinear: ("weight", "_extra_state"),
    TEColumnParallelLinear: ("weight", "_extra_state"),
    TERowParallelLinear: ("weight", "_extra_state"),
    TELayerNormColumnParallelLinear: ("weight", "layer_norm_weight", "_extra_state"),
    TEDotProductAttention: (),
    DFlashSparseAttention: (),
    IdentityOp: (),
}


def _state(prefix: str, module) -> set[str]:
    module = module.module if isinstance(module, ModuleSpec) else module
    return {prefix + name for name in TE_STATE[module]}  # KeyError: a module not accounted for


def _te_layer_keys(spec: ModuleSpec) -> frozenset[str]:
    assert spec.module is DFlashTransformerLayer
    layer = spec.submodules
    assert layer.sharded_state_dict_keys_map == {}  # the TE names are the checkpoint's
    attn = layer.self_attention
    assert attn.module is DFlashSelfAttention
    mlp = layer.mlp.keywords["submodules"]
    keys = _state("input_layernorm.", layer.input_layernorm)
    keys |= _state("pre_mlp_layernorm.", layer.pre_mlp_layernorm)
    for name in ("linear_qkv", "core_attention", "linear_proj", "q_layernorm", "k_layernorm"):
        keys |= _state(f"self_attention.{name}.", getattr(attn.submodules, name))
    for name in ("linear_fc1", "linear_fc2"):
        keys |= _state(f"mlp.{name}.", getattr(mlp, name))
    # Nothing else in the layer has state (cross-attention slots are IdentityOp, bda functions).
    handled = {"input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"}
    for field in dataclasses.fields(layer):
        value = getattr(layer, field.name)
        if field.name not in handled and isinstance(value, (type, ModuleSpec)):
            value = value.module if isinstance(value, ModuleSpec) else value
            assert issubclass(value, IdentityOp), (field.name, value)
    return frozenset(keys)


def te_checkpoint_keys(model_spec: ModuleSpec) -> set[str]:
    """The sharded-state-dict keys of a draft built from the TE `model_spec` (layers stacked
    under `decoder.layers.`, as megatron's TransformerBlock stores them)."""
    sub = model_spec.submodules
    assert sub.fc.module is TELinear and sub.fc.params["parallel_mode"] == "duplicated"
    keys = _state("fc.", sub.fc) | _state("hidden_norm.", sub.hidden_norm)
    keys |= _state("decoder.final_layernorm.", sub.decoder.layer_norm)
    layers = {_te_layer_keys(spec) for spec in sub.decoder.layer_specs}
    assert len(layers) == 1
    return keys | {f"decoder.layers.{k}" for k in layers.pop()}


def local_draft(cfg, tcfg, attention="dense"):
    return build_draft(cfg, draft_transformer_config(cfg, tcfg), "local", attention)


def sharded_keys(module) -> set[str]:
    return {v.key for v in nested_values(module.sharded_state_dict())}


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_local_checkpoint_keys_are_the_te_keys(utils, monkeypatch, attention):
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg)
    local = sharded_keys(local_draft(cfg, tcfg, attention))
    monkeypatch.setattr(te_ext, "HAVE_TE", True)
    expected = te_checkpoint_keys(get_dflash_model_spec(cfg.num_draft_layers, "te", attention))
    assert local == expected, (sorted(local - expected), sorted(expected - local))
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in local
    assert not [k for k in local if "pre_mlp_layernorm" in k]


def test_checkpoint_round_trip_and_plain_state_dict(utils, tmp_path):
    """Saved under the TE names, a local draft loads back into a local draft, every parameter
    bit-exact; its plain state dict keeps the module names (what the HF export maps)."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg)
    src, dst = local_draft(cfg, tcfg), local_draft(cfg, tcfg)
    randomize_(src, seed=1)
    dist_checkpointing.save({"model": src.sharded_state_dict()}, str(tmp_path))
    loaded = dist_checkpointing.load({"model": dst.sharded_state_dict()}, str(tmp_path))
    checkpoint.load_trainable(dst, loaded["model"])
    assert all(torch.equal(params(dst)[k], v) for k, v in params(src).items())
    names = set(src.state_dict())
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in names
    assert not [k for k in names if "layer_norm_weight" in k]


def _flags(target, train, **kw):
    base = dict(target=target, mask_token_id=255, train_data=train, seq_length=48, block_size=8,
                num_draft_layers=1, num_anchors=4, micro_batch_size=2, global_batch_size=4,
                lr=3e-3, log_interval=50, seed=7, lr_decay_style="constant",
                lr_warmup_fraction=0, transformer_impl="local")
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _run(argv):
    Utils.destroy_model_parallel()
    try:
        return train(argv)
    finally:
        Utils.destroy_model_parallel()


def test_local_checkpoint_resumes_exactly(tmp_path):
    """`--transformer-impl local`: save after k steps, `--load` and train n more; the resumed
    steps' losses equal an uninterrupted run's, and the checkpoint holds the TE norm name."""
    k, n = 3, 2
    target = tiny_target_dir(tmp_path / "target")
    train = pattern_dataset(tmp_path / "train", 64, 48, seed=1)
    save = tmp_path / "ckpt"
    straight = _run(_flags(target, train, train_iters=k + n))
    first = _run(_flags(target, train, train_iters=k, save=save, save_interval=k))
    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint.iteration_dir(save, k)))
    assert "draft.decoder.layers.mlp.linear_fc1.layer_norm_weight" in stored
    assert not [key for key in stored if "pre_mlp_layernorm" in key]
    resumed = _run(_flags(target, train, train_iters=k + n, load=save))
    assert first["losses"] == straight["losses"][:k]
    assert resumed["losses"] == straight["losses"][k:]  # bit-exact on CPU fp32
