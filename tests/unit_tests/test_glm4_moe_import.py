"""HF GLM-4.5 (`Glm4MoeForCausalLM`) -> megatron GPTModel (one process): logits and taps equal
transformers' on two configs that differ as GLM-4.5 and GLM-4.5-Air-like checkpoints do (q/k norm
or not, head_dim, groups, shared experts, dense-first layers, tying, RoPE scaling); the MTP layer
is skipped and never read; configs megatron cannot reproduce fail naming the field.
Expert-parallel layouts: tests/distributed/test_moe_ep.py."""
import pytest
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dflash.targets import hf_import
from megatron_dflash.targets.hf_import import load_hf_config, target_transformer_config
from tests.dflash_testing import record_checkpoint_reads
from tests.families_testing import (assert_config_refused, assert_matches_hf, glm4_moe_config,
                                    import_target, perturbed_model, save_with_mtp_layer)


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """(checkpoint dir with an MTP layer, HF model) of the default tiny GLM-4.5."""
    model = perturbed_model(glm4_moe_config())
    return save_with_mtp_layer(model, tmp_path_factory.mktemp("glm")), model


def test_import_matches_hf_and_skips_mtp(glm, utils, monkeypatch, capsys):
    utils.initialize_model_parallel(1, 1)
    path, hf_model = glm
    opened = record_checkpoint_reads(monkeypatch)
    model = import_target(path)
    assert "skipping 1 multi-token-prediction layer(s) (num_nextn_predict_layers=1, " \
           "model.layers.3)" in capsys.readouterr().out
    assert opened[-1].elements_read == sum(
        t.numel() for t in hf_import.loaded_tensors(model).values())
    layers = model.decoder.layers
    assert isinstance(layers[0].mlp, MLP) and all(isinstance(l.mlp, MoELayer) for l in layers[1:])
    config = model.config
    assert (config.add_qkv_bias, config.add_bias_linear, config.qk_layernorm) == (True, False,
                                                                                  True)
    assert model.rotary_pos_emb.inv_freq.numel() == 8  # half of head_dim 32 rotates
    assert config.moe_router_score_function == "sigmoid" and config.moe_router_enable_expert_bias
    assert (config.moe_router_topk_scaling_factor, config.moe_shared_expert_intermediate_size,
            config.moe_router_num_groups) == (2.5, 32, None)
    assert_matches_hf(model, hf_model, taps=[0, 1, 2])


def test_air_like_variant_matches_hf(utils, tmp_path):
    """No q/k norm, head_dim = hidden / heads, top-4 within the best 2 of 4 groups, every layer
    MoE with 2 shared experts, tied embeddings, linear RoPE scaling on the half rotary; from
    transformers 5's in-memory state dict (experts fused)."""
    utils.initialize_model_parallel(1, 1)
    hf_model = perturbed_model(glm4_moe_config(
        use_qk_norm=False, head_dim=16, n_group=4, topk_group=2, first_k_dense_replace=0,
        n_shared_experts=2, tie_word_embeddings=True, num_nextn_predict_layers=0,
        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0,
                             partial_rotary_factor=0.5)), seed=3)
    state = hf_model.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    model = import_target(state, hf_model.config)
    assert model.config.moe_router_num_groups == 4 and not model.config.qk_layernorm
    assert_matches_hf(model, hf_model, taps=[1, 2])


@pytest.mark.parametrize("changes,field", [
    (dict(norm_topk_prob=False), "norm_topk_prob=False with num_experts_per_tok=4"),
    (dict(n_group=4, topk_group=2, num_experts_per_tok=3), "num_experts_per_tok=3 with topk_group"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                               original_max_position_embeddings=32, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5 with rope_type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_config_fails_naming_the_field(glm, tmp_path, changes, field):
    assert_config_refused(glm[0], changes, tmp_path, field)


def test_draft_defaults_to_the_dense_ffn(glm):
    config = target_transformer_config(load_hf_config(glm[0]))
    assert (config.ffn_hidden_size, config.moe_ffn_hidden_size) == (96, 32)
