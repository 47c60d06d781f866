"""Sparse block attention (sparse_attention.py) == the dense DFlash mask, in the core attention
and in the whole draft."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tests.dflash_testing import (build_draft, dflash_config, head_only_target, load_params, params,
                            randomize_, target_config)
from megatron_dflash.anchors import block_input_ids, block_position_ids
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.masks import dflash_attention_mask
from megatron_dflash.sparse_attention import (DFlashSparseAttention, dflash_block_mask,
                                              flex_block_attention, gather_block_attention)
from megatron_dflash.specs import get_dflash_layer_spec

S, B = 40, 8
# Anchor 0, unkept blocks (anchor 0, keep False), an anchor at the last eligible position, and a
# row whose anchors are not sorted.
ANCHORS = torch.tensor([[0, 3, 11, 32, 0], [25, 7, 32, 0, 0]])
KEEP = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])


def qkv(heads=4, groups=2, hn=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = ANCHORS.shape[1] * B
    q = torch.randn(2, heads, n, hn, generator=g, dtype=dtype)
    k = torch.randn(2, groups, S + n, hn, generator=g, dtype=dtype)
    v = torch.randn(2, groups, S + n, hn, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def dense_reference(q, k, v, scale):
    visible = ~dflash_attention_mask(ANCHORS, KEEP, S, B)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("chunk_queries", [1, 16, 256])
def test_gather_matches_dense_forward_and_backward(chunk_queries):
    q, k, v = qkv()
    out = gather_block_attention(q, k, v, dflash_block_mask(ANCHORS, KEEP, S, B), 0.3,
                                 chunk_queries=chunk_queries)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_inputs, 0.3)
    assert (out - ref).abs().max() < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip((q, k, v), ref_inputs):
        assert (mine.grad - theirs.grad).abs().max() < 1e-5


def test_flex_forward_matches_dense():
    """The BlockMask (incl. Q_LEN padded to 128 and its clamp) through FlexAttention, forward only:
    FlexAttention has no CPU backward; on CUDA the draft test below runs it with gradients."""
    q, k, v = (t.detach() for t in qkv())
    mask = dflash_block_mask(ANCHORS, KEEP, S, B)
    out = flex_block_attention(q, k, v, mask, 0.3)
    assert (out - dense_reference(q, k, v, 0.3)).abs().max() < 1e-5
    assert mask.flex_block_mask() is mask.flex_block_mask()  # built once, shared by layers


def test_gather_cost_follows_the_visible_keys():
    """Counted matmul FLOPs: within a chunk's slack of the visible (query, key) pairs, far below
    the dense N*B x (S + N*B)."""
    s, bs, n, heads, hn = 512, 16, 24, 2, 8
    anchors = torch.arange(n)[None] * 20 + 10
    mask = dflash_block_mask(anchors, torch.ones_like(anchors, dtype=torch.bool), s, bs)
    q = torch.randn(1, heads, n * bs, hn)
    k = v = torch.randn(1, heads, s + n * bs, hn)
    with FlopCounterMode(display=False) as counter:
        gather_block_attention(q, k, v, mask, 1.0, chunk_queries=64)
    visible = bs * (anchors.sum() + n * bs)
    useful = 4 * heads * hn * int(visible)
    dense = 4 * heads * hn * n * bs * (s + n * bs)
    assert useful <= counter.get_total_flops() < 1.15 * useful < 0.6 * dense


def test_core_attention_module_layouts_and_masks(utils):
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    dcfg = draft_transformer_config(dflash_config(tcfg), tcfg)
    core = DFlashSparseAttention(dcfg, layer_number=1, attn_mask_type=None, attention_type="self")
    q, k, v = qkv(hn=dcfg.kv_channels)
    to_sbhd = lambda t: t.detach().permute(2, 0, 1, 3)  # noqa: E731
    out = core(to_sbhd(q), to_sbhd(k), to_sbhd(v), dflash_block_mask(ANCHORS, KEEP, S, B))
    ref = dense_reference(q, k, v, dcfg.kv_channels ** -0.5)
    assert out.shape == (q.shape[2], 2, 4 * dcfg.kv_channels)
    assert (out - ref.permute(2, 0, 1, 3).reshape(out.shape)).abs().max() < 1e-5
    unmasked = core(to_sbhd(q), to_sbhd(k), to_sbhd(v), None)  # inference: no mask
    ref = F.scaled_dot_product_attention(q, k, v, scale=dcfg.kv_channels ** -0.5, enable_gqa=True)
    assert (unmasked - ref.permute(2, 0, 1, 3).reshape(out.shape)).abs().max() < 1e-5
    with pytest.raises(TypeError, match="DFlashBlockMask"):
        core(to_sbhd(q), to_sbhd(k), to_sbhd(v), dflash_attention_mask(ANCHORS, KEEP, S, B))


def test_layer_spec_selects_core_attention():
    attention = lambda spec: spec.submodules.self_attention.submodules.core_attention  # noqa: E731
    dense = attention(get_dflash_layer_spec("local"))
    assert dense is not DFlashSparseAttention
    assert attention(get_dflash_layer_spec("local", attention="sparse")) is DFlashSparseAttention
    with pytest.raises(ValueError, match="attention="):
        get_dflash_layer_spec("local", attention="flash")


def test_sparse_draft_equals_dense_draft(utils):
    """Logits and every parameter gradient of a 2-layer GQA draft, fp32, same weights."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=B, num_anchors=ANCHORS.shape[1])
    target = head_only_target()
    dense = build_draft(tcfg, cfg, target, attention="dense")
    sparse = build_draft(tcfg, cfg, target, attention="sparse")
    randomize_(dense, seed=7)
    load_params(sparse, params(dense))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, S), generator=g)
    features = torch.randn(S, 2, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g)
    ids = block_input_ids(tokens, ANCHORS, KEEP, B, cfg.mask_token_id)
    positions = block_position_ids(S, ANCHORS, B)
    masks = {"dense": dflash_attention_mask(ANCHORS, KEEP, S, B),
             "sparse": dflash_block_mask(ANCHORS, KEEP, S, B)}
    probe = None
    for name, draft in (("dense", dense), ("sparse", sparse)):
        logits = draft(ids, features, masks[name], positions)
        if probe is None:
            probe = torch.randn(logits.shape, generator=g)
            dense_logits = logits.detach()
        else:
            assert (logits - dense_logits).abs().max() < 1e-5
        (logits * probe).sum().backward()
    grads = {n: p.grad for n, p in dense.named_parameters()}
    for n, p in sparse.named_parameters():
        assert (p.grad - grads[n]).abs().max() <= 1e-5 * max(1.0, grads[n].abs().max()), n
