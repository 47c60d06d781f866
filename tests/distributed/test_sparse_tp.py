"""Sparse block attention at TP=2 with sequence parallelism reproduces the dense TP=1 draft:
logits and every parameter gradient, fp32, <= 1e-5."""
import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.transformer.spec_utils import build_module

from dflash_testing import (all_gather, build_draft, dflash_config, draft_inputs, head_only_target,
                            head_state, weighted_loss,
                            load_head_shard, load_params, params, randomize_, target_config)
from megatron_dflash import state_dict_adapter
from megatron_dflash.config import draft_transformer_config
from megatron_dflash.model import target_head
from megatron_dflash.sparse_attention import dflash_block_mask
from megatron_dflash.specs import get_dflash_model_spec


@pytest.mark.world(2)
def test_sparse_tp2_sp_equals_dense_tp1(utils):
    utils.initialize_model_parallel(1)
    tcfg1 = target_config()
    cfg1 = dflash_config(tcfg1)
    target1 = head_only_target()
    draft1 = build_draft(tcfg1, cfg1, target1)
    randomize_(draft1, seed=7)
    inputs = draft_inputs(cfg1, batch=2, seq_len=48, seed=8)
    logits1 = draft1(inputs["block_input_ids"], inputs["features"], inputs["attention_mask"],
                     inputs["position_ids"])
    weighted_loss(logits1, inputs).backward()
    grads1 = {n: p.grad.clone() for n, p in draft1.named_parameters()}

    utils.initialize_model_parallel(2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    tcfg2 = target_config(tp=2, sp=True)
    cfg2 = dflash_config(tcfg2)
    target2 = head_only_target(tp=2, sp=True)
    load_head_shard(target2, head_state(target1), rank, 2)
    draft2 = build_module(get_dflash_model_spec(cfg2.num_draft_layers, "local", "sparse"),
                          config=draft_transformer_config(cfg2, tcfg2), dflash_config=cfg2)
    draft2.borrow_target_head(*target_head(target2))
    load_params(draft2, state_dict_adapter.shard(params(draft1), cfg2, rank, 2))
    ddp = DistributedDataParallel(
        config=draft2.config, module=draft2,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    mask = dflash_block_mask(inputs["anchors"], inputs["keep"], 48, cfg2.block_size)
    logits2 = ddp(inputs["block_input_ids"], inputs["features"].chunk(2)[rank], mask,
                  inputs["position_ids"])
    full_logits = torch.cat(all_gather(logits2.detach(), tp_group), dim=-1)
    assert (full_logits - logits1).abs().max() < 1e-5
    weighted_loss(logits2, inputs).backward()
    finalize_model_grads([ddp])
    local = {n: p.main_grad for n, p in draft2.named_parameters()}
    gathered = zip(*(all_gather(g, tp_group) for g in local.values()))
    shards = [dict(zip(local, parts)) for parts in gathered]
    grads2 = state_dict_adapter.gather(shards)
    for name, g in grads1.items():
        assert (grads2[name] - g).abs().max() < 1e-5, name
