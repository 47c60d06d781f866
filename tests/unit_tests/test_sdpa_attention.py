"""SDPACoreAttention (the local target's core attention) equals megatron's DotProductAttention:
alone (GQA, causal, explicit masks, decode against a longer key cache), in an imported target
(logits and captured features), and through megatron's static KV-cache inference path."""
from dataclasses import replace

import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import get_sliding_window_causal_mask

from tests.dflash_testing import target_config, tiny_target_dir
from megatron_dflash.targets import hf_import
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention

TOL = 1e-5
HEADS, GROUPS, HN, BATCH = 4, 2, 16, 2


def bottom_right_causal(sq, sk):
    """megatron's bool convention: True = masked; query i sees keys <= i + sk - sq."""
    return torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)


def qkv(sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, BATCH, HEADS, HN, generator=g),
            torch.randn(sk, BATCH, GROUPS, HN, generator=g),
            torch.randn(sk, BATCH, GROUPS, HN, generator=g))


def random_mask(sq, sk, seed=1):
    """[b, 1, sq, sk] with at least one visible key per query row."""
    mask = torch.rand(BATCH, 1, sq, sk, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[..., 0] = False
    return mask


CASES = {  # (sq, sk, mask given to both, mask given to DotProductAttention only)
    "causal": (12, 12, None, None),
    "explicit_mask": (12, 12, random_mask(12, 12), None),
    "explicit_mask_sq_lt_sk": (5, 12, random_mask(5, 12), None),
    "decode": (1, 12, None, None),
    # A prefill chunk against a KV cache: DotProductAttention needs the mask spelt out.
    "chunk_sq_lt_sk": (4, 12, None, bottom_right_causal(4, 12)[None, None]),
}


@pytest.mark.parametrize("layer_scaling", [False, True], ids=["plain", "qk_layer_scaling"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_dot_product_attention(case, layer_scaling, utils):
    utils.initialize_model_parallel(1)
    sq, sk, mask, dpa_mask = CASES[case]
    config = replace(target_config(), kv_channels=HN,
                     apply_query_key_layer_scaling=layer_scaling)
    args = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    q, k, v = qkv(sq, sk)
    out = SDPACoreAttention(**args)(q, k, v, mask)
    ref = DotProductAttention(**args)(q, k, v, mask if dpa_mask is None else dpa_mask)
    assert out.shape == (sq, BATCH, HEADS * HN)
    assert (out - ref).abs().max() <= TOL


def test_no_mask_and_softmax_scale(utils):
    """A padding-type module without a mask attends to every key; an explicit scale is used."""
    utils.initialize_model_parallel(1)
    args = dict(config=replace(target_config(), kv_channels=HN), layer_number=1,
                attn_mask_type=AttnMaskType.padding, attention_type="self", softmax_scale=0.3)
    q, k, v = qkv(5, 9)
    out = SDPACoreAttention(**args)(q, k, v, None)
    ref = DotProductAttention(**args)(q, k, v, None)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("softmax_type", ["vanilla", "learnable", "off-by-one"])
@pytest.mark.parametrize("case", ["causal", "explicit_mask", "decode", "chunk_sq_lt_sk"])
def test_window_and_sinks_equal_dot_product_attention(case, softmax_type, utils):
    """gpt-oss's attention: a sliding window of 4 keys (megatron's window_size=(3, 0) on the
    layers window_attn_skip_freq picks: layer 3 slides, layer 2 not) and per-head sinks, equal to
    DotProductAttention (same sinks) given megatron's sliding-window mask (or'ed with the
    explicit one, which DotProductAttention's own window would replace)."""
    utils.initialize_model_parallel(1)
    sq, sk, mask, _ = CASES[case]
    config = replace(target_config(), kv_channels=HN, window_size=(3, 0),
                     window_attn_skip_freq=2, softmax_type=softmax_type)
    q, k, v = qkv(sq, sk)
    for layer_number in (2, 3):
        args = dict(layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                    attention_type="self")
        ours = SDPACoreAttention(config, **args)
        dpa = DotProductAttention(replace(config, window_size=None), **args)
        assert (ours.window is not None) == (layer_number == 3)
        if softmax_type == "learnable":
            with torch.no_grad():
                ours.softmax_offset.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
                dpa.softmax_offset.copy_(ours.softmax_offset)
        dpa_mask = bottom_right_causal(sq, sk) if mask is None else mask
        if layer_number == 3:
            dpa_mask = dpa_mask | get_sliding_window_causal_mask(sq, sk, (3, 0))
        ref = dpa(q, k, v, dpa_mask.expand(BATCH, 1, sq, sk))
        assert (ours(q, k, v, mask) - ref).abs().max() <= TOL, layer_number


@pytest.mark.parametrize("unsupported, message", [
    (dict(dropout=0.1), "attention dropout 0.1 in training"),
    (dict(forward=dict(attention_bias=torch.zeros(1))), "attention_bias"),
    (dict(forward=dict(packed_seq_params=PackedSeqParams())), "packed sequences"),
])
def test_refuses_what_it_does_not_support(unsupported, message, utils):
    utils.initialize_model_parallel(1)
    config = replace(target_config(), kv_channels=HN, **unsupported.get("config", {}))
    with pytest.raises(ValueError, match=f"does not support {message}"):
        core = SDPACoreAttention(config, 1, AttnMaskType.causal, "self",
                                 attention_dropout=unsupported.get("dropout"))
        core(*qkv(4, 4), None, **unsupported.get("forward", {}))


def import_target(path, core_attention, monkeypatch, **parallel):
    """The HF checkpoint at `path` as a local-backend target whose core attention is
    `core_attention`."""
    hf = hf_import.load_hf_config(path)
    monkeypatch.setattr(hf_import.target_family(hf), "core_attention", core_attention)
    model = hf_import.build_target(hf, hf_import.target_transformer_config(hf, **parallel))
    hf_import.load_hf_weights(model, path)
    assert all(type(layer.self_attention.core_attention) is core_attention
               for layer in model.decoder.layers)
    return model


def test_target_equals_local_attention_target(utils, tmp_path, monkeypatch):
    utils.initialize_model_parallel(1)
    path = tiny_target_dir(tmp_path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(2, 32)
    results = []
    for core_attention in (SDPACoreAttention, DotProductAttention):
        model = import_target(path, core_attention, monkeypatch)
        with FeatureCapture(model, [0, 2, 3]) as capture:
            results.append(target_forward(model, ids, pos, capture))
    (logits, features), (ref_logits, ref_features) = results
    assert (logits - ref_logits).abs().max() <= TOL
    assert (features - ref_features).abs().max() <= TOL


@pytest.mark.parametrize("explicit_mask", [True, False], ids=["explicit_mask", "no_mask"])
def test_static_inference_equals_full_forward(explicit_mask, utils, tmp_path, monkeypatch):
    """Prefill 7 tokens, then a 4-token chunk and a 1-token decode step through megatron's
    StaticInferenceContext (as evaluate.py verifies blocks): the logits equal one causal forward
    over all 12 tokens, with the causal mask passed (evaluate.py) or left to the module."""
    utils.initialize_model_parallel(1)
    model = import_target(tiny_target_dir(tmp_path), SDPACoreAttention, monkeypatch)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, torch.arange(12)[None], None)
        cache, steps = StaticInferenceContext(1, 12), []
        for start, stop in ((0, 7), (7, 11), (11, 12)):
            cache.sequence_len_offset = start
            mask = bottom_right_causal(stop - start, stop)[None, None] if explicit_mask else None
            steps.append(model(ids[:, start:stop], None, mask, inference_context=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL
