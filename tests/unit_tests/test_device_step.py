"""What the training step needs on a GPU, checked on the CPU: micro-batches that can be pinned,
and a step (forward and backward, through megatron's schedule) that never waits for the device."""
import pytest
import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.nn.attention.flex_attention import create_block_mask

from megatron_dflash import sparse_attention
from megatron_dflash.sparse_attention import build_flex_block_mask
from megatron_dflash.synthetic import dflash_config, target_config
from megatron_dflash.training.prefetch import Prefetcher, check_pinnable, microbatch_tensors
from megatron_dflash.training.step import global_weight_sum, make_forward_step, prepare_microbatch
from tests.dflash_testing import tiny_target_dir
from tests.step_testing import step_modules, step_tokens
from tests.sync_testing import record_host_syncs


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("block_multiple", [1, 16])
@pytest.mark.parametrize("offline", [False, True])
def test_every_microbatch_tensor_can_be_pinned(batch, attention, block_multiple, offline):
    """`pin_memory()` copies a tensor into pinned storage of the tensor's own strides, which
    `copy_` refuses when elements share memory (an expand's stride 0): every tensor of a
    micro-batch, the sparse mask's and the offline features included, is contiguous."""
    cfg = dflash_config(target_config(), block_size=4, num_anchors=5)
    tokens, loss_mask = step_tokens(seq_len=24, batch=batch)
    features = torch.randn(batch, 24, len(cfg.target_layer_ids) * 64) if offline else None
    mb = prepare_microbatch(tokens, loss_mask, cfg, torch.Generator().manual_seed(0), attention,
                            block_multiple, torch.full((batch,), 24), features)
    tensors = microbatch_tensors(mb)
    assert ("features" in tensors) == offline
    if attention == "sparse":
        assert {"attention_mask.anchors", "attention_mask.keep"} <= set(tensors)
    for name, t in tensors.items():
        assert t.is_contiguous() and torch._debug_has_internal_overlap(t) == 0, name
        pinned = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)  # as pinning
        assert torch.equal(pinned, t), name
    check_pinnable(mb)


def test_prefetcher_refuses_a_tensor_it_could_not_pin():
    expanded = {"position_ids": torch.arange(6).expand(2, 6)}
    with pytest.raises(ValueError, match=r"position_ids \(2, 6\) strides \(0, 1\)"):
        check_pinnable(expanded)
    with Prefetcher(lambda: (expanded, 0), torch.device("cpu")) as ahead, \
            pytest.raises(ValueError, match="position_ids"):
        ahead.next()


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target"), layers=4)


@pytest.mark.parametrize("attention,alpha,draft", [
    ("dense", 0.0, {}), ("sparse", 0.5, {}),
    ("dense", 0.5, dict(draft_variant="dflash2", selector_rank=8, selector_top_k=5,
                        final_logit_softcapping=20.0))], ids=["dense", "sparse", "dflash2"])
def test_training_step_never_waits_for_the_device(utils, target_dir, monkeypatch, attention,
                                                  alpha, draft):
    """No op of the step reads device data on the host (`tests/sync_testing.py`): on CUDA each
    would stall the launch queue between forward and backward on every micro-batch (a DFlash2
    draft's selector objective included: its top-K, codebook lookups and gold injection run on
    the device). Preparation
    (the prefetch thread, on CPU tensors) may; so may `global_weight_sum`, once per optimizer
    step before the schedule (the optimizer step reads the grad norm on the host anyway)."""
    utils.initialize_model_parallel(1)
    module, cfg = step_modules(target_dir, attention=attention, **draft)
    # Wrapped as training wraps it: megatron DDP, whose gradient reduction the schedule finishes.
    model = DistributedDataParallel(
        config=module.config, module=module,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=True))
    module.config.no_sync_func, module.config.finalize_model_grads_func = (model.no_sync,
                                                                          finalize_model_grads)
    microbatches = [prepare_microbatch(*step_tokens(seed=i), cfg, torch.Generator().manual_seed(i),
                                       attention, 16) for i in range(2)]
    scale = len(microbatches) / global_weight_sum(microbatches, None)
    # The CPU gather attention chunks its blocks by their context prefixes, a shape read on the
    # host: on CPU tensors, where nothing waits. CUDA runs FlexAttention instead, checked below.
    prefixes = sparse_attention.chunk_prefixes

    def on_the_host(*args):
        with syncs.paused():
            return prefixes(*args)
    monkeypatch.setattr(sparse_attention, "chunk_prefixes", on_the_host)
    with record_host_syncs() as syncs:
        reports = get_forward_backward_func()(
            forward_step_func=make_forward_step(cfg, alpha, scale, chunk_rows=16),
            data_iterator=iter(microbatches), model=[model], num_microbatches=2, seq_length=48,
            micro_batch_size=2, forward_only=False)
    assert not syncs.seen, "\n".join(syncs.seen)
    assert len(reports) == 2 and all(p.main_grad.any() for p in module.draft.parameters())
    if attention == "sparse":  # CUDA's path: its mask (compiled there; FlexAttention itself is
        with record_host_syncs() as syncs:  # a higher-order op, which no dispatch mode sees into)
            build_flex_block_mask(microbatches[0]["attention_mask"], create_block_mask)
        assert not syncs.seen, "\n".join(syncs.seen)
