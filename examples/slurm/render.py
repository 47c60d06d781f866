"""Render a SLURM batch script for multi-node DFlash training (from `dflash.sbatch.in`).

    python examples/slurm/render.py --launcher torchrun --nodes 2 --gpus-per-node 8 \
        --run-dir /shared/runs/qwen3-8b --time 24:00:00 --partition gpu \
        --setup 'source /shared/venvs/dflash/bin/activate' -- \
        --target /models/Qwen3-8B --mask-token-id 151669 --train-data /data/train \
        --seq-length 3072 --num-anchors 512 --num-draft-layers 5 --bf16 \
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 \
        --global-batch-size 64 --train-iters 20000 --save-interval 500
    sbatch /shared/runs/qwen3-8b/dflash.sbatch

Launchers: `torchrun` runs one task per node that starts the node's GPU processes after a c10d
rendezvous at the first node; `srun` runs one task per GPU, whose RANK / WORLD_SIZE / LOCAL_RANK
come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (`task.sh`). Both write checkpoints to
RUN_DIR/checkpoints (resumed from when present), logs to RUN_DIR/logs and TensorBoard to
RUN_DIR/tensorboard. Before the time limit SLURM warns the script with USR1, which passes it to
the trainers (save and exit) and requeues the job. torchrun's workers receive it when SLURM
tracks processes by cgroup (proctrack/cgroup, the usual setting on GPU clusters), since torchrun
starts them in sessions of their own.

Arguments after `--` go to examples/pretrain_dflash.py; they are checked against its parser
here, and must not set --save / --load (the script owns the checkpoint directory). The parallel
sizes (--tensor-, --pipeline-, --context-, --expert-model-parallel-size,
--expert-tensor-parallel-size) are checked against nodes x GPUs as megatron splits them, and,
when the target's config.json is readable here, against its layers and experts; the script's
header records the layout.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from megatron_dflash.run.flags import build_parser

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "dflash.sbatch.in"
REPO = HERE.parent.parent
LAUNCHERS = ("torchrun", "srun")


def render(launcher: str, *, nodes: int, gpus_per_node: int, run_dir: str | Path,
           train_args: list[str], time: str = "04:00:00", job_name: str = "dflash",
           partition: str | None = None, account: str | None = None, cpus_per_gpu: int = 8,
           signal_lead_s: int = 120, setup: str = "", python: str = "python",
           workdir: str | Path = REPO) -> str:
    """The batch script's text. Raises ValueError for a layout or arguments that cannot run."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} must be one of {LAUNCHERS}")
    if nodes < 1 or gpus_per_node < 1 or cpus_per_gpu < 1 or signal_lead_s < 1:
        raise ValueError("nodes, gpus_per_node, cpus_per_gpu and signal_lead_s must be >= 1")
    args, unknown = build_parser().parse_known_args(train_args)
    if unknown:
        raise ValueError(f"examples/pretrain_dflash.py does not take {unknown}")
    if args.save is not None or args.load is not None:
        raise ValueError("--save / --load: the script sets them (RUN_DIR/checkpoints)")
    if not args.exit_signal_handler:
        raise ValueError("--no-exit-signal-handler: the job saves and requeues on SIGUSR1 / "
                         "SIGTERM, which needs the trainer's exit-signal handler")
    layout = _check_layout(args, nodes, gpus_per_node)
    run_dir = Path(run_dir).resolve()
    if args.tensorboard_dir is None:
        train_args = [*train_args, "--tensorboard-dir", str(run_dir / "tensorboard")]
    if launcher == "torchrun":
        tasks_per_node = 1
        launch = (f"{python} -m torch.distributed.run --nnodes={nodes} "
                  f"--nproc-per-node={gpus_per_node} --rdzv-backend=c10d "
                  '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"')
    else:
        tasks_per_node, launch = gpus_per_node, python
    extra = [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("account", account))
             if v is not None]
    values = {
        "LAUNCHER": launcher, "NODES": nodes, "GPUS_PER_NODE": gpus_per_node,
        "TASKS_PER_NODE": tasks_per_node,
        "CPUS_PER_TASK": cpus_per_gpu * gpus_per_node // tasks_per_node,
        "TIME": time, "JOB_NAME": job_name, "RUN_DIR": shlex.quote(str(run_dir)),
        "SCRIPT": shlex.quote(str(run_dir / f"{job_name}.sbatch")),
        "SIGNAL_LEAD_S": signal_lead_s, "SBATCH_EXTRA": "\n".join(extra),
        "WORKDIR": shlex.quote(str(Path(workdir).resolve())), "SETUP": setup,
        "OMP_NUM_THREADS": cpus_per_gpu, "LAUNCH": launch, "TRAIN_ARGS": _format_args(train_args),
        "LAYOUT": layout,
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), TEMPLATE.read_text())


def _check_layout(args: argparse.Namespace, nodes: int, gpus_per_node: int) -> str:
    """The parallel layout against the job's GPUs as megatron's `initialize_model_parallel` splits
    them — TP x PP x CP x DP for attention and dense layers, expert-TP x EP x PP x expert-DP for
    the experts (context parallelism folded into expert-DP), so expert-TP x EP must divide
    TP x CP x DP — and, when the target's config.json is readable here, against its layers and
    experts; the layout's one-line description."""
    world = nodes * gpus_per_node
    gpus = f"{nodes} nodes x {gpus_per_node} GPUs = {world}"
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    for flag, size in (("tensor-model", tp), ("pipeline-model", pp), ("context", cp),
                       ("expert-model", ep), ("expert-tensor", etp)):
        if size is not None and size < 1:
            raise ValueError(f"--{flag}-parallel-size={size} must be >= 1")
    etp = etp or tp
    if world % (tp * pp * cp):
        raise ValueError(f"--tensor-model-parallel-size / --pipeline-model-parallel-size / "
                         f"--context-parallel-size: {gpus} is not divisible by TP x PP x CP = "
                         f"{tp} x {pp} x {cp}")
    dp = world // (tp * pp * cp)
    if (tp * cp * dp) % (etp * ep):
        raise ValueError(
            f"--expert-model-parallel-size={ep}: expert-TP x EP = {etp} x {ep} must divide "
            f"TP x CP x DP = {tp} x {cp} x {dp} ({gpus} GPUs / PP {pp}); megatron lays the "
            "experts out as expert-TP x EP x PP x expert-DP over the same GPUs "
            "(--expert-tensor-parallel-size defaults to --tensor-model-parallel-size)")
    config = None if args.target is None else Path(args.target) / "config.json"
    if config is not None and config.is_file():
        _check_target(config, pp, ep)
    experts = (f"; experts: expert-TP {etp} x EP {ep} x PP {pp} x expert-DP "
               f"{tp * cp * dp // (etp * ep)}" if ep > 1 or args.expert_tensor_parallel_size
               else "")
    context = f" x CP {cp}" if cp > 1 else ""
    return f"TP {tp} x PP {pp}{context} x DP {dp}{experts}"


def _check_target(config: Path, pp: int, ep: int) -> None:
    """The layout against the target's config.json: equal pipeline stages, equal expert shards."""
    from transformers import AutoConfig

    from megatron_dflash.targets import moe

    try:
        hf = AutoConfig.from_pretrained(config.parent)
    except (OSError, ValueError) as e:
        raise ValueError(f"--target: {config} is not a readable HF config "
                         f"({' '.join(str(e).split())})") from None
    layers = hf.get_text_config().num_hidden_layers  # a VLM wrapper's: its text model's
    if layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size={pp} must divide the target's "
                         f"{layers} layers ({config}): every stage holds the same number")
    experts = moe.num_experts(hf)
    if experts is None and ep > 1:
        raise ValueError(f"--expert-model-parallel-size={ep}: the target ({config}) is dense (no "
                         "experts)")
    if experts is not None and experts % ep:
        raise ValueError(f"--expert-model-parallel-size={ep} must divide the target's "
                         f"num_experts={experts} ({config}): every expert-parallel rank holds the "
                         "same number of experts")


def _format_args(args: list[str]) -> str:
    """Quoted arguments, one flag (and its values) per continuation line."""
    out = ""
    for arg in args:
        out += (" \\\n    " if arg.startswith("--") else " ") + shlex.quote(arg)
    return out


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--run-dir", required=True,
                   help="holds checkpoints/, logs/, tensorboard/ and the script")
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--job-name", default="dflash")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--cpus-per-gpu", type=int, default=8)
    p.add_argument("--signal-lead-s", type=int, default=120,
                   help="seconds before the time limit at which the trainer is told to save")
    p.add_argument("--setup", default="", help="shell lines run first (modules, virtualenv)")
    p.add_argument("--python", default="python")
    a = p.parse_args(argv[:split])
    text = render(a.launcher, nodes=a.nodes, gpus_per_node=a.gpus_per_node, run_dir=a.run_dir,
                  train_args=argv[split + 1:], time=a.time, job_name=a.job_name,
                  partition=a.partition, account=a.account, cpus_per_gpu=a.cpus_per_gpu,
                  signal_lead_s=a.signal_lead_s, setup=a.setup, python=a.python)
    run_dir = Path(a.run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the job
    script = run_dir / f"{a.job_name}.sbatch"
    script.write_text(text)
    print(f"wrote {script}; submit with: sbatch {script}")
    return script


if __name__ == "__main__":
    main()
