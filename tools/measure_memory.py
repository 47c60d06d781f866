"""Per-rank memory of DFlash training: PP sizes for a dense target, EP sizes for an MoE target.

  python tools/measure_memory.py [--pipeline-sizes 1 2] [--layers 16 --hidden 512 ...]
  python tools/measure_memory.py --moe --world-size 4 [--expert-parallel-sizes 1 2 4]

Writes a random HF target into a temporary directory — a Llama (default: 16 layers, hidden 512,
~50M parameters) or, with --moe, a Qwen3-MoE whose routed experts hold most of its weights —
and random conversations, trains `--steps` steps at each layout with the training loop's own
pieces (one torchrun job per layout, started here: a process's peak memory covers one layout
only), and prints one row per rank against a one-layer draft.

Where the memory goes. With pipeline parallelism each stage holds only its layers of the target
and runs only their activations; the last stage also holds the draft, its optimizer state, the
output layer and a copy of the word embedding. With expert parallelism each rank holds only
num_experts / EP experts of every MoE layer (and 1/expert-TP of each), while attention, dense
layers, embeddings, routers and the draft stay whole on every rank of the data-parallel group
(split only by TP and PP); the draft's optimizer state is sharded over data-parallel ranks
(megatron's distributed optimizer). The target is frozen: no gradients, no optimizer state.

Columns: the rank's parameter bytes — the target's experts, the rest of the target, the draft —
the bytes of its optimizer state (Adam moments and fp32 master copies), and its peak memory:
on a GPU `torch.cuda.max_memory_allocated`; on the CPU the process's peak resident set
(getrusage max RSS) minus its resident set just before the model was built (Python, torch and
megatron themselves).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", action="store_true",
                   help="a Qwen3-MoE target (default: a dense Llama target)")
    p.add_argument("--pipeline-sizes", type=int, nargs="+", default=None,
                   help="default: 1 2 (dense), 1 (--moe)")
    p.add_argument("--expert-parallel-sizes", type=int, nargs="+", default=None,
                   help="--moe only; default: 1 2 4")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes of every layout (default: PP x EP of each layout)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536, help="dense FFN (also the draft's)")
    p.add_argument("--experts", type=int, default=16, help="--moe: routed experts per layer")
    p.add_argument("--moe-ffn", type=int, default=512, help="--moe: FFN size of each expert")
    p.add_argument("--top-k", type=int, default=2, help="--moe: experts per token")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # pretrain flags, as JSON
    return p


def _layouts(p: argparse.ArgumentParser, a) -> list[tuple[int, int]]:
    """(PP, EP) of every run, checked before anything is written."""
    if a.expert_parallel_sizes is not None and not a.moe:
        p.error("--expert-parallel-sizes: the dense target has no experts; add --moe")
    pipeline = a.pipeline_sizes or ([1] if a.moe else [1, 2])
    expert = a.expert_parallel_sizes or ([1, 2, 4] if a.moe else [1])
    for flag, sizes in (("--pipeline-sizes", pipeline), ("--expert-parallel-sizes", expert)):
        if min(sizes) < 1:
            p.error(f"{flag} {' '.join(map(str, sizes))}: sizes must be >= 1")
    bad = [ep for ep in expert if a.experts % ep]
    if a.moe and bad:
        p.error(f"--expert-parallel-sizes {bad[0]} must divide --experts {a.experts}")
    if a.layers < 3:
        p.error(f"--layers {a.layers} must be >= 3 (the draft taps layers 1, L/2 and L-2)")
    bad = [pp for pp in pipeline if a.layers % pp]
    if bad:
        p.error(f"--pipeline-sizes {bad[0]} must divide --layers {a.layers}")
    layouts = [(pp, ep) for pp in pipeline for ep in expert]
    if a.world_size is not None:
        bad = [(pp, ep) for pp, ep in layouts if a.world_size % (pp * ep)]
        if bad:
            p.error(f"--world-size {a.world_size} is not divisible by PP x EP = {bad[0][0]} x "
                    f"{bad[0][1]}")
    return layouts


def _write_inputs(a, root: str) -> tuple[str, str]:
    """A random target and random conversations (prompt, then a supervised response)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    from megatron_dflash.data.dataset import write_indexed_dataset
    from megatron_dflash.data.tokenize import Tokenized

    target, data = os.path.join(root, "target"), os.path.join(root, "train")
    torch.manual_seed(0)
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                  num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=a.seq_length, initializer_range=0.02)
    config = (Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], head_dim=a.hidden // 8,
                             num_experts=a.experts, num_experts_per_tok=a.top_k,
                             moe_intermediate_size=a.moe_ffn, **common)
              if a.moe else LlamaConfig(architectures=["LlamaForCausalLM"], **common))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    g = torch.Generator().manual_seed(0)
    half = a.seq_length // 2
    samples = [Tokenized(torch.randint(MASK + 1, a.vocab, (a.seq_length,), generator=g).tolist(),
                         [0] * half + [1] * (a.seq_length - half), a.seq_length)
               for _ in range(4 * a.global_batch_size)]
    write_indexed_dataset(data, samples, vocab_size=a.vocab)
    return target, data


def _pretrain_flags(a, target: str, data: str, pp: int, ep: int) -> list[str]:
    flags = ["--target", target, "--mask-token-id", str(MASK), "--train-data", data,
             "--seq-length", str(a.seq_length), "--block-size", "16", "--num-anchors", "8",
             "--num-draft-layers", "1", "--target-layer-ids",
             *map(str, sorted({1, a.layers // 2, a.layers - 2})), "--micro-batch-size", str(a.micro_batch_size),
             "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.steps),
             "--distill-weight", "0.5", "--pipeline-model-parallel-size", str(pp)]
    if a.moe:
        flags += ["--expert-model-parallel-size", str(ep)]
    return flags


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This rank's parameter bytes: the target's routed experts, the rest of the target, the
    draft (the trainable part)."""
    out = dict(experts=0, target=0, draft=0)
    for name, p in model.named_parameters():
        kind = "draft" if p.requires_grad else "experts" if ".experts." in name else "target"
        out[kind] += p.numel() * p.element_size()
    return out


def optimizer_bytes(optimizer, model: torch.nn.Module) -> int:
    """This rank's optimizer state: the Adam moments and any fp32 master copy of a parameter (a
    tensor of its own, not a view of the model's parameters, as the fp32 shards of megatron's
    distributed optimizer are)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for state in inner.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values()
                         if torch.is_tensor(t) and t.dim() > 0)
        total += sum(p.numel() * p.element_size() for group in inner.param_groups
                     for p in group["params"] if p.untyped_storage().data_ptr() not in own)
    return total


def measure(plan) -> dict:
    """Build the plan's `Trainer` and train `--train-iters` steps in the current world; this
    rank's layout position, parameter and optimizer bytes, and peak memory."""
    import psutil
    from megatron.core import parallel_state

    from megatron_dflash.training.microbatches import MicroBatches
    from megatron_dflash.training.step import to_device
    from megatron_dflash.training.trainer import Trainer

    baseline = psutil.Process().memory_info().rss
    trainer = Trainer(plan)
    batches = MicroBatches(trainer.train_data, plan, trainer.pad_id, 0)
    for _ in range(plan.run.training.train_iters):
        trainer.train_step([to_device(batches.next(), trainer.device)
                            for _ in range(plan.num_microbatches)])
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return dict(rank=dist.get_rank(), stage=parallel_state.get_pipeline_model_parallel_rank(),
                ep_rank=parallel_state.get_expert_model_parallel_rank(), peak=peak,
                optimizer=optimizer_bytes(trainer.optimizer, trainer.model),
                **parameter_bytes(trainer.model))


def _worker(pretrain_flags: list[str]) -> None:
    """One rank of a layout's torchrun job: measure, then print every rank's row on rank 0."""
    from megatron_dflash.distributed import distributed
    from megatron_dflash.training.pretrain import parse_plan

    plan = parse_plan(pretrain_flags)
    with distributed(plan.run.parallel, plan.run.training.seed):
        row = measure(plan)
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            print("memory " + json.dumps(rows), flush=True)


def _launch(pretrain_flags: list[str], nproc: int, label: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.setdefault("OMP_NUM_THREADS", "1")
    run = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
         f"--nproc-per-node={nproc}", os.path.abspath(__file__),
         "--worker", json.dumps(pretrain_flags)],
        cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in run.stdout.splitlines() if l.startswith("memory ")]
    if run.returncode or not lines:
        raise RuntimeError(f"{label} run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("memory "):])


def main(argv=None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    if a.worker is not None:
        return _worker(json.loads(a.worker))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        p.error("run it with plain python (--world-size N for N processes per layout): it starts "
                "one torchrun job per layout, since a process's peak memory covers one layout")
    layouts = _layouts(p, a)
    root = a.workdir or tempfile.mkdtemp(prefix="dflash_memory_")
    target, data = _write_inputs(a, root)
    device = "GPU max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS - baseline"
    moe = (f" (Qwen3-MoE: {a.experts} experts of ffn {a.moe_ffn}, top-{a.top_k}, in every layer)"
           if a.moe else "")
    print(f"target: {a.layers} layers, hidden {a.hidden}, ffn {a.ffn}, vocab {a.vocab}{moe}; "
          f"draft: 1 layer; seq {a.seq_length}, micro-batch {a.micro_batch_size}, global batch "
          f"{a.global_batch_size}, {a.steps} steps; peak = {device}")
    print(f"{'layout':>12} {'rank':>4} {'stage':>5} {'EP rank':>7} {'experts MiB':>11} "
          f"{'target rest MiB':>15} {'draft MiB':>9} {'optimizer MiB':>13} {'peak MiB':>9}")
    mib = 2 ** 20
    for pp, ep in layouts:
        world = a.world_size or pp * ep
        label = f"PP{pp}" + (f" EP{ep}" if a.moe else "") + f" DP{world // pp}"
        for row in _launch(_pretrain_flags(a, target, data, pp, ep), world, label):
            print(f"{label:>12} {row['rank']:>4} {row['stage']:>5} {row['ep_rank']:>7} "
                  f"{row['experts'] / mib:>11.1f} {row['target'] / mib:>15.1f} "
                  f"{row['draft'] / mib:>9.1f} {row['optimizer'] / mib:>13.1f} "
                  f"{row['peak'] / mib:>9.1f}")


if __name__ == "__main__":
    main()
