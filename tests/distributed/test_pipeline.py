"""Pipeline parallelism composed with TP, SP and DP: every layout trains exactly like one process.

* Taps on the first, a middle and the last stage reach the draft equal to the PP=1 capture, and
  the last stage's word-embedding replica equals the target's embedding (tied and untied).
* For the same weights, data and seed, every micro-batch loss, every step's loss and grad norm over
  a 20-step trajectory (after optimizer updates) equal the single-process run (<= 1e-5, fp32) —
  also with the sparse block attention against the dense single-process reference —
  and parameters replicated over TP stay bitwise identical. The reference is the same driver in a
  fresh single process.
* A checkpoint saved at TP2xPP2 resumes at TP1xPP1 and DP2 with the uninterrupted run's next
  loss, and checkpoints saved at TP1xPP1 and DP2 resume at TP2xPP2.

The data mixes two sequence lengths, so the pipeline payload's shape changes between micro-batches.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from conftest import Utils
from dflash_testing import pattern_dataset, tiny_target_dir
from megatron_dflash.data.dataset import build_dataset
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.targets.hf_import import (build_target, load_hf_config, load_hf_weights,
                                              target_transformer_config)
from megatron_dflash.training import loop
from megatron_dflash.training.arguments import parse_args
from megatron_dflash.training.step import prepare_microbatch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MASK, TAPS, STEPS, TOL = 255, [0, 2, 3], 20, 1e-5
# 4 target layers: at PP4 the taps sit on stages 0 (first), 2 (middle) and 3 (last); stage 1 only
# passes them on. At PP2: stage 0 holds tap 0, stage 1 taps 2 and 3.
LAYOUTS = {
    2: {"pp2": dict(pipeline_model_parallel_size=2), "tp2": dict(tensor_model_parallel_size=2)},
    4: {"pp4": dict(pipeline_model_parallel_size=4),
        "tp2pp2_sp": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                          sequence_parallel=True),
        "tp2pp2_sp_sparse": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 sequence_parallel=True, attention="sparse"),
        "tp2dp2": dict(tensor_model_parallel_size=2),
        "pp2dp2": dict(pipeline_model_parallel_size=2)},
}


def flags(target, train, **kw):
    """Constant LR, so a run's steps do not depend on --train-iters (resumed == straight)."""
    base = dict(target=target, mask_token_id=MASK, train_data=train, seq_length=48, block_size=8,
                num_draft_layers=1, target_layer_ids=TAPS, num_anchors=4, micro_batch_size=2,
                global_batch_size=8, lr=3e-3, lr_decay_style="constant", lr_warmup_fraction=0,
                distill_weight=0.5, log_interval=1, seed=7, train_iters=STEPS,
                seq_length_buckets=3)
    base.update(kw)
    out = []
    for k, v in base.items():
        v = v if isinstance(v, list) else [v]
        out += [f"--{k.replace('_', '-')}"] + [str(x) for x in v if x is not True]
    return out


def trajectory(argv, steps=STEPS) -> dict:
    """Train `steps` steps with loop.py's own pieces at the layout `argv` asks for. Every rank
    returns the micro-batch losses of every step in global order (DP rank r's i-th micro-batch is
    global micro-batch i*DP + r), each step's loss, every rank's grad norms and the micro-batch
    lengths seen."""
    args = parse_args(argv, world_size=dist.get_world_size())
    Utils.initialize_model_parallel(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, seed=args.seed,
                                    ep=args.expert_model_parallel_size,
                                    etp=args.expert_tensor_parallel_size)
    torch.manual_seed(args.seed)
    train, _ = build_dataset(args.train_data, None, args.seq_length)
    model, cfg, _ = loop.build_models(args, torch.device("cpu"))
    optimizer, scheduler = loop.build_optimizer(args, model)
    batches = loop.MicroBatches(train, args, cfg, 0, 0)
    mine, grad_norms, lengths = [], [], set()
    for _ in range(steps):
        microbatches = [batches.next() for _ in range(args.num_microbatches)]
        lengths |= {mb["tokens"].shape[1] for mb in microbatches}
        reports, grad_norm = loop.train_step(model, optimizer, scheduler, microbatches, cfg, args)
        mine.append([r["loss"].tolist() for r in reports])
        grad_norms.append(grad_norm)
    owner = (parallel_state.is_pipeline_last_stage()
             and parallel_state.get_tensor_model_parallel_rank() == 0)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (parallel_state.get_data_parallel_rank(), owner, mine,
                                      grad_norms, _replicated_params_agree(model),
                                      len(model.module.target.decoder.layers)))
    by_dp = dict(sorted((dp, losses) for dp, owns, losses, *_ in per_rank if owns))
    microbatch, losses = [], []
    for step in range(steps):
        sums = [by_dp[dp][step][i] for i in range(len(by_dp[0][step])) for dp in by_dp]
        microbatch.append([n / d for n, d in sums])
        losses.append(sum(n for n, _ in sums) / sum(d for _, d in sums))
    Utils.destroy_model_parallel()
    return {"microbatch": microbatch, "loss": losses, "lengths": sorted(lengths),
            "grad_norms": [norms for _, _, _, norms, *_ in per_rank],
            "replicated_agree": all(agree for *_, agree, _ in per_rank),
            "target_layers": [layers for *_, layers in per_rank]}


def _replicated_params_agree(model) -> bool:
    """Parameters that every TP rank holds whole (norms, fc) are bitwise equal across TP."""
    group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if p.requires_grad and not getattr(p, "tensor_model_parallel", False):
            copies = [torch.empty_like(p) for _ in range(group.size())]
            dist.all_gather(copies, p.detach().contiguous(), group=group)
            if any(not torch.equal(c, copies[0]) for c in copies):
                return False
    return True


def _clean_env():
    """This process's environment without the torchrun variables of the running test world."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")
            and not k.startswith("TORCHELASTIC")}


def _single_process(shared, body: str) -> subprocess.Popen:
    """Start `body` (python, may use `Utils`, `trajectory`, `pretrain`, `parse_args`, `json`) in a
    fresh single-process gloo world, as the tests run it."""
    code = "\n".join([
        "import json, sys",
        f"sys.path[:0] = [{os.path.dirname(HERE)!r}, {HERE!r}]",
        "import conftest",  # the CPU shims, exactly as under pytest
        "import torch.distributed as dist",
        f"dist.init_process_group('gloo', init_method='file://{shared}/rdzv-{os.urandom(4).hex()}',"
        " rank=0, world_size=1)",
        "from conftest import Utils",
        "from test_pipeline import trajectory",
        "from megatron_dflash.training.arguments import parse_args",
        "from megatron_dflash.training.loop import pretrain",
        body])
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, timeout=600) -> None:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-4000:]


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
        for name, count, length in (("long", 24, 48), ("short", 24, 32)):
            pattern_dataset(os.path.join(path[0], name), count, length, seed=length)
    dist.barrier()
    yield path[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0])


def _data(shared):
    return [os.path.join(shared, "long"), os.path.join(shared, "short")]


def _taps01_flags(shared):
    return flags(os.path.join(shared, "target"), _data(shared), target_layer_ids=[0, 1],
                 distill_weight=0, train_iters=8)


class References:
    """Single-process trajectories, `wanted` = {name: (argv, steps)}, computed by one fresh process
    on rank 0 that starts with the module, so it runs while the first tests do; `get(name)`
    (collective) waits for it once and hands every rank the results."""

    def __init__(self, shared, wanted: dict):
        self._result, self._job = None, None
        if dist.get_rank() == 0:
            self._out = os.path.join(shared, f"references-{os.urandom(4).hex()}.json")
            body = ("json.dump({k: trajectory(a, n) for k, (a, n) in %r.items()}, open(%r, 'w'))"
                    % (wanted, self._out))
            self._job = _single_process(shared, body)

    def get(self, name: str) -> dict:
        if self._result is None:
            result = [None]
            if dist.get_rank() == 0:
                _finish(self._job)
                with open(self._out) as f:
                    result[0] = json.load(f)
            dist.broadcast_object_list(result, src=0)
            self._result = result[0]
        return self._result[name]

    def close(self):
        if self._job is not None and self._job.poll() is None:
            self._job.kill()
            self._job.wait()


@contextlib.contextmanager
def started_references(shared, wanted: dict):
    refs = References(shared, wanted)
    try:
        yield refs
    finally:
        refs.close()


@pytest.fixture(scope="module", autouse=True)
def references(shared):
    wanted = {"full": (flags(os.path.join(shared, "target"), _data(shared)), STEPS)}
    if dist.get_world_size() == 2:  # test_stage_past_the_deepest_tap_computes_no_layer
        wanted["taps01"] = (_taps01_flags(shared), 8)
    with started_references(shared, wanted) as refs:
        yield refs


@pytest.mark.parametrize("world,layout", [pytest.param(w, name, id=name, marks=pytest.mark.world(w))
                                          for w in LAYOUTS for name in LAYOUTS[w]])
def test_layout_equals_one_process(world, layout, shared, references):
    got = trajectory(flags(os.path.join(shared, "target"), _data(shared), **LAYOUTS[world][layout]))
    reference = references.get("full")
    assert got["lengths"] == [32, 48]  # the payload's shape changes between micro-batches
    for step, (mine, ref) in enumerate(zip(got["microbatch"], reference["microbatch"], strict=True)):
        assert max(abs(a - b) for a, b in zip(mine, ref, strict=True)) <= TOL, step
    assert max(abs(a - b) for a, b in zip(got["loss"], reference["loss"], strict=True)) <= TOL
    (ref_norms,) = reference["grad_norms"]
    for norms in got["grad_norms"]:  # every rank's optimizer reports the global norm
        assert max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True)) <= TOL
    assert got["replicated_agree"]
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
])
def test_taps_on_every_stage_reach_the_draft(tied, parallel, shared, utils):
    """The features the draft receives on the last stage equal the PP=1 capture, whichever stage
    captured each tap, and the draft's block embedding (the last stage's replica) equals the
    target's own; stages carry only their own taps and only the last one trains anything."""
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

    args = parse_args(flags(target_dir, _data(shared), **parallel), world_size=dist.get_world_size())
    utils.initialize_model_parallel(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size, seed=args.seed)
    model, cfg, _ = loop.build_models(args, torch.device("cpu"))
    module = model.module
    mb = prepare_microbatch(tokens, loss_mask, cfg, torch.Generator().manual_seed(4),
                            args.attention)
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
        assert (module.embedding.word_embeddings.weight is module.target.output_layer.weight) == tied
        module.draft.register_forward_pre_hook(lambda m, a: seen.update(features=a[1]))
        module.embedding.register_forward_hook(lambda m, a, out: seen.update(embedding=out))
    reports = loop.run_step(model, [mb], cfg, args, forward_only=True)
    assert len(reports) == (1 if last else 0)
    if last:
        features, embedding = seen["features"], seen["embedding"]
        if args.sequence_parallel:
            group = parallel_state.get_tensor_model_parallel_group()
            features, embedding = (_gather_sequence(t, group) for t in (features, embedding))
        assert (features - ref_features).abs().max() <= TOL
        assert (embedding - ref_embedding).abs().max() <= TOL


def _in_process(argv) -> dict:
    Utils.destroy_model_parallel()
    try:
        return loop.pretrain(parse_args(argv, world_size=dist.get_world_size()))
    finally:
        Utils.destroy_model_parallel()


def _metrics_losses(save_dir: str) -> dict[int, float]:
    """{iteration: loss} from a run's `<--save>/metrics.jsonl`."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return {rec["iteration"]: rec["loss"] for rec in map(json.loads, f)}


@pytest.mark.world(4)
def test_checkpoints_reshard_between_layouts(shared, references):
    """Saved at TP2xPP2 (+SP) -> resumed at TP1xPP1 (DP4) and at PP2xDP2; saved there -> resumed
    at TP2xPP2 and at TP2xDP2. Each resumed step's loss equals the uninterrupted run's (<= 1e-5).
    All in this world of four, so no layout needs a process of its own."""
    target_dir, data = os.path.join(shared, "target"), _data(shared)
    ref = references.get("full")["loss"]
    layouts = {"tp2pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              sequence_parallel=True),
               "dp4": {}, "pp2dp2": dict(pipeline_model_parallel_size=2),
               "tp2dp2": dict(tensor_model_parallel_size=2)}
    ckpt = {k: os.path.join(shared, f"ckpt_{k}") for k in layouts}

    def run(layout, iters, load=None, save=None):
        extra = dict(layouts[layout], **({"load": ckpt[load]} if load else {}),
                     **({"save": ckpt[save]} if save else {}))
        return _in_process(flags(target_dir, data, train_iters=iters, **extra))["losses"]

    saved = run("tp2pp2", 2, save="tp2pp2")
    assert max(abs(a - b) for a, b in zip(saved, ref[:2], strict=True)) <= TOL
    for layout in ("dp4", "pp2dp2"):  # resume elsewhere, and save there
        (loss,) = run(layout, 3, load="tp2pp2", save=layout)
        assert abs(loss - ref[2]) <= TOL, layout
        assert list(_metrics_losses(ckpt[layout])) == [3]
    for layout, source in (("tp2pp2", "dp4"), ("tp2dp2", "pp2dp2")):
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
        parse_args(["--pipeline-model-parallel-size", str(pp)] + argv, world_size=pp)
    assert message in capsys.readouterr().err
