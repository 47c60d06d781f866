"""The SLURM scripts of examples/slurm, rendered for 2 nodes x 8 GPUs (TP8 x PP2) and run by bash
against stand-ins for srun / scontrol / scancel: command lines, resume, USR1 -> save -> requeue."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dflash_testing import load_script
from megatron_dflash.training.arguments import build_parser

REPO = Path(__file__).resolve().parents[2]
render_module = load_script("examples/slurm/render.py")
render = render_module.render

TRAIN = ["--target", "/models/Qwen3-8B", "--mask-token-id", "151669", "--bf16",
         "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "2",
         "--global-batch-size", "64", "--train-data", "/data/my train"]

STUBS = {
    # srun: record argv one per line; with STUB_WAIT act as a trainer that saves on USR1.
    "srun": """printf '%s\\n' "$@" > "$LOG/srun.argv"
echo $$ > "$LOG/srun.pid"
trap 'echo saved >> "$LOG/trainer"; exit 0' USR1
if [ -n "${STUB_WAIT:-}" ]; then for i in $(seq 200); do sleep 0.1; done; exit 1; fi""",
    "scontrol": """if [ "$1" = show ]; then printf 'node001\\nnode002\\n'
else echo "$*" >> "$LOG/scontrol"; fi""",
    # scancel --signal: what slurmstepd does, deliver it to the step's processes.
    "scancel": """echo "$*" >> "$LOG/scancel"; kill -USR1 "$(cat "$LOG/srun.pid")\"""",
}


@pytest.fixture
def slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log),
               SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[001-002]")
    return env, log


def write(tmp_path, launcher):
    text = render(launcher, nodes=2, gpus_per_node=8, run_dir=tmp_path / "run", train_args=TRAIN,
                  partition="gpu", time="01:00:00")
    script = tmp_path / f"{launcher}.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    return text, script


def srun_argv(log):
    return (log / "srun.argv").read_text().splitlines()


def trainer_args(argv):
    """pretrain_dflash.py's arguments, parsed by its own parser."""
    return build_parser().parse_args(argv[argv.index("examples/pretrain_dflash.py") + 1:])


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_rendered_command_lines(tmp_path, slurm, launcher):
    env, log = slurm
    text, script = write(tmp_path, launcher)
    tasks = 1 if launcher == "torchrun" else 8
    for line in ("#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={tasks}",
                 "#SBATCH --gpus-per-node=8", f"#SBATCH --cpus-per-task={64 // tasks}",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 f"#SBATCH --output={tmp_path}/run/logs/%x-%j.out"):
        assert line in text.splitlines(), line

    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    argv = srun_argv(log)
    launch = argv[:argv.index("examples/pretrain_dflash.py")]
    if launcher == "torchrun":
        assert launch == ["--kill-on-bad-exit=1", "examples/slurm/task.sh", "python", "-m",
                          "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                          "--rdzv-backend=c10d", "--rdzv-endpoint=node001:21234",
                          "--rdzv-id=1234"]
    else:
        assert launch == ["--kill-on-bad-exit=1", "examples/slurm/task.sh", "python"]
    args = trainer_args(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 2)
    assert args.train_data == ["/data/my train"] and args.load is None
    assert args.save == f"{tmp_path}/run/checkpoints"
    assert args.tensorboard_dir == f"{tmp_path}/run/tensorboard"
    assert not (log / "scontrol").exists()  # no requeue after a normal end

    # A requeued job finds the checkpoint tracker and resumes from it.
    (tmp_path / "run/checkpoints/latest_checkpointed_iteration.txt").write_text("500")
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    assert trainer_args(srun_argv(log)).load == f"{tmp_path}/run/checkpoints"


def test_usr1_saves_then_requeues(tmp_path, slurm):
    env, log = slurm
    _, script = write(tmp_path, "srun")
    job = subprocess.Popen(["bash", str(script)], env=dict(env, STUB_WAIT="1"))
    deadline = time.time() + 30
    while not (log / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM: time limit in 120 s
    assert job.wait(timeout=30) == 0
    assert (log / "scancel").read_text().split() == ["--signal=USR1", "1234"]
    assert (log / "trainer").read_text().split() == ["saved"]
    assert (log / "scontrol").read_text().split() == ["requeue", "1234"]


def test_task_wrapper_sets_ranks_and_ignores_usr1():
    env = dict(os.environ, SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1")
    code = ("import os, signal; print(os.environ['RANK'], os.environ['WORLD_SIZE'], "
            "os.environ['LOCAL_RANK'], signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)")
    out = subprocess.run([str(REPO / "examples/slurm/task.sh"), sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["9", "16", "1", "True"]


@pytest.mark.parametrize("train_args,match", [
    (TRAIN + ["--save", "/x"], "--save / --load"),
    (TRAIN + ["--no-such-flag"], "does not take"),
    (TRAIN + ["--no-exit-signal-handler"], "exit-signal handler"),
    (["--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4"], "divisible"),
])
def test_rejects_what_cannot_run(tmp_path, train_args, match):
    with pytest.raises(ValueError, match=match):
        render("srun", nodes=2, gpus_per_node=8, run_dir=tmp_path, train_args=train_args)


def test_main_writes_script_and_log_dir(tmp_path):
    script = render_module.main(["--nodes", "2", "--run-dir", str(tmp_path / "r"), "--", *TRAIN])
    assert script == tmp_path / "r/dflash.sbatch" and (tmp_path / "r/logs").is_dir()
    assert "--nproc-per-node=8" in script.read_text()
