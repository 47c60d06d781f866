"""HF gpt-oss (`GptOssForCausalLM`) -> megatron GPTModel (one process): logits and taps equal
transformers' with attention sinks, alternating sliding-window / full layers, biases, the clamped
SwiGLU experts (interleaved gate/up) and the biased softmax-of-top-k router, on two configs that
differ as gpt-oss-20b / 120b-like checkpoints do (MXFP4 experts on disk with YaRN, or unquantized
experts with plain RoPE and another expert count); MXFP4 de-quantisation is transformers' bit for
bit; configs megatron cannot reproduce fail naming the field. Expert-parallel layouts:
tests/distributed/test_moe_ep.py."""
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from megatron_dflash.targets import hf_import, mxfp4
from megatron_dflash.targets.hf_checkpoint import HFCheckpoint
from megatron_dflash.targets.hf_import import load_hf_config
from tests.dflash_testing import record_checkpoint_reads
from tests.families_testing import (assert_config_refused, assert_matches_hf, gpt_oss_config,
                                    import_target, perturbed_model, save_mxfp4)


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    """(MXFP4 checkpoint dir, HF model holding its de-quantised experts)."""
    model = perturbed_model(gpt_oss_config())
    return save_mxfp4(model, tmp_path_factory.mktemp("gpt_oss")), model


def test_mxfp4_import_matches_hf(oss, utils, monkeypatch):
    """YaRN, windows on layers 0 and 2 (megatron's per-layer list), sinks, MXFP4 experts read
    from their blocks and scales only."""
    utils.initialize_model_parallel(1, 1)
    path, hf_model = oss
    opened = record_checkpoint_reads(monkeypatch)
    model = import_target(path)
    config = model.config
    assert (config.window_size, config.window_attn_skip_freq) == ((7, 0), [1, 0, 1, 0])
    assert config.softmax_type == "learnable" and config.add_bias_linear
    assert (config.glu_linear_offset, config.activation_func_clamp_value) == (1.0, 2.0)
    assert config.yarn_rotary_scaling_factor == 4.0
    assert not config.yarn_correction_range_round_to_int  # truncate=False
    keys = opened[-1].shapes.keys() | opened[-1]._stored.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert_matches_hf(model, hf_model, taps=[0, 1, 3])


def test_unquantized_variant_matches_hf(utils, tmp_path):
    """Plain RoPE, another expert count and top-k, head_dim = hidden / heads, tied embeddings:
    experts as transformers saves them ([E, in, out]) and from its in-memory state dict."""
    utils.initialize_model_parallel(1, 1)
    hf_model = perturbed_model(gpt_oss_config(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
        sliding_window=4, rope_parameters=dict(rope_type="default", rope_theta=1000.0)), seed=2)
    hf_model.save_pretrained(tmp_path)
    assert_matches_hf(import_target(tmp_path), hf_model, taps=[1, 2])
    assert_matches_hf(import_target(hf_model.state_dict(), hf_model.config), hf_model, taps=[2])


def test_dequantisation_equals_transformers_slice_by_slice():
    """Any rows x columns slice of an expert (columns not on group boundaries included) is
    transformers' de-quantisation of the whole tensor, sliced; reading it touches only the
    groups it needs."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 130, (3, 8, 4), dtype=torch.uint8, generator=g)
    whole = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    state = {"w_blocks": blocks, "w_scales": scales}
    with HFCheckpoint(state) as checkpoint:
        checkpoint.add_views({"w.1": mxfp4.expert_view("w", 1, (8, 128))})
        assert torch.equal(checkpoint.get("w.1"), whole[1])
        assert torch.equal(checkpoint.get_shard("w.1", 0, 1, 4), whole[1, 2:4])
        read = checkpoint.elements_read
        assert torch.equal(checkpoint.get_range("w.1", 1, 40, 70), whole[1, :, 40:70])
        assert checkpoint.elements_read - read == 8 * 2 * 16 + 8 * 2  # groups 1-2 of each row


def test_names_sinks_split_over_heads_and_experts_whole(oss):
    hf = load_hf_config(oss[0])
    family = hf_import.target_family(hf)
    with pytest.raises(ValueError, match=r"expert_tensor_parallel_size=2 \(default: the "
                                         r"tensor-parallel size\): gpt-oss's experts have biases"):
        hf_import.target_transformer_config(hf, tensor_parallel_size=2)
    config = hf_import.target_transformer_config(hf, tensor_parallel_size=2,
                                                 expert_tensor_parallel_size=1)
    rows = {name: (names, kind) for name, names, kind in family.weight_rows(
        config, [0], embedding=False, final_norm=False, output=False, tied=False)}
    assert rows["decoder.layers.0.self_attention.core_attention.softmax_offset"] == (
        ("model.layers.0.self_attn.sinks",), "columns")
    assert rows["decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.bias"] == (
        ("model.layers.0.mlp.experts.7.gate_up_proj_bias",), "interleaved_fc1")


@pytest.mark.parametrize("changes,field", [
    (dict(swiglu_alpha=1.5), "swiglu_alpha=1.5"),
    (dict(quantization_config=dict(quant_method="fp8")), "quant_method='fp8'"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "sliding_attention",
                       "full_attention"]), "layer_types=['sliding_attention', 'chunked_attention'"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e3, factor=2.0)),
     "rope_parameters.rope_type='dynamic'"),
])
def test_unsupported_config_fails_naming_the_field(oss, tmp_path, changes, field):
    assert_config_refused(oss[0], changes, tmp_path, field)
