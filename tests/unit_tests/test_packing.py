"""Sequence packing (--pack-sequences): rows of whole conversations that train exactly as the
conversations would unpacked — the sampler, the target's document-causal THD forward, anchors
inside documents, and loss and draft gradients equal to the unpacked batch's."""
from dataclasses import replace

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import get_sliding_window_causal_mask

from megatron_dflash.data.dataset import collate, epoch_order
from megatron_dflash.data.packing import PackingSampler, pack_samples
from megatron_dflash.packed_sequences import document_boundaries, document_bounds
from megatron_dflash.targets import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.step import loss_func, prepare_microbatch
from tests.dflash_testing import target_config, tiny_target_dir
from tests.qwen_hybrid_testing import hybrid_target_dir
from tests.step_testing import MASK, TAPS, step_modules
from tests.training_testing import flags

TOL = 1e-5
LENGTHS = [20, 28, 16, 24, 40, 8, 30, 12, 44, 18]


def _steps(sampler, count):
    it = iter(sampler)
    return [(next(it), sampler.position, sampler.consumed_samples) for _ in range(count)]


def test_sampler_packs_the_stream_greedily_and_resumes():
    """Rows take the epochs' permuted conversations in order while they fit in 48 tokens; the
    position counts conversations over all data-parallel ranks, a sampler started at a step's
    count yields the same later rows, and two data-parallel ranks split one rank's rows."""
    steps = _steps(PackingSampler(LENGTHS, 48, 2, seed=3), 6)
    stream = epoch_order(10, 3, 0) + epoch_order(10, 3, 1)
    rows = [row for step, *_ in steps for row in step]
    assert [i for row in rows for i in row] == stream[:steps[-1][2]]
    for row, following in zip(rows, rows[1:]):
        used = sum(LENGTHS[i] for i in row)
        assert used <= 48 < used + LENGTHS[following[0]]  # greedy: the next one did not fit
    assert [c for *_, c in steps] == [sum(map(len, rows[:2 * k + 2])) for k in range(6)]
    assert [p for _, p, _ in steps] == [sum(map(len, rows[:2 * k])) for k in range(6)]
    assert len(rows) > 0 and any(len(row) > 1 for row in rows)
    resumed = _steps(PackingSampler(LENGTHS, 48, 2, seed=3, consumed_samples=steps[2][2]), 3)
    assert resumed == steps[3:]
    ranks = [_steps(PackingSampler(LENGTHS, 48, 1, r, 2, seed=3), 6) for r in (0, 1)]
    for k, step in enumerate(steps):
        assert [ranks[0][k][0][0], ranks[1][k][0][0]] == step[0]
        assert ranks[0][k][1] == step[1] and ranks[1][k][2] == step[2]
    with pytest.raises(ValueError, match="a 50-token sample does not fit"):
        PackingSampler([10, 50], 48, 1)


def _documents(lengths, seed=0, vocab=MASK):
    """Conversations of `lengths` tokens: a random prompt (a quarter), then the response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        loss_mask = torch.zeros(n, dtype=torch.bool)
        loss_mask[n // 4:] = True
        out.append({"tokens": torch.randint(0, vocab, (n,), generator=g), "loss_mask": loss_mask})
    return out


def _hybrid(path):
    return hybrid_target_dir(path, kind="qwen3_5")


@pytest.mark.parametrize("make_target", [tiny_target_dir, _hybrid], ids=["llama", "qwen3_5_gdn"])
def test_taps_of_a_packed_row_equal_each_conversations_own(utils, tmp_path, make_target):
    """The target's THD forward over a packed row (three conversations and padding): every
    document's taps equal its conversation's forward alone (document-causal attention, RoPE
    from 0 in each document; the gated-delta-net layers restart their state)."""
    utils.initialize_model_parallel(1)
    path = make_target(tmp_path / "target")
    hf = load_hf_config(path)
    target = build_target(hf, target_transformer_config(hf))
    load_hf_weights(target, path)
    docs = _documents([13, 20, 9])
    row, lengths = pack_samples(docs)
    tokens = collate([row], 0, buckets=[48])["tokens"]
    documents = [lengths]
    starts, _ = document_bounds(documents, 48)
    packed = document_boundaries(documents, 48).packed_seq_params()
    capture = FeatureCapture(target, TAPS)
    with capture, torch.no_grad():
        target(tokens, torch.arange(48)[None] - starts, attention_mask=None,
               packed_seq_params=packed)
    taps = capture.features()[:, 0]
    start = 0
    for doc in docs:
        n = len(doc["tokens"])
        _, alone = target_forward(target, doc["tokens"][None], torch.arange(n)[None], capture)
        assert (taps[start:start + n] - alone[:, 0]).abs().max() <= TOL
        start += n


@pytest.mark.parametrize("layer_number", [2, 3], ids=["full", "sliding"])
def test_packed_core_attention_is_block_diagonal_with_window_and_sinks(utils, layer_number):
    """SDPACoreAttention on THD [t, heads, hn] with cu_seqlens equals megatron's
    DotProductAttention under the block-diagonal causal mask (with gpt-oss's sliding window and
    sinks)."""
    utils.initialize_model_parallel(1)
    config = replace(target_config(), kv_channels=16, window_size=(3, 0),
                     window_attn_skip_freq=2, softmax_type="learnable")
    args = dict(layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    ours = SDPACoreAttention(config, **args)
    dpa = DotProductAttention(replace(config, window_size=None), **args)
    with torch.no_grad():
        ours.softmax_offset.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        dpa.softmax_offset.copy_(ours.softmax_offset)
    boundaries = document_boundaries([[5, 9, 3]], 20)  # and 3 tokens of padding
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, heads, 16, generator=g) for heads in (4, 2, 2))
    out = ours(q, k, v, None, packed_seq_params=boundaries.packed_seq_params())
    doc = torch.arange(4).repeat_interleave(torch.tensor([5, 9, 3, 3]))
    masked = (doc[:, None] != doc[None]) | torch.ones(20, 20, dtype=torch.bool).triu(1)
    if layer_number == 3:
        masked |= get_sliding_window_causal_mask(20, 20, (3, 0))
    ref = dpa(*(t[:, None] for t in (q, k, v)), masked[None, None])
    assert out.shape == (20, 64) and (out - ref[:, 0]).abs().max() <= TOL


def test_anchors_stay_inside_their_document(utils, tmp_path):
    """Every position whose block fits in its document is an anchor (--num-anchors large), no
    other; each block sees exactly its document's context before its anchor (dense and sparse
    masks), at positions counted from the document's start."""
    utils.initialize_model_parallel(1)
    _, cfg = step_modules(tiny_target_dir(tmp_path), num_anchors=48)
    row, lengths = pack_samples(_documents([13, 20, 9, 6]))
    batch = collate([row], 0, buckets=[48])
    documents = [lengths]
    starts, ends = document_bounds(documents, 48)
    mbs = {attention: prepare_microbatch(batch["tokens"], batch["loss_mask"], cfg,
                                         torch.Generator().manual_seed(0), attention,
                                         documents=documents)
           for attention in ("dense", "sparse")}
    mask = mbs["sparse"]["attention_mask"]
    kept = mask.keep[0].nonzero().flatten().tolist()
    anchors = [int(mask.anchors[0, j]) for j in kept]
    assert set(anchors) == {a for a in range(48)
                            if batch["loss_mask"][0, a] and a + 8 <= ends[0, a]}
    dense = mbs["dense"]["attention_mask"][0, 0]
    positions = mbs["dense"]["block_position_ids"][0, 48:].view(-1, 8)
    for j, a in zip(kept, anchors):
        start = int(starts[0, a])
        assert int(mask.starts[0, j]) == start and a + 8 <= int(ends[0, a])
        for slot in range(8):
            assert (~dense[j * 8 + slot, :48]).nonzero().flatten().tolist() == \
                list(range(start, a))
        assert positions[j].tolist() == list(range(a - start, a - start + 8))


def _loss_and_grads(module, mb, alpha):
    module.draft.zero_grad()
    extra = {"documents": mb["documents"]} if "documents" in mb else {}
    output = module(mb["tokens"], mb["position_ids"], mb["block_input_ids"], mb["attention_mask"],
                    mb["block_position_ids"], **extra)
    loss, report = loss_func(mb, module, 8, alpha, 16, 1.0, output)
    (loss / report["loss"][1]).backward()
    return (float(loss / report["loss"][1]), report["loss"][1].item(),
            {n: p.grad.clone() for n, p in module.draft.named_parameters()})


SLIDING = dict(num_draft_layers=2, target_layer_ids=[0, 2], sliding_window=12,
               layer_types=["sliding_attention", "full_attention"])
CASES = {"dense": ("dense", {}), "sparse_sliding": ("sparse", SLIDING),
         "dflash2": ("sparse", dict(draft_variant="dflash2", selector_rank=8, selector_top_k=5))}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_batch_trains_like_its_conversations_unpacked(utils, tmp_path, case):
    """Two packed rows of four conversations (one row padded) against the four unpacked, every
    eligible anchor taken in both (so the same blocks): the same loss normaliser, loss and draft
    gradients (distillation on: the teacher rows come through the packed target too)."""
    utils.initialize_model_parallel(1)
    attention, draft = CASES[case]
    module, cfg = step_modules(tiny_target_dir(tmp_path), attention=attention, num_anchors=48,
                               **draft)
    docs = _documents([20, 28, 16, 24], seed=1)
    unpacked = collate(docs, 0, buckets=[48])
    (first, first_docs), (second, second_docs) = pack_samples(docs[:2]), pack_samples(docs[2:])
    documents = [first_docs, second_docs]
    packed = collate([first, second], 0, buckets=[48])
    results = []
    for batch, docs_ in ((unpacked, None), (packed, documents)):
        mb = prepare_microbatch(batch["tokens"], batch["loss_mask"], cfg,
                                torch.Generator().manual_seed(0), attention, 1, batch["lengths"],
                                documents=docs_)
        results.append(_loss_and_grads(module, mb, 0.5))
    (loss, weight, grads), (packed_loss, packed_weight, packed_grads) = results
    assert abs(weight - packed_weight) <= 1e-4 and abs(loss - packed_loss) <= TOL
    for n, g in grads.items():
        assert (g - packed_grads[n]).abs().max() <= TOL, n


def test_pack_sequences_refuses_context_parallelism(target, data, capsys):
    with pytest.raises(SystemExit):
        parse_plan(flags(target, data[0], pack_sequences=True, context_parallel_size=2),
                   world_size=2)
    assert "--pack-sequences does not combine with --context-parallel-size=2" in \
        capsys.readouterr().err
