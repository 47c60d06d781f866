"""RoPE scaling (YaRN, linear, Llama 3.1) through megatron's rotary modules: dense targets equal
transformers with each scaling; the draft takes the target's scaling, equals the z-lab reference
draft (`Qwen3RotaryEmbedding` of the config it is exported with) and declares it in its exported
config.json; scalings megatron lacks are refused naming the field."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from megatron_dflash import rope, state_dict_adapter
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.reference_format import config_from_reference, reference_config
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_family, target_transformer_config)
from tests.dflash_testing import (build_draft, draft_inputs, head_only_target, head_state,
                                  load_params, target_config)
from tests.families_testing import assert_config_refused
from tests.interop_testing import TARGET_FIELDS, reference_block_logits, reference_model

VOCAB, HIDDEN, LAYERS, SEQ, BATCH, TOL = 128, 64, 2, 40, 2, 1e-5
# Positions run past the original context, so the scaled frequencies matter.
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
SCALINGS = {
    "yarn": dict(YARN),
    "yarn_untruncated_mscale": dict(YARN, truncate=False, beta_fast=16.0, beta_slow=2.0,
                                    mscale=1.0, mscale_all_dim=0.5),
    "yarn_implicit_factor": dict(YARN, factor=None),  # max_position_embeddings / original
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=3.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192),
}


def hf_target(kind, scaling, tmp_path):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1,
                  rope_parameters=dict(scaling))
    config = (LlamaConfig(architectures=["LlamaForCausalLM"], **common) if kind == "llama" else
              Qwen3Config(architectures=["Qwen3ForCausalLM"], head_dim=32, **common))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind,scaling", [("qwen3", "yarn"), ("llama", "yarn_untruncated_mscale"),
                                          ("qwen3", "yarn_implicit_factor"), ("llama", "linear")])
def test_scaled_target_matches_hf(kind, scaling, utils, tmp_path):
    """Logits and taps equal transformers' at positions past the original context."""
    utils.initialize_model_parallel(1, 1)
    hf_model = hf_target(kind, SCALINGS[scaling], tmp_path)
    hf = load_hf_config(tmp_path)
    config = target_transformer_config(hf)
    if scaling.startswith("yarn"):
        assert isinstance(config, rope.YarnTransformerConfig)
        assert config.yarn_correction_range_round_to_int == (scaling != "yarn_untruncated_mscale")
    model = build_target(hf, config)
    load_hf_weights(model, tmp_path)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with FeatureCapture(model, [0]) as capture:
        logits, features = target_forward(model, ids, torch.arange(SEQ).expand(BATCH, SEQ),
                                          capture)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, output_hidden_states=True)
    assert (logits - ref.logits).abs().max() <= TOL
    assert (features.transpose(0, 1) - ref.hidden_states[1]).abs().max() <= TOL


@pytest.mark.parametrize("scaling", ["yarn", "yarn_untruncated_mscale", "linear", "llama3"])
def test_draft_with_the_targets_scaling_matches_the_reference(scaling, utils):
    """The draft resolved on a target with this scaling takes it; its logits equal the z-lab
    reference draft built from the config.json it exports (which declares the scaling in both
    transformers 4's and 5's keys) and that config reads back to the same DFlashConfig."""
    utils.initialize_model_parallel(1)
    declared = dict(SCALINGS[scaling])
    theta = declared.pop("rope_theta")
    tcfg = target_config()
    cfg = DFlashConfig(block_size=8, num_draft_layers=2, target_layer_ids=[1, 4], mask_token_id=3,
                       head_dim=24, ffn_hidden_size=96, num_anchors=4).resolve(
        tcfg, vocab_size=256, target_rope_theta=theta,
        target_rope_scaling=rope.scaling_of(dict(SCALINGS[scaling]), 64))
    assert cfg.rope_scaling == declared and cfg.rope_theta == theta
    draft_tcfg = draft_transformer_config(cfg, tcfg)
    assert isinstance(draft_tcfg, rope.YarnTransformerConfig) == scaling.startswith("yarn")

    target = head_only_target()
    ref = reference_model(cfg, seed=1)
    draft = build_draft(tcfg, cfg, target)
    load_params(draft, state_dict_adapter.hf_to_megatron(ref.state_dict(), cfg))
    inputs = draft_inputs(cfg, batch=2, seq_len=48, seed=2)
    ours = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                 inputs["position_ids"]).transpose(0, 1)
    head = head_state(target)
    with torch.no_grad():
        theirs = reference_block_logits(ref, head["embedding"], head["output"], inputs)
    assert (ours - theirs).abs().max() < 1e-5

    exported = json.loads(json.dumps(reference_config(cfg, TARGET_FIELDS, torch.float32)))
    assert exported["rope_scaling"] == declared and exported["rope_theta"] == theta
    assert exported["rope_parameters"] == dict(declared, rope_theta=theta)
    back = config_from_reference(exported, "config.json")
    assert (back.rope_scaling, back.rope_theta) == (declared, theta)
    old_style = {k: v for k, v in exported.items() if k != "rope_parameters"}
    assert config_from_reference(old_style, "config.json").rope_scaling == declared


def test_unscaled_draft_exports_no_scaling():
    cfg = DFlashConfig(mask_token_id=3, num_draft_layers=1).resolve(
        target_config(), vocab_size=256, target_rope_theta=1e6)
    out = reference_config(cfg, TARGET_FIELDS, torch.float32)
    assert out["rope_scaling"] is None
    assert out["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}


@pytest.mark.parametrize("rope_parameters,field", [
    (dict(rope_type="dynamic", rope_theta=1e4, factor=2.0), "rope_parameters.rope_type='dynamic'"),
    (dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0], long_factor=[1.0]),
     "rope_parameters.rope_type='longrope'"),
    (dict(YARN, attention_factor=3.0), "rope_parameters.attention_factor=3.0 (megatron derives"),
    (dict(SCALINGS["llama3"], high_freq_factor=2.0), "rope_parameters.high_freq_factor=2.0"),
    (dict(YARN, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
])
def test_unsupported_scaling_is_refused_naming_the_field(rope_parameters, field, tmp_path):
    Qwen3Config(architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64).save_pretrained(tmp_path)
    message = assert_config_refused(tmp_path, {"rope_parameters": rope_parameters}, tmp_path,
                                    field)
    assert message.startswith(f"{tmp_path / 'config.json'}: ")


def test_scaling_the_draft_cannot_use_is_refused():
    with pytest.raises(ValueError, match=r"rope_scaling=.*rope_parameters.rope_type='dynamic' not"):
        DFlashConfig(mask_token_id=3, num_draft_layers=1,
                     rope_scaling={"rope_type": "dynamic", "factor": 2.0}).resolve(
            target_config(), vocab_size=256, target_rope_theta=1e4)


def test_implicit_yarn_factor_is_made_explicit_for_the_draft():
    """transformers' YaRN without a factor uses max_position_embeddings / original; the scaling
    the draft takes (and exports) states it."""
    hf = Qwen3Config(architectures=["Qwen3ForCausalLM"], rope_parameters=dict(YARN, factor=None),
                     max_position_embeddings=64)
    expected = {k: v for k, v in YARN.items() if k != "rope_theta"}
    assert target_family(hf).rope_scaling(hf) == expected
