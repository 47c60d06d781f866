"""Context parallelism on gloo (megatron_dflash/context_parallel.py), world 2:

* the local backend's CP attention (targets/sdpa_attention.py) on a gpt-oss target — sliding
  windows that cross the chunks' boundaries, attention sinks, YaRN, MoE: every rank's logits and
  taps (its chunks, gathered back into sequence order) equal the one-process import, and the
  attention's gradients w.r.t. each rank's q/k/v equal the whole attention's;
* the offline feature cache written at CP2 holds the one-process taps, and training from it at
  CP2 equals training from it at CP1 (DP2);
* tools/measure_memory.py at CP2: every CP rank holds the whole target and draft and half of
  the draft's Adam state, exactly the analytic model's static bytes (megatron_dflash/
  step_memory.py).

The 20-step trajectories at CP2, CP4, CP2 x TP2 + SP and CP2 x PP2 are tests/distributed/
test_pipeline.py's layouts (its single-process reference), CP2 x EP2 test_moe_ep.py's.
"""
import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType

from megatron_dflash import step_memory
from megatron_dflash.context_parallel import gather_sequence, local_positions, target_inputs
from megatron_dflash.distributed import init_distributed
from megatron_dflash.feature_cache import FeatureCacheDataset, cache_manifest
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)
from megatron_dflash.targets.sdpa_attention import SDPACoreAttention
from megatron_dflash.training.pretrain import parse_plan
from tests.dflash_testing import pattern_dataset, tiny_target_dir
from tests.families_testing import gpt_oss_config, perturbed_model
from tests.interop_testing import shared_tmp_dir, tool
from tests.pipeline_testing import TOL, flags, trajectory

TAPS, CP = [0, 2, 3], 2
pytestmark = pytest.mark.world(2)


@pytest.fixture(scope="module")
def shared():
    with shared_tmp_dir() as path:
        if dist.get_rank() == 0:
            perturbed_model(gpt_oss_config()).save_pretrained(os.path.join(path, "gpt_oss"))
            tiny_target_dir(os.path.join(path, "target"), layers=4)
            pattern_dataset(os.path.join(path, "data"), 8, 42, seed=3)  # padded to 44 at CP2
        dist.barrier()
        yield path


def _import(path, cp):
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf, context_parallel_size=cp))
    load_hf_weights(model, path)
    return model


def test_gpt_oss_target_equals_one_process(shared, utils):
    """Windows of 8 over chunks of 8 (32 tokens at CP2): every rank's queries see keys of the
    other rank's chunks, at their global positions."""
    path = os.path.join(shared, "gpt_oss")
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(32).expand(2, 32)
    utils.initialize_model_parallel(1, 1)
    ref = _import(path, 1)
    with FeatureCapture(ref, TAPS) as capture:
        ref_logits, ref_features = target_forward(ref, tokens, positions, capture)

    utils.initialize_model_parallel(1, 1, cp=CP)
    model = _import(path, CP)
    cp_group = parallel_state.get_context_parallel_group()
    with FeatureCapture(model, TAPS) as capture:
        logits, features = target_forward(model, *target_inputs(tokens, positions, cp_group),
                                          capture)
    assert features.shape[0] == 32 // CP
    logits = gather_sequence(logits.transpose(0, 1), cp_group).transpose(0, 1)
    assert (logits - ref_logits).abs().max() <= TOL
    assert (gather_sequence(features, cp_group) - ref_features).abs().max() <= TOL


def _mine(t: torch.Tensor, cp_group) -> torch.Tensor:
    """This CP rank's rows of [S, ...] (megatron's split)."""
    return t.index_select(0, local_positions(t.shape[0] // CP, cp_group, t.device))


def test_attention_gradients_equal_the_whole_attention(shared, utils):
    """The gathered K/V's gradients are reduce-scattered back: each rank's q/k/v gradients are
    the whole attention's at its rows (causal, gpt-oss's window of 8 and sinks)."""
    utils.initialize_model_parallel(1, 1, cp=CP)
    hf = load_hf_config(os.path.join(shared, "gpt_oss"))
    cp_group = parallel_state.get_context_parallel_group()
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(32, 2, heads, 32, generator=g) for heads in (4, 2, 2)]
    out_grad = torch.randn(32, 2, 4 * 32, generator=g)
    grads = []
    for cp in (1, CP):
        attention = SDPACoreAttention(target_transformer_config(hf, context_parallel_size=cp),
                                      layer_number=1, attn_mask_type=AttnMaskType.causal,
                                      attention_type="self")
        assert attention.window is not None
        with torch.no_grad():
            attention.softmax_offset.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        leaves = [t.clone().requires_grad_() for t in qkv]
        split = (lambda t: t) if cp == 1 else (lambda t: _mine(t, cp_group))
        attention(*map(split, leaves), attention_mask=None).backward(split(out_grad))
        grads.append([_mine(t.grad, cp_group) for t in leaves])
    for whole, mine in zip(*grads, strict=True):
        assert (whole - mine).abs().max() <= TOL


def test_offline_feature_cache(shared, utils):
    """The cache written at CP2 holds the one-process taps; training from it at CP2 equals
    training from it at CP1 (DP2)."""
    target, cache = os.path.join(shared, "target"), os.path.join(shared, "cache")
    argv = flags(target, [os.path.join(shared, "data")], offline_features=cache,
                 distill_weight=0, seq_length=42, seq_length_buckets=1, global_batch_size=4)
    at_cp2 = trajectory(argv + ["--context-parallel-size", str(CP)], steps=3)
    utils.initialize_model_parallel(1, 1)
    ref = _import(target, 1)
    dataset = FeatureCacheDataset(cache, cache_manifest(target, TAPS, 42, "fp32"))
    for i in range(len(dataset)):
        sample = dataset[i]
        tokens = sample["tokens"][None]
        with FeatureCapture(ref, TAPS) as capture:
            _, expected = target_forward(ref, tokens, torch.arange(tokens.shape[1])[None], capture)
        assert (sample["features"] - expected[:, 0]).abs().max() <= TOL
    at_cp1 = trajectory(argv, steps=3)
    assert max(abs(a - b) for a, b in zip(at_cp2["loss"], at_cp1["loss"], strict=True)) <= TOL
    for mine, theirs in zip(at_cp2["grad_norms"][0], at_cp1["grad_norms"][0], strict=True):
        assert abs(mine - theirs) <= TOL


def test_memory_accounting(shared, utils):
    utils.destroy_model_parallel()
    plan = parse_plan(flags(os.path.join(shared, "target"), [os.path.join(shared, "data")],
                            seq_length=42, global_batch_size=2, train_iters=1,
                            context_parallel_size=CP))
    init_distributed(plan.run.parallel, plan.run.training.seed)
    measure_memory = tool("measure_memory")
    row = measure_memory.measure(plan)
    model = step_memory.step_memory(measure_memory.shapes_of(plan), step_memory.Layout(cp=CP),
                                    44, plan.dflash.num_anchors, plan.dflash.block_size,
                                    bf16=False, distill=True)
    rows = [None] * CP
    dist.all_gather_object(rows, row)
    assert all(r["target"] == model["target weights"] for r in rows)
    assert all(2 * r["draft"] == model["draft weights, grads"] for r in rows)  # fp32 + fp32
    assert all(0 <= r["grads"] - r["draft"] < 1024 for r in rows)  # DDP pads its buffer
    assert sum(r["optimizer"] for r in rows) == CP * model["optimizer shard"]
