"""The draft at TP=2 (with and without sequence parallel, dense or sparse block attention, full
or sliding-window layers) reproduces the dense TP=1 draft: logits and every parameter gradient
after megatron DDP + finalize_model_grads, fp32, <= 1e-5."""
import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)

from tests.dflash_testing import (all_gather, build_draft, dflash_config, draft_inputs, head_only_target,
                            head_state, load_head_shard, load_params, params, randomize_,
                            target_config, weighted_loss)
from megatron_dflash import state_dict_adapter
from tests import weights_testing
from megatron_dflash.sparse_attention import dflash_block_mask


# A causal sliding-window layer (window 20 < the 48-token context) and a full one.
SLIDING = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=20)


@pytest.mark.world(2)
@pytest.mark.parametrize("sp,attention,layers", [
    (False, "dense", {}), (True, "dense", {}), (True, "sparse", {}), (True, "sparse", SLIDING)],
    ids=["tp2", "tp2-sp", "tp2-sp-sparse", "tp2-sp-sparse-sliding"])
def test_draft_tp2_equals_tp1(utils, sp, attention, layers):
    # Reference: TP=1, computed locally on every rank.
    utils.initialize_model_parallel(1)
    tcfg1 = target_config()
    cfg1 = dflash_config(tcfg1, **layers)
    target1 = head_only_target()
    draft1 = build_draft(tcfg1, cfg1, target1)
    randomize_(draft1, seed=7)
    inputs = draft_inputs(cfg1, batch=2, seq_len=48, seed=8)
    logits1 = draft1(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                     inputs["position_ids"])
    loss1 = weighted_loss(logits1, inputs)
    loss1.backward()
    full_weights = params(draft1)
    grads1 = {n: p.grad.clone() for n, p in draft1.named_parameters()}
    head = head_state(target1)

    utils.initialize_model_parallel(2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    tcfg2 = target_config(tp=2, sp=sp)
    cfg2 = dflash_config(tcfg2, **layers)
    target2 = head_only_target(tp=2, sp=sp)
    load_head_shard(target2, head, rank, 2)
    draft2 = build_draft(tcfg2, cfg2, target2, attention=attention)
    load_params(draft2, state_dict_adapter.shard(full_weights, cfg2, rank, 2))
    ddp = DistributedDataParallel(config=draft2.config, module=draft2,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    features = inputs["features"].chunk(2)[rank] if sp else inputs["features"]
    mask = (inputs["attention_mask"] if attention == "dense" else
            dflash_block_mask(inputs["anchors"], inputs["keep"], 48, cfg2.block_size,
                              cfg2.layer_attentions()))
    logits2 = ddp(inputs["block_input_ids"], features, mask, inputs["position_ids"])
    assert logits2.shape[-1] == logits1.shape[-1] // 2
    full_logits = torch.cat(all_gather(logits2.detach(), tp_group), dim=-1)
    assert (full_logits - logits1).abs().max() < 1e-5
    loss2 = weighted_loss(logits2, inputs)
    assert abs(loss2.item() - loss1.item()) < 1e-5
    loss2.backward()
    finalize_model_grads([ddp])
    local = {n: p.main_grad for n, p in draft2.named_parameters()}
    gathered = zip(*(all_gather(g, tp_group) for g in local.values()))
    shards = [dict(zip(local, parts)) for parts in gathered]
    grads2 = weights_testing.gather(shards)
    assert sorted(grads2) == sorted(grads1)
    for name, g in grads1.items():
        assert g.abs().max() > 0, name
        assert (grads2[name] - g).abs().max() < 1e-5, name
