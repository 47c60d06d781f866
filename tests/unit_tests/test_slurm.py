"""The SLURM scripts of examples/slurm, rendered for 2 nodes x 8 GPUs (TP8 x PP2) and run by bash
against stand-ins for srun / scontrol / scancel: command lines, resume, USR1 -> save -> requeue."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dflash_testing import load_script
from megatron_dflash.run.flags import build_parser

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


# --- MoE targets: expert parallelism in the rendered job, checked against the GPUs and the target

# Qwen3-235B-A22B on 4 nodes x 8 GPUs. PP=2: its 94 layers split only into 2 (or 47, 94) equal
# stages. TP=4 (within a node) leaves DP = 32 / (4 x 2) = 4, so expert-TP x EP must divide
# TP x DP = 16: EP=8 with expert-TP 1 (the default expert-TP = TP = 4 would need 32) keeps each
# expert's GEMMs whole and the alltoall inside one node; 128 / 8 = 16 experts per GPU.
MOE_TRAIN = ["--mask-token-id", "151669", "--bf16", "--train-data", "/data/train",
             "--tensor-model-parallel-size", "4", "--sequence-parallel",
             "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "8",
             "--expert-tensor-parallel-size", "1", "--moe-token-dispatcher-type", "alltoall",
             "--global-batch-size", "64"]


def _config_dir(path, moe=True):
    """A config.json only (no weights), shaped like Qwen3-235B-A22B or a dense Qwen3."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    shape = dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                 num_key_value_heads=4, head_dim=128, vocab_size=151936, intermediate_size=12288)
    config = (Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], num_experts=128,
                             num_experts_per_tok=8, moe_intermediate_size=1536, **shape)
              if moe else Qwen3Config(architectures=["Qwen3ForCausalLM"], **shape))
    config.save_pretrained(path)
    return str(path)


def _with(args, **flags):
    """`args` with each `--flag value` replaced (or added)."""
    out = list(args)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


def test_renders_qwen3_235b_expert_parallel_job(tmp_path, slurm):
    env, log = slurm
    target = _config_dir(tmp_path / "Qwen3-235B-A22B")
    text = render("torchrun", nodes=4, gpus_per_node=8, run_dir=tmp_path / "run",
                  train_args=["--target", target, *MOE_TRAIN])
    assert ("# Layout: TP 4 x PP 2 x DP 4; experts: expert-TP 1 x EP 8 x PP 2 x expert-DP 2."
            in text.splitlines())
    assert "#SBATCH --nodes=4" in text.splitlines()
    script = tmp_path / "moe.sbatch"
    script.write_text(text)
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    argv = srun_argv(log)
    assert "--nnodes=4" in argv and "--nproc-per-node=8" in argv
    args = trainer_args(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (4, 2, 8, 1)
    assert args.moe_token_dispatcher_type == "alltoall" and args.sequence_parallel
    assert args.target == target


@pytest.mark.parametrize("nodes,flags,match", [
    # the default expert-TP (= TP = 4) x EP 8 = 32 does not divide TP x CP x DP = 16
    (4, dict(expert_tensor_parallel_size=4),
     r"--expert-model-parallel-size=8: expert-TP x EP = 4 x 8 must divide TP x CP x DP = "
     r"4 x 1 x 4"),
    (4, dict(context_parallel_size=3), r"32 is not divisible by TP x PP x CP = 4 x 2 x 3"),
    (4, dict(pipeline_model_parallel_size=4),
     "--pipeline-model-parallel-size=4 must divide the target's 94 layers"),
    # 3 nodes: TP x DP = 12, EP 3 fits the GPUs but not the 128 experts
    (3, dict(expert_model_parallel_size=3),
     "--expert-model-parallel-size=3 must divide the target's num_experts=128"),
    (4, dict(expert_model_parallel_size=0), "--expert-model-parallel-size=0 must be >= 1"),
])
def test_rejects_expert_layouts_that_cannot_run(tmp_path, nodes, flags, match):
    target = _config_dir(tmp_path / "target")
    with pytest.raises(ValueError, match=match):
        render("srun", nodes=nodes, gpus_per_node=8, run_dir=tmp_path,
               train_args=_with(["--target", target, *MOE_TRAIN], **flags))


def test_context_parallelism_takes_its_share_of_the_gpus(tmp_path):
    """World = TP x PP x CP x DP; the experts' layout folds CP into expert-DP."""
    text = render("srun", nodes=4, gpus_per_node=8, run_dir=tmp_path,
                  train_args=["--target", _config_dir(tmp_path / "target"),
                              *_with(MOE_TRAIN, context_parallel_size=2)])
    assert ("# Layout: TP 4 x PP 2 x CP 2 x DP 2; experts: expert-TP 1 x EP 8 x PP 2 x "
            "expert-DP 2." in text.splitlines())


def test_rejects_expert_parallelism_on_a_dense_target(tmp_path):
    target = _config_dir(tmp_path / "dense", moe=False)
    with pytest.raises(ValueError, match="--expert-model-parallel-size=8: the target .* is dense"):
        render("srun", nodes=4, gpus_per_node=8, run_dir=tmp_path,
               train_args=["--target", target, *MOE_TRAIN])


def test_rejects_an_unreadable_target_config(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/config.json").write_text("{not json")
    with pytest.raises(ValueError, match="--target: .*config.json is not a readable HF config"):
        render("srun", nodes=4, gpus_per_node=8, run_dir=tmp_path,
               train_args=["--target", str(tmp_path / "broken"), *MOE_TRAIN])
