"""DFlash2 drafts: equal to the z-lab reference `DFlash2DraftModel` (fp32, both directions of the
weight conversion), a fresh one equal to its DFlash backbone, the selector objective equal to a
hand computation on whole logits, and the reference format (strict keys, bit-exact round trip,
lossless speculative decoding with the same τ as the reference loop)."""
import json

import pytest
import torch
import torch.nn.functional as F
from dflash.model import DFlash2DraftModel

from megatron_dflash import state_dict_adapter
from megatron_dflash.draft_export import export_checkpoint
from megatron_dflash.draft_import import import_reference
from megatron_dflash.evaluate import build_decoder
from megatron_dflash.head_loss import vocab_head_loss
from tests.dflash2_testing import (DFLASH2, SCALES, dflash2_config, file_tensors,
                                   load_file_tensors, reference_dflash2)
from tests.dflash_testing import (build_draft, dflash_config, draft_inputs, head_only_target,
                                  head_state, load_params, params, randomize_, target_config)
from tests.interop_testing import (assert_trained_export_decodes_like_reference, random_prompts,
                                   reference_tensors, same_bytes, target_dir, write_reference_dir)


def _block(inputs, j, block_size, seq_len):
    """Block j's queries and its keys [context ; block j] of packed `draft_inputs`."""
    q = slice(j * block_size, (j + 1) * block_size)
    kv = torch.cat([torch.arange(seq_len), seq_len + torch.arange(q.start, q.stop)])
    return q, kv


def _reference_block(ref, head, inputs, j, cfg, seq_len):
    """The reference's final-norm hidden states of block j alone, as at inference (its
    convolution sees one block), with our packed mask's row for it."""
    q, kv = _block(inputs, j, cfg.block_size, seq_len)
    emb = F.embedding(inputs["block_input_ids"][:, q], head["embedding"])
    emb = emb * cfg.input_embedding_scale
    with torch.no_grad():
        return ref(position_ids=inputs["position_ids"][:, kv], noise_embedding=emb,
                   attention_mask=~inputs["attention_mask"][:, :, q][..., kv],
                   target_hidden=inputs["features"].transpose(0, 1))


def test_dflash2_matches_reference(utils):
    """Random weights through the reference file names into our draft: every block's hidden
    states, logits (output multiplier, softcap, embedding scale), teacher-forced selector scores
    and greedy path equal the reference's; the weights go back to the reference bit-exactly."""
    utils.initialize_model_parallel(1)
    tcfg, seq_len = target_config(), 48
    cfg = dflash_config(tcfg, block_size=8, num_anchors=5, **DFLASH2, **SCALES)
    target = head_only_target()
    ref = reference_dflash2(cfg, seed=1)
    hf = file_tensors(ref)
    draft = build_draft(tcfg, cfg, target).eval()
    load_params(draft, state_dict_adapter.hf_to_megatron(hf, cfg))
    back = state_dict_adapter.megatron_to_hf(params(draft), cfg)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    load_file_tensors(reference_dflash2(cfg, seed=9), back)  # strict: no missing or extra key

    inputs = draft_inputs(cfg, batch=2, seq_len=seq_len, seed=2)
    assert inputs["keep"].all()
    with torch.no_grad():
        hidden = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                       inputs["position_ids"], return_hidden=True)
        logits = draft.logits(hidden)
    head, selector = head_state(target), draft.candidate_selector
    output_head = lambda h: h @ head["output"].t()  # noqa: E731
    changed = 0
    for j in range(inputs["anchors"].shape[1]):
        q, _ = _block(inputs, j, cfg.block_size, seq_len)
        theirs = _reference_block(ref, head, inputs, j, cfg, seq_len)
        assert (hidden[q].transpose(0, 1) - theirs).abs().max() < 1e-5
        their_logits = ref.compute_logits(theirs, output_head)
        assert (logits[q].transpose(0, 1) - their_logits).abs().max() < 1e-5
        for b in range(2):
            anchor = inputs["block_input_ids"][b, q.start:q.start + 1]
            mine = draft.propose(hidden[q][1:, b:b + 1], anchor)
            path, candidates, _ = ref.propose(theirs[b:b + 1, 1:], anchor, output_head, 0.0)
            assert torch.equal(mine, path[0])
            changed += int(not torch.equal(path[0], their_logits[b, 1:].argmax(-1)))
            # Teacher-forced scores of every slot, compared as token -> score maps.
            predecessors = inputs["labels"][b, q][:-1]  # slot 0's label is the anchor token
            with torch.no_grad():
                values, ids = selector.candidates(logits[q][1:, b])
                scores = values + selector.transitions(hidden[q][1:, b], predecessors, ids)
                cs = ref.candidate_selector
                reference_scores = their_logits[b, 1:].gather(-1, candidates[0]) + torch.einsum(
                    "kr,kjr->kj", cs.predecessor_codebook(predecessors)
                    * cs.hidden_projection(theirs[b, 1:]), cs.successor_codebook(candidates[0]))
            order, their_order = ids.argsort(-1), candidates[0].argsort(-1)
            assert torch.equal(ids.gather(-1, order), candidates[0].gather(-1, their_order))
            assert (scores.gather(-1, order)
                    - reference_scores.gather(-1, their_order)).abs().max() < 1e-5
    assert changed > 0  # the selector does change some paths from the unary argmax


def test_fresh_dflash2_is_its_dflash_backbone(utils):
    """Identity convolutions and a zero successor codebook: a freshly built DFlash2 draft gives
    its DFlash backbone's logits and proposes the unary argmax."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg2 = dflash_config(tcfg, block_size=8, num_anchors=4, **DFLASH2)
    cfg1 = dflash_config(tcfg, block_size=8, num_anchors=4)
    target = head_only_target()
    torch.manual_seed(4)
    draft2 = build_draft(tcfg, cfg2, target).eval()
    draft1 = build_draft(tcfg, cfg1, target).eval()
    backbone = params(draft1)
    with torch.no_grad():
        randomize_(draft1, seed=5)
        for name, p in draft2.named_parameters():
            if name in backbone:
                p.copy_(dict(draft1.named_parameters())[name])
    inputs = draft_inputs(cfg1, batch=1, seq_len=40, seed=6)
    with torch.no_grad():
        h1, h2 = (d(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                    inputs["position_ids"], return_hidden=True) for d in (draft1, draft2))
    assert torch.equal(h1, h2)
    anchor = inputs["block_input_ids"][0, :1]
    assert torch.equal(draft1.propose(h1[1:8], anchor), draft2.propose(h2[1:8], anchor))


def _hand_selector_loss(logits, rows, selector, labels, weights, predecessors, top_k, alpha):
    """Σ w·(CE + α·selector CE) on whole logits [M, V] (TP=1), gold injected over the lowest
    candidate when missing; and the selector's choice over the true top-K."""
    values, ids = logits.topk(top_k, dim=-1)
    found = (ids == labels[:, None]).any(1)
    ids_in = torch.where(found[:, None], ids, torch.cat([ids[:, :-1], labels[:, None]], 1))
    values_in = torch.where(found[:, None], values,
                            torch.cat([values[:, :-1], logits.gather(1, labels[:, None])], 1))
    context = (selector.predecessor_codebook.weight[predecessors]
               * (rows @ selector.hidden_projection.weight.t()))
    succ = selector.successor_codebook.weight
    scores = values_in + torch.einsum("mr,mkr->mk", context, succ[ids_in])
    gold = (ids_in == labels[:, None]).long().argmax(1)
    loss = (weights * (F.cross_entropy(logits, labels, reduction="none")
                       + alpha * F.cross_entropy(scores, gold, reduction="none"))).sum()
    true_scores = values + torch.einsum("mr,mkr->mk", context, succ[ids])
    return loss, ids.gather(1, true_scores.argmax(1, keepdim=True))[:, 0], found


@pytest.mark.parametrize("chunk_rows,alpha", [(7, 1.0), (1000, 0.5), (7, 0.0)])
def test_selector_loss_equals_hand_computation(utils, chunk_rows, alpha):
    """The chunked head loss with the selector: loss, draft tokens and the gradients of the rows
    and of every selector weight equal autograd through whole logits; α = 0 is the DFlash loss."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=8, **DFLASH2, selector_loss_weight=alpha)
    draft = build_draft(tcfg, cfg, head_only_target())
    randomize_(draft, seed=7)
    selector = draft.candidate_selector
    with torch.no_grad():
        selector.successor_codebook.weight.normal_(generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    weight = 0.3 * torch.randn(256, 64, generator=g)
    rows = torch.randn(40, 64, generator=g, requires_grad=True)
    labels = torch.randint(0, 256, (40,), generator=g)
    labels[::2] = (rows @ weight.t()).argmax(-1)[::2]  # half of the golds among the candidates
    weights, predecessors = torch.rand(40, generator=g), torch.randint(0, 256, (40,), generator=g)

    loss, tokens, _ = vocab_head_loss(rows, weight, labels, weights, chunk_rows=chunk_rows,
                                      selector=selector, predecessors=predecessors,
                                      selector_weight=alpha)
    loss.backward()
    mine = {"rows": rows.grad.clone()} | {n: p.grad.clone() for n, p in selector.named_parameters()}
    rows.grad = None
    selector.zero_grad()
    expected, choice, found = _hand_selector_loss(rows @ weight.t(), rows, selector, labels,
                                                  weights, predecessors, cfg.selector_top_k, alpha)
    expected.backward()
    assert found.any() and not found.all()
    assert abs(loss.item() - expected.item()) < 1e-4 and torch.equal(tokens, choice)
    theirs = {"rows": rows.grad} | {n: p.grad for n, p in selector.named_parameters()}
    for name, grad in theirs.items():
        assert (mine[name] - grad).abs().max() < 1e-5, name
    if alpha == 0:
        plain, _, _ = vocab_head_loss(rows, weight, labels, weights, chunk_rows=chunk_rows)
        assert abs(plain.item() - loss.item()) < 1e-5


def test_reference_written_dflash2_round_trips_bit_exactly(utils, tmp_path):
    """A DFlash2 draft saved by the reference's own `save_pretrained` (which writes the codebooks
    with `.weight`) imports, and exports the same tensors under the format's names (codebooks
    without it) and the same config keys; the export loads in `DFlash2DraftModel.from_pretrained`
    with no missing or unexpected key."""
    utils.initialize_model_parallel(1)
    ref = reference_dflash2(dflash2_config(), seed=11)
    ref.save_pretrained(tmp_path / "ref")
    import_reference(str(tmp_path / "ref"), str(tmp_path / "ckpt"))
    out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    before, after = file_tensors(ref), reference_tensors(out)
    assert sorted(before) == sorted(after) and all(same_bytes(before[k], after[k]) for k in before)
    assert "candidate_selector.successor_codebook" in after
    original, exported = (json.loads((p / "config.json").read_text())
                          for p in (tmp_path / "ref", tmp_path / "out"))
    assert exported["architectures"] == ["DFlash2DraftModel"]
    assert {k: exported["dflash_config"][k] for k in original["dflash_config"]} \
        == original["dflash_config"]
    loaded, info = DFlash2DraftModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, after[k]) for k, v in file_tensors(loaded).items())


def test_trained_dflash2_export_decodes_losslessly_with_the_reference_tau(utils, tmp_path,
                                                                          monkeypatch):
    """A DFlash2 draft trained 30 steps with the training step's own loss (selector included) on
    the target's greedy continuations, saved and exported: the export loads in the reference
    with strict keys; our speculative decoding with it equals target-only greedy decoding, and
    every request's acceptance lengths (so τ) equal the reference loop's (`dflash_generate`,
    HF target) on the same prompts."""
    utils.initialize_model_parallel(1)
    cfg = dflash2_config()
    target = target_dir(tmp_path / "target", seed=3)
    decoder = build_decoder(target, write_reference_dir(
        tmp_path / "draft", cfg, file_tensors(reference_dflash2(cfg, seed=4))))
    assert_trained_export_decodes_like_reference(
        tmp_path, monkeypatch, target, decoder, random_prompts(4, seed=5),
        torch.Generator().manual_seed(6), DFlash2DraftModel)
