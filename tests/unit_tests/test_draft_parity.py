"""Our megatron draft == the z-lab reference `dflash.model.DFlashDraftModel` (dflash==0.1.0)."""
import pytest
import torch
import torch.nn.functional as F

from tests.dflash_testing import (HIDDEN, VOCAB, build_draft, dflash_config, draft_inputs,
                            head_only_target, head_state, load_params, randomize_,
                            target_config)
from tests.interop_testing import reference_model
from megatron_dflash import state_dict_adapter


def reference_logits(ref, head, inputs):
    emb = F.embedding(inputs["block_input_ids"], head["embedding"])
    hidden = ref(position_ids=inputs["position_ids"], attention_mask=~inputs["attention_mask"],
                 noise_embedding=emb, target_hidden=inputs["features"].transpose(0, 1))
    return hidden @ head["output"].t()


@pytest.mark.parametrize("block_size,anchors", [(16, 4), (8, 6)])
def test_draft_matches_reference(utils, block_size, anchors):
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, block_size=block_size, num_anchors=anchors)
    target = head_only_target()
    ref = reference_model(cfg, seed=1)
    draft = build_draft(tcfg, cfg, target)
    load_params(draft, state_dict_adapter.hf_to_megatron(ref.state_dict(), cfg))
    inputs = draft_inputs(cfg, batch=2, seq_len=48, seed=2)
    assert inputs["anchors"].shape[1] == anchors and inputs["keep"].all()

    ours = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                 inputs["position_ids"]).transpose(0, 1)
    with torch.no_grad():
        theirs = reference_logits(ref, head_state(target), inputs)
    assert ours.shape == theirs.shape == (2, anchors * block_size, VOCAB)
    assert (ours - theirs).abs().max() < 1e-5


def test_packed_block_equals_block_alone(utils):
    """A block gives the same logits trained alone or packed with 31 others (mask isolation)."""
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg, num_anchors=32)
    draft = build_draft(tcfg, cfg, head_only_target())
    randomize_(draft, seed=3)
    S = 96
    inputs = draft_inputs(cfg, batch=1, seq_len=S, seed=4)
    assert inputs["anchors"].shape[1] == 32 and inputs["keep"].all()
    packed = draft(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                   inputs["position_ids"])
    B = cfg.block_size
    for j in range(inputs["anchors"].shape[1]):
        q = slice(j * B, (j + 1) * B)
        kv = torch.cat([torch.arange(S), S + torch.arange(j * B, (j + 1) * B)])
        alone = draft(inputs["block_input_ids"][:, q], inputs["features"],
                      inputs["attention_mask"][:, :, q][..., kv], inputs["position_ids"][:, kv])
        assert (alone - packed[q]).abs().max() < 1e-5


def test_round_trip_reference_names(utils):
    utils.initialize_model_parallel(1)
    tcfg = target_config()
    cfg = dflash_config(tcfg)
    ref = reference_model(cfg, seed=5)
    hf = ref.state_dict()
    back = state_dict_adapter.megatron_to_hf(state_dict_adapter.hf_to_megatron(hf, cfg), cfg)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    assert len(hf) == 3 + 11 * cfg.num_draft_layers and HIDDEN == cfg.hidden_size
