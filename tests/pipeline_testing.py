"""The pipeline, context-parallel and MoE layout tests' driver: a training trajectory at any
layout through the `Trainer`'s own pieces, single-process reference trajectories computed by
a fresh process that starts with the module, and the checks that a layout's trajectory, or a
target's logits and taps, equal one process's (tests/distributed/test_pipeline.py,
test_context_parallel.py, test_moe_ep.py, test_qwen_hybrid_layouts.py)."""
import contextlib
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dflash.distributed import launcher_free_env
from megatron_dflash.targets.capture import FeatureCapture, target_forward
from megatron_dflash.training.microbatches import MicroBatches
from megatron_dflash.training.pretrain import parse_plan
from megatron_dflash.training.trainer import Trainer
from tests.layout_testing import Utils
from tests.dflash_testing import all_gather

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK, TAPS, STEPS, TOL = 255, [0, 2, 3], 20, 1e-5


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
    """Train `steps` steps with the `Trainer`'s own pieces at the layout `argv` asks for. Every
    rank returns the micro-batch losses of every step in global order (DP rank r's i-th
    micro-batch is global micro-batch i*DP + r; its context-parallel ranks' blocks summed),
    each step's loss, every rank's grad norms and the micro-batch lengths seen."""
    plan = parse_plan(argv, world_size=dist.get_world_size())
    p = plan.run.parallel
    Utils.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                    seed=plan.run.training.seed,
                                    ep=p.expert_model_parallel_size,
                                    etp=p.expert_tensor_parallel_size,
                                    cp=p.context_parallel_size)
    trainer = Trainer(plan)
    model = trainer.model
    batches = MicroBatches(trainer.train_data, plan, trainer.pad_id, 0)
    mine, grad_norms, lengths = [], [], set()
    for _ in range(steps):
        microbatches = [batches.next() for _ in range(plan.num_microbatches)]
        lengths |= {mb["tokens"].shape[1] for mb in microbatches}
        reports, grad_norm = trainer.train_step(microbatches)
        mine.append([r["loss"].tolist() for r in reports])
        grad_norms.append(grad_norm)
    owner = (parallel_state.is_pipeline_last_stage()
             and parallel_state.get_tensor_model_parallel_rank() == 0)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (parallel_state.get_data_parallel_rank(), owner, mine,
                                      grad_norms, _replicated_params_agree(model),
                                      len(model.module.target.decoder.layers)))
    by_dp = {}  # {DP rank: [step][micro-batch] [numerator, denominator]}, summed over CP ranks
    for dp, owns, losses, *_ in sorted(per_rank, key=lambda row: row[0]):
        if owns:
            summed = by_dp.setdefault(dp, [[[0.0, 0.0] for _ in mbs] for mbs in losses])
            for step, mbs in enumerate(losses):
                for i, (numerator, denominator) in enumerate(mbs):
                    summed[step][i][0] += numerator
                    summed[step][i][1] += denominator
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


def _single_process(body: str) -> subprocess.Popen:
    """Start `body` (python, may use `trajectory` and `json`) in a fresh single-process gloo
    world, as the tests run it (the repository is the working directory, so `tests` imports)."""
    code = "\n".join([
        "import json",
        "import tests.conftest",  # the CPU shims and thread count, exactly as under pytest
        "from megatron_dflash.distributed import init_distributed",
        "init_distributed()",
        "from tests.pipeline_testing import trajectory",
        body])
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=launcher_free_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, timeout=600) -> None:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-4000:]


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
            self._job = _single_process(body)

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


def assert_same_trajectory(got: dict, reference: dict) -> None:
    """A layout's `trajectory` equals the single-process one: every micro-batch's loss, each
    step's loss and every rank's grad norms (each rank's optimizer reports the global norm) to
    TOL, and the parameters every TP rank holds whole agree bitwise."""
    for step, (mine, ref) in enumerate(zip(got["microbatch"], reference["microbatch"],
                                           strict=True)):
        assert max(abs(a - b) for a, b in zip(mine, ref, strict=True)) <= TOL, step
    assert max(abs(a - b) for a, b in zip(got["loss"], reference["loss"], strict=True)) <= TOL
    (ref_norms,) = reference["grad_norms"]
    for norms in got["grad_norms"]:
        assert max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True)) <= TOL
    assert got["replicated_agree"]


def assert_layout_equals(model, spec: dict, taps: list[int], tokens, ref_logits, ref_features,
                         first_stage_taps: int) -> None:
    """This rank's logits (last stage) and captured taps of `tokens` = (ids, position ids or
    None) equal the one-process import's, the pipeline stages passing the hidden state on; at
    PP2 (`spec["pp"]`) the first stage captures `taps[:first_stage_taps]`, the last the rest.
    Under sequence parallelism (`spec["sp"]`) the taps are gathered back over TP first."""
    ids, pos = tokens
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    with FeatureCapture(model, taps) as capture:
        if not last:
            with torch.no_grad():
                hidden = model(ids, pos, None)
            dist.send(hidden, dst=parallel_state.get_pipeline_model_parallel_next_rank())
            logits, features = None, capture.features()
        else:
            if not first:
                hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            logits, features = target_forward(model, ids, pos, capture)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if logits is not None:
        assert (torch.cat(all_gather(logits, tp_group), -1) - ref_logits).abs().max() <= TOL
    if spec["sp"]:
        features = torch.cat(all_gather(features, tp_group), 0)
    split = first_stage_taps
    assert capture.local_ids == (taps if spec["pp"] == 1 else taps[:split] if first
                                 else taps[split:])
    expected = torch.cat([ref_features.chunk(len(taps), -1)[taps.index(i)]
                          for i in capture.local_ids], -1)
    assert (features - expected).abs().max() <= TOL
