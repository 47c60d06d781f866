"""Sliding-window and causal draft layers (dflash2_and_swa_spec §7) against the z-lab reference
(dflash==0.1.0): each block's mask row is the reference's `_attention_mask`; packed training
logits equal the reference's per-block inference (all sliding or mixed, causal or not, DFlash
and DFlash2), dense = sparse (gather, flex; the gather path's cost follows the window); the
draft KV cache equals the reference's cached forward; the export loads strictly, every loader
reads the same per-layer attention from it, and it decodes losslessly with the reference loop's
τ; what the loaders would read differently is refused."""
import json

import pytest
import torch
import torch.nn.functional as F
from dflash.model import DFlashDraftModel, _attention_mask
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3Config

from megatron_dflash import state_dict_adapter
from megatron_dflash.evaluate import build_decoder
from megatron_dflash.masks import FULL, LayerAttention, dflash_attention_mask
from megatron_dflash.reference_format import config_from_reference, reference_config
from megatron_dflash.sparse_attention import (dflash_block_mask, flex_block_attention,
                                              gather_block_attention)
from tests.dflash2_testing import DFLASH2, file_tensors, reference_dflash2
from tests.dflash_testing import (build_draft, dflash_config, draft_inputs, head_only_target,
                                  head_state, load_params, params, target_config)
from tests.interop_testing import (TARGET_FIELDS, assert_cached_decoding_equals_reference,
                                   assert_trained_export_decodes_like_reference, draft_config,
                                   random_prompts, reference_model, target_dir,
                                   write_reference_dir)

S, B, W = 48, 8, 12  # the window is shorter than most blocks' context
SLIDING, FULL_TYPE = "sliding_attention", "full_attention"
# (layer_types, is_causal): the reference default on sliding layers (causal), the published
# Qwen3.6 drafters' non-causal sliding layers, full and sliding layers by default (only the
# sliding ones causal), and both made causal.
CASES = {"sliding": ([SLIDING] * 2, None), "sliding-noncausal": ([SLIDING] * 2, False),
         "mixed": ([SLIDING, FULL_TYPE], None), "mixed-causal": ([FULL_TYPE, SLIDING], True)}


def _reference_keys(case) -> dict:
    """The config.json keys that make the reference's layers those of `case` (spec §7.1)."""
    types, is_causal = CASES[case]
    keys = dict(layer_types=types, sliding_window=W, use_sliding_window=True)
    return keys if is_causal is None else dict(keys, is_causal=is_causal)


def _layer_fields(case) -> dict:
    types, is_causal = CASES[case]
    return dict(layer_types=types, sliding_window=W, is_causal=is_causal)


@pytest.mark.parametrize("causal", [False, True])
def test_mask_rows_are_the_reference_attention_mask(causal):
    """Each kept block's row of the packed mask, on keys [context 0..a-1 ; its block], is the
    reference's `_attention_mask` for that block alone (anchors below and far above W); every
    other key is masked. The gather and flex paths give the dense path's attention."""
    anchors = torch.tensor([[3, 30, 13, 0], [40, 12, 0, 0]])
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    kind = LayerAttention(causal=causal, window=W)
    masks = dflash_attention_mask(anchors, keep, S, B, (FULL, kind))
    n = anchors.shape[1]
    for row in range(2):
        mask = masks.for_layer(kind)[row, 0]
        for j in range(n):
            a = int(anchors[row, j]) if keep[row, j] else 0
            keys = torch.cat([torch.arange(a), S + torch.arange(j * B, (j + 1) * B)])
            expected = _attention_mask(torch.zeros(1, 1, B, 1), torch.zeros(1, 1, a + B, 1),
                                       is_causal=causal, sliding_window=W)[0, 0]
            rows = mask[j * B:(j + 1) * B]
            assert torch.equal(~rows[:, keys], expected), (row, j)
            others = torch.ones(S + n * B, dtype=torch.bool)
            others[keys] = False
            assert rows[:, others].all()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n * B, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, S + n * B, 16, generator=g, requires_grad=True) for _ in range(2))
    sparse = dflash_block_mask(anchors, keep, S, B, (FULL, kind)).for_layer(kind)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=~masks.for_layer(kind), scale=0.3,
                                           enable_gqa=True)
    gathered = gather_block_attention(q, k, v, sparse, 0.3, chunk_queries=16)
    assert (gathered - dense).abs().max() < 1e-5
    probe = torch.randn(dense.shape, generator=g)
    grads = [torch.autograd.grad((out * probe).sum(), (q, k, v)) for out in (dense, gathered)]
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(*grads))
    flex = flex_block_attention(*(t.detach() for t in (q, k, v)), sparse, 0.3)
    assert (flex - dense).abs().max() < 1e-5
    assert sparse.for_layer(kind).flex_block_mask() is sparse.flex_block_mask()  # once per kind


def test_gather_cost_follows_the_window():
    """The CPU gather path scores a sliding layer's chunks from where their windows start: far
    fewer matmul FLOPs than the full layer's prefixes on the same long sequence."""
    s, n, heads, hn, window = 512, 24, 2, 8, 64
    anchors = torch.arange(n)[None] * 20 + 10
    kind = LayerAttention(causal=True, window=window)
    mask = dflash_block_mask(anchors, torch.ones_like(anchors, dtype=torch.bool), s, 16,
                             (FULL, kind))
    q = torch.randn(1, heads, n * 16, hn)
    k = torch.randn(1, heads, s + n * 16, hn)
    flops = {}
    for layer in (FULL, kind):
        with FlopCounterMode(display=False) as counter:
            gather_block_attention(q, k, k, mask.for_layer(layer), 1.0, chunk_queries=32)
        flops[layer] = counter.get_total_flops()
    assert flops[kind] < 0.4 * flops[FULL], flops


@pytest.mark.parametrize("case,variant", [("sliding", "dflash"), ("sliding-noncausal", "dflash2"),
                                          ("mixed", "dflash"), ("mixed-causal", "dflash")])
def test_packed_draft_equals_reference_per_block(utils, case, variant):
    """Reference weights in our draft: every packed block's logits equal the reference draft run
    on that block alone as at inference (its context, no mask: it builds each layer's own), fp32;
    the sparse draft's logits and gradients equal the dense one's."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=B, num_anchors=5, **_layer_fields(case),
                        **(DFLASH2 if variant == "dflash2" else {}))
    target = head_only_target()
    head = head_state(target)
    if variant == "dflash2":
        ref = reference_dflash2(cfg, seed=1, **_reference_keys(case))
        tensors = file_tensors(ref)
    else:
        ref = reference_model(cfg, seed=1, **_reference_keys(case))
        tensors = ref.state_dict()
    dense = build_draft(tcfg, cfg, target)
    load_params(dense, state_dict_adapter.hf_to_megatron(tensors, cfg))
    sparse = build_draft(tcfg, cfg, target, attention="sparse")
    load_params(sparse, params(dense))
    inputs = draft_inputs(cfg, batch=2, seq_len=S, seed=2)
    anchors, keep = inputs["anchors"], inputs["keep"]
    assert keep.all() and (anchors > W + B).any()  # the window cuts some blocks' context
    ids, features, positions = (inputs[k] for k in ("block_input_ids", "features",
                                                    "position_ids"))
    ours = dense(ids, features, inputs["attention_mask"], positions)
    block_mask = dflash_block_mask(anchors, keep, S, B, cfg.layer_attentions())
    theirs = sparse(ids, features, block_mask, positions)
    assert (ours - theirs).abs().max() < 1e-5
    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        if p.grad is None:  # DFlash2's selector: it scores in the loss, not in the logits
            assert q.grad is None and name.startswith("candidate_selector"), name
            continue
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max()), name
    with torch.no_grad():
        for b in range(2):
            for j, a in enumerate(anchors[b].tolist()):
                block = slice(j * B, (j + 1) * B)
                hidden = ref(position_ids=torch.arange(a + B)[None],
                             noise_embedding=F.embedding(ids[b:b + 1, block], head["embedding"]),
                             target_hidden=features[:a, b:b + 1].transpose(0, 1))
                expected = hidden[0] @ head["output"].t()
                assert (ours[block, b] - expected).abs().max() < 1e-5, (b, j)


def test_kv_cache_decoding_equals_reference_cached_forward(utils):
    """Context arriving in chunks of 10, 3, 1, 9, 5 tokens (past the window): each step's block
    logits with the draft cache equal a recompute over the whole context and the reference's
    DynamicCache path, layer by layer its own window and causality."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=B, **_layer_fields("mixed"))
    target = head_only_target()
    head = head_state(target)
    ref = reference_model(cfg, seed=4, **_reference_keys("mixed"))
    draft = build_draft(tcfg, cfg, target)
    load_params(draft, state_dict_adapter.hf_to_megatron(ref.state_dict(), cfg))
    g = torch.Generator().manual_seed(5)
    features = torch.randn(28, 1, 2 * cfg.hidden_size, generator=g)
    assert_cached_decoding_equals_reference(draft, ref, head, features, (10, 3, 1, 9, 5), g, B)


def _vllm_layer(config: dict, i: int) -> tuple[bool, int | None]:
    """(causal, window) of layer i as vLLM's `qwen3_dflash._resolve_layer_attention` reads a
    config (through transformers' Qwen3Config, which keeps the window only with
    use_sliding_window)."""
    dflash, types = config.get("dflash_config") or {}, config.get("layer_types")
    use_swa = dflash.get("use_swa", False)
    if types is None or (use_swa and SLIDING not in types):
        sliding = use_swa
    else:
        sliding = types[i] == SLIDING
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    causal = config.get("is_causal")
    if causal is None:
        causal = dflash.get("causal")
    if causal is None:
        causal = bool(types) and types[i] == SLIDING
    return bool(causal), dflash.get("swa_window_size", window) if sliding else None


def _sglang_layer(config: dict, i: int) -> tuple[bool, int | None]:
    """(causal, window) of layer i as SGLang's `models/dflash.py` (the copy read, 7f151c5)
    builds it: full layers non-causal (ENCODER_ONLY), sliding ones causal decoders."""
    if config["layer_types"][i] == FULL_TYPE:
        return False, None
    return True, config["sliding_window"] if config.get("use_sliding_window") else None


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_keys_are_read_alike_by_every_loader(case):
    """The exported config states each layer's attention once, at the top level: the reference
    (its built layers), vLLM and, where the causality is the layer type's (SGLang's copy reads
    nothing else), SGLang resolve the draft's own (causal, window) per layer; it imports back to
    the same fields."""
    cfg = draft_config(**_layer_fields(case))
    config = reference_config(cfg, TARGET_FIELDS, torch.float32)
    types, is_causal = CASES[case]
    assert config["layer_types"] == types and config["use_sliding_window"] is True
    assert config["sliding_window"] == W and "is_causal" in config
    expected = [(k.causal, k.window) for k in cfg.layer_attentions()]
    reference = DFlashDraftModel(Qwen3Config(**config))
    assert [(layer.self_attn.is_causal, layer.self_attn.sliding_window)
            for layer in reference.layers] == expected
    assert [_vllm_layer(config, i) for i in range(2)] == expected
    if all(causal == (t == SLIDING) for (causal, _), t in zip(expected, types)):
        assert [_sglang_layer(config, i) for i in range(2)] == expected
    back = config_from_reference(json.loads(json.dumps(config)), "config.json")
    assert back.layer_attentions() == cfg.layer_attentions()


REFUSED = {
    "no_use_sliding_window": (dict(use_sliding_window=False), "use_sliding_window=False"),
    "vllm_causal_disagrees": (dict(is_causal=None, dflash_config={"causal": False}),
                              "dflash_config.causal=False"),
    "vllm_use_swa_on_full": (dict(layer_types=[FULL_TYPE] * 2, dflash_config={"use_swa": True}),
                             "dflash_config.use_swa=True"),
    "vllm_window_differs": (dict(dflash_config={"swa_window_size": 16}),
                            "dflash_config.swa_window_size=16"),
    "unknown_layer_type": (dict(layer_types=[SLIDING, "chunked_attention"]), "layer_types="),
    "is_causal_not_bool": (dict(is_causal="yes"), "is_causal='yes'"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_import_refuses_what_loaders_would_read_differently(kind):
    """A reference config whose per-layer attention the reference, vLLM and SGLang would resolve
    differently (or not at all) is one error naming the key; consistent vLLM spellings and a
    `max_window_layers` config without `layer_types` are read as the reference reads them."""
    cfg = draft_config(**_layer_fields("mixed"))
    config = reference_config(cfg, TARGET_FIELDS, torch.float32)
    edit, message = REFUSED[kind]
    broken = dict(config, **edit)
    broken["dflash_config"] = dict(config["dflash_config"], **edit.get("dflash_config", {}))
    with pytest.raises(ValueError, match="config.json: ") as e:
        config_from_reference(broken, "config.json")
    assert message in str(e.value) and "\n" not in str(e.value)
    agreed = dict(config, layer_types=None, max_window_layers=0,
                  dflash_config=dict(config["dflash_config"], causal=True, use_swa=True,
                                     swa_window_size=W))
    read = config_from_reference(agreed, "config.json")
    assert (read.layer_types, read.sliding_window, read.is_causal) == ([SLIDING] * 2, W, None)
    assert "causal" not in reference_config(read, TARGET_FIELDS,
                                            torch.float32)["dflash_config"]
    with pytest.raises(ValueError, match="sliding_window=4 must be an integer >= 8"):
        dflash_config(target_config(), block_size=B, **dict(_layer_fields("mixed"),
                                                              sliding_window=4))


def test_trained_sliding_draft_exports_and_decodes_losslessly_with_the_reference_tau(
        utils, tmp_path, monkeypatch):
    """A mixed sliding/full draft trained 30 steps with the training step's loss on the target's
    greedy continuations (contexts up to 36 tokens, window 12), saved and exported: the export
    loads in the reference with strict keys; our speculative decoding equals target-only greedy
    decoding and every request's acceptance lengths (so τ) equal `dflash_generate`'s."""
    utils.initialize_model_parallel(1)
    cfg = draft_config(**_layer_fields("mixed"))
    target = target_dir(tmp_path / "target", seed=3)
    decoder = build_decoder(target, write_reference_dir(
        tmp_path / "draft", cfg, reference_model(cfg, 4, **_reference_keys("mixed")).state_dict()))
    g = torch.Generator().manual_seed(5)
    reference = assert_trained_export_decodes_like_reference(
        tmp_path, monkeypatch, target, decoder, random_prompts(4, generator=g), g,
        DFlashDraftModel)
    assert [(layer.self_attn.is_causal, layer.self_attn.sliding_window)
            for layer in reference.layers] == [(True, W), (False, None)]
