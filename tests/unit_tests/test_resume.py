"""Kill-and-resume exactness and save-and-exit on a signal: whole jobs of the main script under
torchrun, killed or signalled from outside, resumed from their checkpoints, against one straight run.

The jobs that must be killed run as subprocesses; the single-process straight run and resume run in
this process (the same `pretrain` on the same CPU, so bit-exact with the job's own). At DP2 one chain
covers both stops: a signal on one rank saves and exits, the resumed job is SIGKILLed after its next
checkpoint, and the job resumed from that one ends the chain.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from megatron_dflash import checkpoint
from tests.training_testing import REPO, flags, run_in_process
STRAIGHT_ITERS = 15  # the uninterrupted run each chain compares with (every chain ends <= this)
SAVE_INTERVAL = 3


def _resumable(target, data):
    """A constant LR makes the schedule independent of --train-iters, so a job can run until it
    is stopped and a longer straight run is the reference for any shorter one."""
    return flags(target, *data, log_interval=1, lr_decay_style="constant", lr_warmup_fraction=0,
                 eval_samples=4)


def _torchrun(nproc, argv, log_path):
    """The main job under torchrun; its log to `log_path`, its metrics beside it (`_losses`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
           f"--nproc-per-node={nproc}", os.path.join(REPO, "examples", "pretrain_dflash.py"), *argv,
           "--metrics-file", str(log_path) + ".metrics.jsonl"]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=REPO)


def _in_process(argv, log_path):
    """The same job in this process (world of one), metrics where `_losses` reads them."""
    run_in_process(argv + ["--metrics-file", str(log_path) + ".metrics.jsonl"])


def _losses(log_path):
    """{iteration: loss} from the job's metrics file (JSON floats round-trip exactly)."""
    path = str(log_path) + ".metrics.jsonl"
    if not os.path.exists(path):
        return {}
    out = {}
    for line in open(path):
        if line.endswith("\n"):  # a line being written is not complete yet
            rec = json.loads(line)
            out[rec["iteration"]] = rec["loss"]
    return out


def _finish(job, log_path):
    try:
        assert job.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    finally:  # never an endless job left behind when an assertion fails
        _kill_tree(job)


def _kill_after_checkpoint(job, root, log_path, after=0, timeout=300) -> int:
    """SIGKILL the whole job (no clean-up) once it has finished a checkpoint past `after`."""
    deadline = time.time() + timeout
    try:
        while (checkpoint.latest_iteration(str(root)) if root.exists() else None) is None \
                or checkpoint.latest_iteration(str(root)) <= after:
            assert job.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
            time.sleep(0.1)
    finally:
        _kill_tree(job)
    return checkpoint.latest_iteration(str(root))


def _kill_tree(popen) -> None:
    """SIGKILL a torchrun job and its workers (they run in sessions of their own)."""
    if popen.poll() is not None:
        return
    job = psutil.Process(popen.pid)
    procs = job.children(recursive=True) + [job]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=60)
    popen.wait(timeout=60)


def _workers(job) -> dict[int, psutil.Process]:
    """torchrun's worker processes by global rank."""
    out = {}
    for proc in psutil.Process(job.pid).children(recursive=True):
        rank = proc.environ().get("RANK")
        if rank is not None and "pretrain_dflash.py" in " ".join(proc.cmdline()):
            out[int(rank)] = proc
    return out


def _until(losses, last):
    assert last <= STRAIGHT_ITERS
    return {i: v for i, v in losses.items() if i <= last}


def test_kill_and_resume_is_exact(target, data, tmp_path):
    """Train under torchrun, SIGKILL the whole job mid-training, resume from its last checkpoint
    (iteration k) for 3 more steps: the losses of steps 1..k (killed job) and k+1..k+3 (resumed)
    equal a straight run, bit for bit."""
    common = _resumable(target, data)
    save = tmp_path / "ckpt"
    killed = _torchrun(1, common + ["--train-iters", "100000", "--save", str(save),
                                    "--save-interval", str(SAVE_INTERVAL)], tmp_path / "killed.log")
    k = _kill_after_checkpoint(killed, save, tmp_path / "killed.log")
    assert k % SAVE_INTERVAL == 0
    _in_process(common + ["--train-iters", str(k + 3), "--load", str(save)], tmp_path / "resumed")
    _in_process(common + ["--train-iters", str(k + 3)], tmp_path / "straight")
    before = _until(_losses(tmp_path / "killed.log"), k)
    after = _losses(tmp_path / "resumed")
    assert sorted(before) == list(range(1, k + 1)) and sorted(after) == list(range(k + 1, k + 4))
    assert {**before, **after} == _losses(tmp_path / "straight")  # bit-exact on CPU fp32


def test_signal_then_kill_at_dp2_resume_exactly(target, data, tmp_path):
    """DP2 under torchrun. SIGTERM (pre-emption) reaching only rank 0: both ranks finish the
    iteration, save one checkpoint there (k1) and exit 0 (no final evaluation). Resumed from it,
    the job is SIGKILLed after its next periodic checkpoint (k2); resumed again it runs 3 more
    steps. Steps 1..k1, k1+1..k2 and k2+1..k2+3 of the three jobs equal one straight DP2 run, bit
    for bit."""
    common = _resumable(target, data)
    straight = _torchrun(2, common + ["--train-iters", str(STRAIGHT_ITERS)], tmp_path / "straight.log")
    _finish(straight, tmp_path / "straight.log")
    reference = _losses(tmp_path / "straight.log")
    assert sorted(reference) == list(range(1, STRAIGHT_ITERS + 1))

    save, log = tmp_path / "ckpt", tmp_path / "signalled.log"
    job = _torchrun(2, common + ["--train-iters", "100000", "--save", str(save),
                                 "--save-interval", "100000"], log)
    try:
        deadline = time.time() + 300
        while len(_losses(log)) < 2:
            assert job.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
        _workers(job)[0].send_signal(signal.SIGTERM)
    except BaseException:
        _kill_tree(job)
        raise
    _finish(job, log)
    text = open(log).read()
    k1 = max(_losses(log))
    assert checkpoint.latest_iteration(str(save)) == k1
    assert f"exiting after iteration {k1}: received a signal on another rank" in text
    assert text.count("held-out tau") == 1 and f" iteration {k1 + 1:8d}/" not in text  # start only

    killed = _torchrun(2, common + ["--train-iters", "100000", "--load", str(save), "--save",
                                    str(save), "--save-interval", str(SAVE_INTERVAL)],
                       tmp_path / "killed.log")
    k2 = _kill_after_checkpoint(killed, save, tmp_path / "killed.log", after=k1)
    assert k2 % SAVE_INTERVAL == 0 and k2 + 3 <= STRAIGHT_ITERS, (k1, k2)
    resumed = _torchrun(2, common + ["--train-iters", str(k2 + 3), "--load", str(save)],
                        tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")
    chain = {**_losses(log), **_until(_losses(tmp_path / "killed.log"), k2),
             **_losses(tmp_path / "resumed.log")}
    assert sorted(_losses(tmp_path / "killed.log"))[0] == k1 + 1
    assert chain == _until(reference, k2 + 3)
