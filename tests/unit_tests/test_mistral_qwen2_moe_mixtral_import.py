"""HF Mistral / Ministral, Qwen2-MoE and Mixtral -> megatron GPTModel (one process): logits and
taps equal transformers' on two configs per family that differ as real checkpoints do (uniform or
per-layer sliding windows, head_dim, tying; shared-expert gate, dense layers, renormalisation;
expert counts, windows, on-disk w1/w3/w2 or fused in-memory experts); configs megatron cannot
reproduce fail naming the field."""
import pytest

from tests.families_testing import (assert_config_refused, assert_matches_hf, import_target,
                                    mistral_config, mixtral_config, perturbed_model,
                                    qwen2_moe_config)

VARIANTS = {
    "mistral_window": (mistral_config, {}, "safetensors"),
    "ministral_alternating_tied": (mistral_config, dict(
        architectures=["MinistralForCausalLM"], model_type="ministral", head_dim=16,
        tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention",
                                               "sliding_attention"]), "safetensors"),
    "qwen2_moe_shared_gate": (qwen2_moe_config, {}, "safetensors"),
    "qwen2_moe_sparse_step_tied": (qwen2_moe_config, dict(
        mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=True, num_experts_per_tok=3,
        tie_word_embeddings=True), "state_dict"),
    "mixtral": (mixtral_config, {}, "safetensors"),
    "mixtral_window_fused": (mixtral_config, dict(
        num_local_experts=8, num_experts_per_tok=3, sliding_window=8), "state_dict"),
}


def build(variant):
    make, changes, source = VARIANTS[variant]
    if changes.get("model_type") == "ministral":
        from transformers import MinistralConfig

        changes = {k: v for k, v in changes.items() if k != "model_type"}
        return perturbed_model(MinistralConfig(**(make().to_dict() | changes))), source
    return perturbed_model(make(**changes)), source


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_hf(variant, utils, tmp_path):
    utils.initialize_model_parallel(1, 1)
    hf_model, source = build(variant)
    if source == "safetensors":
        hf_model.save_pretrained(tmp_path)
        model = import_target(tmp_path)
    else:
        model = import_target(hf_model.state_dict(), hf_model.config)
    config = model.config
    if "window" in variant or "alternating" in variant:
        assert config.window_size == (7, 0)
    assert config.window_attn_skip_freq == ([1, 0, 1] if "alternating" in variant else None)
    assert_matches_hf(model, hf_model, taps=[0, 1, 2])


@pytest.mark.parametrize("make,changes,field", [
    (mistral_config, dict(sliding_window=0), "sliding_window=0"),
    (qwen2_moe_config, dict(use_sliding_window=True), "use_sliding_window=True"),
    (qwen2_moe_config, dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (mixtral_config, dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
    (mixtral_config, dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
     "rope_parameters.rope_type='dynamic'"),
])
def test_unsupported_config_fails_naming_the_field(make, changes, field, tmp_path):
    make().save_pretrained(tmp_path)
    assert_config_refused(tmp_path, changes, tmp_path, field)
