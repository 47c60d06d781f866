"""DFlashConfig: reference defaults, and one clear ValueError per bad field before any tensor."""
import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dflash.config import (DFlashConfig, build_target_layer_ids, default_loss_gamma,
                                    draft_transformer_config)

VOCAB = 1000


def target_config(tp=1, layers=36, hidden=64):
    return TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8,
                             num_query_groups=4, kv_channels=16, ffn_hidden_size=128,
                             tensor_model_parallel_size=tp, use_cpu_initialization=True,
                             layernorm_epsilon=1e-6)


def resolve(tp=1, **kw):
    kw.setdefault("mask_token_id", 7)
    return DFlashConfig(**kw).resolve(target_config(tp), vocab_size=VOCAB, target_rope_theta=1e6)


@pytest.mark.parametrize("layers,draft,ids", [
    (36, 5, [1, 9, 17, 25, 33]), (32, 5, [1, 8, 15, 22, 29]), (28, 5, [1, 7, 13, 19, 25]),
    (24, 5, [1, 6, 11, 16, 21]), (64, 5, [1, 16, 31, 46, 61]),
    (48, 8, [1, 7, 14, 20, 26, 32, 39, 45]), (36, 3, [1, 17, 33]), (36, 1, [18]),
    (30, 5, [1, 8, 14, 20, 27]),  # SmolLM2: banker's rounding 7.5 -> 8, 20.5 -> 20
])
def test_reference_layer_ids(layers, draft, ids):
    assert build_target_layer_ids(layers, draft) == ids


def test_defaults_inherit_from_target():
    r = resolve()
    assert r.target_layer_ids == [1, 9, 17, 25, 33]
    assert (r.num_attention_heads, r.num_key_value_heads, r.head_dim, r.ffn_hidden_size) == (8, 4, 16, 128)
    assert (r.rope_theta, r.norm_eps, r.hidden_size, r.loss_gamma) == (1e6, 1e-6, 64, 7.0)
    assert [default_loss_gamma(b) for b in (16, 10, 8)] == [7.0, 5.0, 4.0]


def test_overrides_and_draft_transformer_config():
    r = resolve(num_attention_heads=4, num_key_value_heads=2, head_dim=24, ffn_hidden_size=96,
                num_draft_layers=2, target_layer_ids=[0, 35])
    cfg = draft_transformer_config(r, target_config())
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (2, 4, 2, 24)
    assert cfg.qk_layernorm and cfg.gated_linear_unit and not cfg.calculate_per_token_loss
    assert cfg.pipeline_model_parallel_size == 1 and cfg.normalization == "RMSNorm"
    assert cfg.activation_func is torch.nn.functional.silu


def test_dflash2_defaults():
    r = resolve(draft_variant="dflash2")
    assert (r.conv_kernel_size, r.conv_group_size, r.selector_rank, r.selector_top_k,
            r.vocab_size) == (2, 16, 256, 16, VOCAB)
    assert resolve().vocab_size is None and resolve().conv_kernel_size is None


# One case per field: (overrides, tp, words the message must contain).
BAD = {
    "block_size": ({"block_size": 1}, 1, ["block_size", ">= 2"]),
    "num_draft_layers": ({"num_draft_layers": 0}, 1, ["num_draft_layers", ">= 1"]),
    "ids_out_of_range": ({"target_layer_ids": [1, 36]}, 1, ["target_layer_ids", "[0, 35]"]),
    "ids_negative": ({"target_layer_ids": [-1, 3]}, 1, ["target_layer_ids", "[0, 35]"]),
    "ids_unsorted": ({"target_layer_ids": [5, 3]}, 1, ["target_layer_ids", "strictly increasing"]),
    "ids_repeated": ({"target_layer_ids": [3, 3]}, 1, ["target_layer_ids", "repeats"]),
    "ids_empty": ({"target_layer_ids": []}, 1, ["target_layer_ids", "non-empty"]),
    "mask_missing": ({"mask_token_id": None}, 1, ["mask_token_id", "required"]),
    "mask_outside_vocab": ({"mask_token_id": VOCAB}, 1, ["mask_token_id", f"[0, {VOCAB - 1}]"]),
    "hidden_size": ({"hidden_size": 128}, 1, ["hidden_size", "64"]),
    "heads_tp": ({"num_attention_heads": 6, "num_key_value_heads": 2}, 4, ["num_attention_heads", "tensor-parallel"]),
    "kv_heads_divide": ({"num_key_value_heads": 3}, 1, ["num_key_value_heads", "divide"]),
    "kv_heads_tp": ({"num_attention_heads": 12, "num_key_value_heads": 6}, 4, ["num_key_value_heads", "tensor-parallel"]),
    "head_dim": ({"head_dim": 15}, 1, ["head_dim", "even"]),
    "ffn_tp": ({"ffn_hidden_size": 130}, 4, ["ffn_hidden_size", "tensor-parallel"]),
    "rope_theta": ({"rope_theta": 0}, 1, ["rope_theta", "> 0"]),
    "norm_eps": ({"norm_eps": -1e-6}, 1, ["norm_eps", "> 0"]),
    "loss_gamma": ({"loss_gamma": 0.0}, 1, ["loss_gamma", "> 0"]),
    "num_anchors": ({"num_anchors": 0}, 1, ["num_anchors", ">= 1"]),
    "too_many_draft_layers": ({"num_draft_layers": 40}, 1, ["num_draft_layers", "target_layer_ids"]),
    "draft_variant": ({"draft_variant": "dflash3"}, 1, ["draft_variant", "dflash2"]),
    "dflash2_field_on_dflash": ({"selector_rank": 8}, 1, ["selector_rank", "draft_variant='dflash2'"]),
    "conv_kernel_size": ({"draft_variant": "dflash2", "conv_kernel_size": 17}, 1,
                         ["conv_kernel_size=17", "<= block_size=16"]),
    "conv_group_size": ({"draft_variant": "dflash2", "conv_group_size": 24}, 1,
                        ["conv_group_size=24", "divide the hidden size 64"]),
    "selector_rank": ({"draft_variant": "dflash2", "selector_rank": 0}, 1, ["selector_rank", ">= 1"]),
    "selector_top_k": ({"draft_variant": "dflash2", "selector_top_k": VOCAB + 1}, 1,
                       ["selector_top_k", f"vocabulary {VOCAB}"]),
    "selector_loss_weight": ({"selector_loss_weight": -1.0}, 1, ["selector_loss_weight", ">= 0"]),
    "output_multiplier": ({"output_multiplier": 0.0}, 1, ["output_multiplier", "> 0"]),
    "softcap": ({"final_logit_softcapping": -3.0}, 1, ["final_logit_softcapping", "> 0"]),
    "layer_types": ({"layer_types": ["sliding_attention"] * 4, "sliding_window": 64}, 1,
                    ["layer_types=", "must list 5 layer types"]),
    "sliding_without_window": ({"layer_types": ["sliding_attention"] + ["full_attention"] * 4},
                               1, ["has sliding layers", "sliding_window"]),
    "window_cuts_a_block": ({"sliding_window": 8}, 1, ["sliding_window=8", ">= 16"]),
    "window_without_sliding": ({"sliding_window": 64, "layer_types": ["full_attention"] * 5}, 1,
                               ["sliding_window=64", "no 'sliding_attention' layer"]),
    "is_causal": ({"is_causal": 1}, 1, ["is_causal=1", "true, false or unset"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field_raises_naming_it(case):
    overrides, tp, words = BAD[case]
    with pytest.raises(ValueError) as e:
        resolve(tp=tp, **overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
