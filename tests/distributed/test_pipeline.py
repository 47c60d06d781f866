"""Pipeline parallelism composed with TP, SP and DP, and context parallelism (CP2, CP4, CP2 x TP2
+ SP, CP2 x PP2): every layout trains exactly like one process.

* Taps on the first, a middle and the last stage reach the draft equal to the PP=1 capture, and
  the last stage's word-embedding replica equals the target's embedding (tied and untied).
* For the same weights, data and seed, every micro-batch loss, every step's loss and grad norm over
  a 20-step trajectory (after optimizer updates) equal the single-process run (<= 1e-5, fp32) —
  also with the sparse block attention against the dense single-process reference, and for a
  DFlash2 draft (convolutions, vocab-parallel selector) at PP2 and TP2+SP —
  and parameters replicated over TP stay bitwise identical. The reference is the same driver in a
  fresh single process.
* A checkpoint saved at TP2xPP2 resumes at TP1xPP1 and DP2 with the uninterrupted run's next
  loss, and checkpoints saved at TP1xPP1 and DP2 resume at TP2xPP2.
* Packed rows (--pack-sequences) at TP2xPP2 + SP train like one process: the document boundaries
  reach both stages, the THD payload crosses the stage boundary and its taps come back to the
  draft's sequence-parallel layout.

The data mixes two sequence lengths, so the pipeline payload's shape changes between micro-batches.
"""
import json
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)
from megatron_dflash.training.builders import build_training_chunk
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.step import prepare_microbatch
from megatron_dflash.training.trainer import run_schedule
from tests.dflash_testing import pattern_dataset, tiny_target_dir
from tests.pipeline_testing import (MASK, STEPS, TAPS, TOL, assert_same_trajectory, flags,
                                    started_references, trajectory)
from tests.training_testing import run_in_process
# A small DFlash2 draft; 3 anchors, so that under SP the blocks are padded to whole blocks per rank.
DFLASH2 = dict(draft_variant="dflash2", num_anchors=3, selector_rank=8, selector_top_k=5)
# 4 target layers: at PP4 the taps sit on stages 0 (first), 2 (middle) and 3 (last); stage 1 only
# passes them on. At PP2: stage 0 holds tap 0, stage 1 taps 2 and 3.
# Context parallelism (tests/distributed/test_context_parallel.py) composed with TP+SP and PP,
# against the same single-process reference.
CP_LAYOUTS = {
    2: {"cp2": dict(context_parallel_size=2)},
    4: {"cp4": dict(context_parallel_size=4),
        "cp2tp2_sp": dict(context_parallel_size=2, tensor_model_parallel_size=2,
                          sequence_parallel=True),
        "cp2pp2": dict(context_parallel_size=2, pipeline_model_parallel_size=2)},
}
LAYOUTS = {
    2: {"pp2": dict(pipeline_model_parallel_size=2), "tp2": dict(tensor_model_parallel_size=2),
        "pp2_dflash2": dict(pipeline_model_parallel_size=2, **DFLASH2),
        "tp2_sp_dflash2": dict(tensor_model_parallel_size=2, sequence_parallel=True, **DFLASH2),
        **CP_LAYOUTS[2]},
    4: {"pp4": dict(pipeline_model_parallel_size=4),
        "tp2pp2_sp": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                          sequence_parallel=True),
        "tp2pp2_sp_sparse": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 sequence_parallel=True, attention="sparse"),
        "tp2dp2": dict(tensor_model_parallel_size=2),
        "pp2dp2": dict(pipeline_model_parallel_size=2), **CP_LAYOUTS[4]},
}


@pytest.fixture(scope="module")
def shared():
    """One temporary directory for all ranks, holding the target and the data."""
    path = [tempfile.mkdtemp(prefix="dflash_pipeline_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    if dist.get_rank() == 0:
        tiny_target_dir(os.path.join(path[0], "target"), layers=4)
        tiny_target_dir(os.path.join(path[0], "tied"), layers=4)
        config = os.path.join(path[0], "tied", "config.json")
        with open(config) as f:
            tied = dict(json.load(f), tie_word_embeddings=True)
        with open(config, "w") as f:
            json.dump(tied, f)
        for name, count, length in (("long", 24, 48), ("short", 24, 32), ("tiny", 24, 16)):
            pattern_dataset(os.path.join(path[0], name), count, length, seed=length)
    dist.barrier()
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0])


def _data(shared):
    return [os.path.join(shared, "long"), os.path.join(shared, "short")]


def _packed_flags(shared):
    """Conversations of 48, 32 and 16 tokens packed into rows of 48; 8 steps."""
    return flags(os.path.join(shared, "target"), _data(shared) + [os.path.join(shared, "tiny")],
                 pack_sequences=True, train_iters=8)


def _taps01_flags(shared):
    return flags(os.path.join(shared, "target"), _data(shared), target_layer_ids=[0, 1],
                 distill_weight=0, train_iters=8)


@pytest.fixture(scope="module", autouse=True)
def references(shared):
    wanted = {"full": (flags(os.path.join(shared, "target"), _data(shared)), STEPS)}
    if dist.get_world_size() == 2:  # test_stage_past_the_deepest_tap_computes_no_layer
        wanted["taps01"] = (_taps01_flags(shared), 8)
        wanted["dflash2"] = (flags(os.path.join(shared, "target"), _data(shared), **DFLASH2),
                             STEPS)
    else:  # test_packed_rows_train_like_one_process
        wanted["packed"] = (_packed_flags(shared), 8)
    with started_references(shared, wanted) as refs:
        yield refs


@pytest.mark.parametrize("world,layout", [pytest.param(w, name, id=name, marks=pytest.mark.world(w))
                                          for w in LAYOUTS for name in LAYOUTS[w]])
def test_layout_equals_one_process(world, layout, shared, references):
    got = trajectory(flags(os.path.join(shared, "target"), _data(shared), **LAYOUTS[world][layout]))
    reference = references.get("dflash2" if layout.endswith("dflash2") else "full")
    assert got["lengths"] == [32, 48]  # the payload's shape changes between micro-batches
    assert_same_trajectory(got, reference)
    assert reference["loss"][-1] < 0.9 * reference["loss"][0]  # and it does train


@pytest.mark.world(2)
def test_stage_past_the_deepest_tap_computes_no_layer(shared, references):
    """Without distillation the target stops at its deepest tap: with taps on stage 0 only, the
    last stage of PP=2 holds no target layer (it passes the payload to the draft) and trains
    exactly like one process, whose target holds only the tapped layers 0-1."""
    got = trajectory(_taps01_flags(shared) + ["--pipeline-model-parallel-size", "2"], steps=8)
    reference = references.get("taps01")
    assert reference["target_layers"] == [2] and got["target_layers"] == [2, 0]
    assert max(abs(a - b) for a, b in zip(got["loss"], reference["loss"], strict=True)) <= TOL
    for norms in got["grad_norms"]:
        assert max(abs(a - b) for a, b in zip(norms, reference["grad_norms"][0], strict=True)) <= TOL


@pytest.mark.world(4)
def test_packed_rows_train_like_one_process(shared, references):
    got = trajectory(_packed_flags(shared) + ["--tensor-model-parallel-size", "2",
                                              "--pipeline-model-parallel-size", "2",
                                              "--sequence-parallel"], steps=8)
    reference = references.get("packed")
    for step, (mine, ref) in enumerate(zip(got["microbatch"], reference["microbatch"],
                                           strict=True)):
        assert max(abs(a - b) for a, b in zip(mine, ref, strict=True)) <= TOL, step
    (ref_norms,) = reference["grad_norms"]
    for norms in got["grad_norms"]:
        assert max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True)) <= TOL
    assert got["replicated_agree"]


def _gather_sequence(t, group):
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@pytest.mark.parametrize("tied,parallel", [
    pytest.param(True, dict(pipeline_model_parallel_size=2), id="pp2_tied",
                 marks=pytest.mark.world(2)),
    pytest.param(False, dict(pipeline_model_parallel_size=4), id="pp4",
                 marks=pytest.mark.world(4)),
    pytest.param(False, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                             sequence_parallel=True), id="tp2pp2_sp", marks=pytest.mark.world(4)),
    *[pytest.param(False, parallel, id=name, marks=pytest.mark.world(w))
      for w in CP_LAYOUTS for name, parallel in CP_LAYOUTS[w].items()],
])
def test_taps_on_every_stage_reach_the_draft(tied, parallel, shared, utils):
    """The features the draft receives on the last stage equal the PP=1 capture, whichever stage
    captured each tap (under CP: each rank's target ran its chunks of the sequence, and the
    draft gets the whole context back), and the draft's block embedding (the last stage's
    replica) equals the target's own; stages carry only their own taps and only the last one
    trains anything."""
    target_dir = os.path.join(shared, "tied" if tied else "target")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, MASK, (2, 48), generator=g)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 12:] = True

    utils.initialize_model_parallel(1, 1)
    hf = load_hf_config(target_dir)
    ref = build_target(hf, target_transformer_config(hf))
    load_hf_weights(ref, target_dir)
    with FeatureCapture(ref, TAPS) as capture:
        _, ref_features = target_forward(ref, tokens, torch.arange(48).expand(2, 48), capture)

    plan = parse_plan(flags(target_dir, _data(shared), **parallel),
                      world_size=dist.get_world_size())
    p = plan.run.parallel
    utils.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                    seed=plan.run.training.seed, cp=p.context_parallel_size)
    model = build_training_chunk(plan, torch.device("cpu"))
    module = model.module
    mb = prepare_microbatch(tokens, loss_mask, plan.dflash, torch.Generator().manual_seed(4),
                            plan.attention)
    with torch.no_grad():
        ref_embedding = ref.embedding(input_ids=mb["block_input_ids"], position_ids=None)
    stage, stages = (parallel_state.get_pipeline_model_parallel_rank(),
                     parallel_state.get_pipeline_model_parallel_world_size())
    per_stage = hf.num_hidden_layers // stages
    assert module._capture.local_ids == [i for i in TAPS if i // per_stage == stage]
    last = parallel_state.is_pipeline_last_stage()
    assert any(p.requires_grad for p in module.parameters()) == last
    assert get_model_config(model) is module.config and module.config.qk_layernorm
    seen = {}
    if last:
        embedding = module.target.embedding if module.pre_process else module.embedding
        if not module.pre_process:  # the replica (tied: the output layer's weight)
            assert (embedding.word_embeddings.weight is module.target.output_layer.weight) == tied
        module.draft.register_forward_pre_hook(lambda m, a: seen.update(features=a[1]))
        embedding.register_forward_hook(lambda m, a, out: seen.update(embedding=out))
    reports = run_schedule(model, [mb], plan.dflash, plan.distill_weight,
                           plan.run.dflash.loss_chunk_size, plan.run.training.micro_batch_size,
                           forward_only=True)
    assert len(reports) == (1 if last else 0)
    if last:
        features, embedding = seen["features"], seen["embedding"]
        if plan.run.parallel.sequence_parallel:
            group = parallel_state.get_tensor_model_parallel_group()
            features, embedding = (_gather_sequence(t, group) for t in (features, embedding))
        assert (features - ref_features).abs().max() <= TOL
        assert (embedding - ref_embedding).abs().max() <= TOL


def _metrics_losses(save_dir: str) -> dict[int, float]:
    """{iteration: loss} from a run's `<--save>/metrics.jsonl`."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return {rec["iteration"]: rec["loss"] for rec in map(json.loads, f)}


@pytest.mark.world(4)
def test_checkpoints_reshard_between_layouts(shared, references):
    """Saved at TP2xPP2 (+SP) -> resumed at TP1xPP1 (DP4), at PP2xDP2 and at CP2xDP2; saved
    there -> resumed at TP2xPP2, at TP2xDP2 and at CP4. Each resumed step's loss equals the
    uninterrupted run's (<= 1e-5). All in this world of four, so no layout needs a process of
    its own."""
    target_dir, data = os.path.join(shared, "target"), _data(shared)
    ref = references.get("full")["loss"]
    layouts = {"tp2pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              sequence_parallel=True),
               "dp4": {}, "pp2dp2": dict(pipeline_model_parallel_size=2),
               "tp2dp2": dict(tensor_model_parallel_size=2),
               "cp2dp2": dict(context_parallel_size=2), "cp4": dict(context_parallel_size=4)}
    ckpt = {k: os.path.join(shared, f"ckpt_{k}") for k in layouts}

    def run(layout, iters, load=None, save=None):
        extra = dict(layouts[layout], **({"load": ckpt[load]} if load else {}),
                     **({"save": ckpt[save]} if save else {}))
        return run_in_process(flags(target_dir, data, train_iters=iters, **extra))["losses"]

    saved = run("tp2pp2", 2, save="tp2pp2")
    assert max(abs(a - b) for a, b in zip(saved, ref[:2], strict=True)) <= TOL
    for layout in ("dp4", "pp2dp2", "cp2dp2"):  # resume elsewhere, and save there
        (loss,) = run(layout, 3, load="tp2pp2", save=layout)
        assert abs(loss - ref[2]) <= TOL, layout
        assert list(_metrics_losses(ckpt[layout])) == [3]
    for layout, source in (("tp2pp2", "dp4"), ("tp2dp2", "pp2dp2"), ("cp4", "cp2dp2")):
        (loss,) = run(layout, 4, load=source)
        assert abs(loss - ref[3]) <= TOL, (layout, source)


@pytest.mark.world(2)
@pytest.mark.parametrize("pp,argv,message", [
    (2, ["--virtual-pipeline-model-parallel-size", "2"], "--virtual-pipeline-model-parallel-size"),
    (3, [], "must divide the target's 4 layers"),
    (4, [], "must divide the target's 30 layers"),  # the embedded default target
])
def test_unsupported_pipeline_layouts_fail_up_front(pp, argv, message, shared, capsys):
    if "30" not in message:
        argv = ["--target", os.path.join(shared, "target"), "--mask-token-id", str(MASK)] + argv
    with pytest.raises(SystemExit):
        parse_plan(["--pipeline-model-parallel-size", str(pp)] + argv, world_size=pp)
    assert message in capsys.readouterr().err
