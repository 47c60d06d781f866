"""Qwen3-Next / Qwen3.5-MoE (gated-delta-net hybrids) at every layout a world of two holds, and
TP2 x EP2 with the experts split over TP in a world of four: logits and the taps of linear and
full layers equal the one-process import (<= 1e-5, fp32); at TP2, greedy decoding without a KV
cache gives the one-process tokens and taps, and 20 DFlash training steps (with sequence
parallelism) the one-process losses and grad norms. Run with
`torchrun --nproc-per-node 2 (and 4) -m pytest tests/distributed/test_qwen_hybrid_layouts.py`.

Layers alternate linear / full attention, so each pipeline stage holds both kinds and the stage
boundary lies between a full layer and a linear one. megatron splits the GDN heads, the gated
attention's query groups and the experts (EP2: data-parallel ranks hold different tokens, which
travel to the other rank's experts; TP2 x EP2 in two ranks: the expert-parallel group inside
the tensor-parallel one, experts whole; in four: each expert split over TP).
"""
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tests.layout_testing import Utils
from tests.dflash_testing import pattern_dataset
from tests.pipeline_testing import (STEPS, TAPS, assert_layout_equals, assert_same_trajectory,
                                    flags, started_references, trajectory)
from tests.qwen_hybrid_testing import hybrid_target_dir
from megatron_dflash.generation import BatchGenerator
from megatron_dflash.synthetic import VOCAB
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)

TOL = 1e-5
ALTERNATING = ["linear_attention", "full_attention"] * 2
TARGETS = ("qwen3_next", "qwen3_5_moe")  # grouped and split GDN projections; both MoE
LAYOUTS = {  # name: (world, layout)
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "pp2": (2, dict(pp=2)),
    "ep2": (2, dict(ep=2)),
    "tp2ep2_etp1": (2, dict(tp=2, ep=2, etp=1)),
    "tp2ep2": (4, dict(tp=2, ep=2)),
}
TRAINING = dict(tensor_model_parallel_size=2, sequence_parallel=True)


@pytest.fixture(scope="module")
def shared():
    path = [tempfile.mkdtemp(prefix="dflash_hybrid_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    if dist.get_rank() == 0:
        for kind in TARGETS:
            hybrid_target_dir(os.path.join(path[0], kind), kind, layer_types=ALTERNATING)
        pattern_dataset(os.path.join(path[0], "data"), 24, 48, seed=48)
    dist.barrier()
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0])


def _train_flags(shared, **kw):
    return flags(os.path.join(shared, "qwen3_5_moe"), os.path.join(shared, "data"), **kw)


@pytest.fixture(scope="module", autouse=True)
def train_reference(shared):
    """The one-process trajectory, started with the module so it runs beside the target tests
    (in the world of two that trains)."""
    if dist.get_world_size() != 2:
        yield None
        return
    with started_references(shared, {"one": (_train_flags(shared), STEPS)}) as refs:
        yield refs


def _tokens(dp_rank):
    g = torch.Generator().manual_seed(100 + dp_rank)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


def _import(path, **layout):
    hf = load_hf_config(path)
    model = build_target(hf, target_transformer_config(hf, **layout))
    load_hf_weights(model, path)
    return model


def _decode(model):
    """Greedy decoding without a KV cache (the engine regeneration and evaluation run) of two
    prompts of different lengths in one batch, with their taps."""
    prompts = [_tokens(0)[0, :5].tolist(), _tokens(1)[0, :9].tolist()]
    return BatchGenerator(model, [], layer_ids=TAPS).generate(prompts, 6)


@pytest.fixture(scope="module")
def references(shared):
    """The one-process import's (logits, taps) of both data-parallel ranks' tokens, and its
    greedy decoding."""
    Utils.initialize_model_parallel(1, 1)
    out = {}
    for kind in TARGETS:
        model = _import(os.path.join(shared, kind))
        for dp in range(2):
            with FeatureCapture(model, TAPS) as capture:
                out[kind, dp] = target_forward(model, _tokens(dp), None, capture)
    out["decoded"] = _decode(model)
    Utils.destroy_model_parallel()
    return out


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.world(world))
                                    for name, (world, _) in LAYOUTS.items()])
@pytest.mark.parametrize("kind", TARGETS)
def test_layout_equals_one_process(kind, layout, shared, references):
    spec = dict(tp=1, pp=1, ep=1, etp=None, sp=False) | LAYOUTS[layout][1]
    Utils.initialize_model_parallel(spec["tp"], spec["pp"], ep=spec["ep"], etp=spec["etp"])
    model = _import(os.path.join(shared, kind), tensor_parallel_size=spec["tp"],
                    sequence_parallel=spec["sp"], pipeline_parallel_size=spec["pp"],
                    expert_model_parallel_size=spec["ep"],
                    expert_tensor_parallel_size=spec["etp"])
    dp = parallel_state.get_data_parallel_rank()
    # At PP2 stage 0 holds [linear, full] (tap 0), stage 1 the other two (taps 2, 3).
    assert_layout_equals(model, spec, TAPS, (_tokens(dp), None), *references[kind, dp],
                         first_stage_taps=1)
    Utils.destroy_model_parallel()


@pytest.mark.world(2)
def test_decoding_at_tp2_equals_one_process(shared, references):
    Utils.initialize_model_parallel(2, 1)
    decoded = _decode(_import(os.path.join(shared, TARGETS[-1]), tensor_parallel_size=2))
    for mine, ref in zip(decoded, references["decoded"], strict=True):
        assert mine.tokens == ref.tokens
        assert (mine.features - ref.features).abs().max() <= TOL
    Utils.destroy_model_parallel()


@pytest.mark.world(2)
def test_training_at_tp2_equals_one_process(shared, train_reference):
    got = trajectory(_train_flags(shared, **TRAINING))
    reference = train_reference.get("one")
    assert_same_trajectory(got, reference)
    assert reference["loss"][-1] < 0.95 * reference["loss"][0]
