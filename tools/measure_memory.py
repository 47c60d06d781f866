"""Per-rank peak memory of DFlash training at PP=1 and PP>1, on a model where the target dominates.

  python tools/measure_memory.py [--pipeline-sizes 1 2] [--layers 16 --hidden 512 ...]

Writes a random HF Llama target (default: 16 layers, hidden 512, ~50M parameters, against a
one-layer draft) and random conversations into a temporary directory, trains `--steps` steps at
each pipeline size with the training loop's own pieces (one torchrun job per size, one rank per
stage), and prints one row per rank. With pipeline parallelism each stage holds only its share of
the target's weights and runs only its layers' activations; the last stage also holds the draft,
its optimizer state, the output layer and a copy of the word embedding.

Columns: the rank's parameter bytes (target + draft), and its peak memory: on a GPU
`torch.cuda.max_memory_allocated`; on the CPU the process's peak resident set (getrusage max RSS)
minus its resident set just before the model was built (Python, torch and megatron themselves).
"""
from __future__ import annotations

import argparse
import datetime
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
    p.add_argument("--pipeline-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # pretrain flags, as JSON
    return p


def _write_inputs(a, root: str) -> tuple[str, str]:
    """A random Llama target and random conversations (prompt, then a supervised response)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megatron_dflash.data.dataset import write_indexed_dataset
    from megatron_dflash.data.tokenize import Tokenized

    target, data = os.path.join(root, "target"), os.path.join(root, "train")
    torch.manual_seed(0)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=a.vocab,
                         hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                         num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=a.seq_length, initializer_range=0.02)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    g = torch.Generator().manual_seed(0)
    half = a.seq_length // 2
    samples = [Tokenized(torch.randint(MASK + 1, a.vocab, (a.seq_length,), generator=g).tolist(),
                         [0] * half + [1] * (a.seq_length - half), a.seq_length)
               for _ in range(4 * a.global_batch_size)]
    write_indexed_dataset(data, samples, vocab_size=a.vocab)
    return target, data


def _pretrain_flags(a, target: str, data: str, pp: int) -> list[str]:
    return ["--target", target, "--mask-token-id", str(MASK), "--train-data", data,
            "--seq-length", str(a.seq_length), "--block-size", "16", "--num-anchors", "8",
            "--num-draft-layers", "1", "--target-layer-ids", "1", str(a.layers // 2),
            str(a.layers - 2), "--micro-batch-size", str(a.micro_batch_size),
            "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.steps),
            "--distill-weight", "0.5", "--pipeline-model-parallel-size", str(pp)]


def _worker(pretrain_flags: list[str]) -> None:
    """One rank: build and train with loop.py's pieces, then report (rank, stage, parameter
    bytes, peak bytes) on rank 0."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        from megatron_dflash import cpu
        cpu.apply()  # megatron-core's CPU adaptations
        backend, device = "gloo", torch.device("cpu")
    import psutil
    from megatron.core import parallel_state, tensor_parallel

    from megatron_dflash.data.dataset import build_dataset
    from megatron_dflash.training import loop
    from megatron_dflash.training.arguments import parse_args

    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    args = parse_args(pretrain_flags, world_size=dist.get_world_size())
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size,
                                             args.pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    train, _ = build_dataset(args.train_data, None, args.seq_length)
    baseline = psutil.Process().memory_info().rss
    model, cfg, _ = loop.build_models(args, device)
    optimizer, scheduler = loop.build_optimizer(args, model)
    batches = loop.MicroBatches(train, args, cfg, 0, 0)
    for _ in range(args.train_iters):
        loop.train_step(model, optimizer, scheduler,
                        [batches.next() for _ in range(args.num_microbatches)], cfg, args)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    row = dict(rank=dist.get_rank(), stage=parallel_state.get_pipeline_model_parallel_rank(),
               peak=peak, params=sum(p.numel() * p.element_size() for p in model.parameters()),
               trainable=sum(p.numel() * p.element_size()
                             for p in model.parameters() if p.requires_grad))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("memory " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def _launch(pretrain_flags: list[str], nproc: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env.setdefault("OMP_NUM_THREADS", "1")
    run = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
         f"--nproc-per-node={nproc}", os.path.abspath(__file__),
         "--worker", json.dumps(pretrain_flags)],
        cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in run.stdout.splitlines() if l.startswith("memory ")]
    if run.returncode or not lines:
        raise RuntimeError(f"PP={nproc} run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("memory "):])


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    if a.worker is not None:
        return _worker(json.loads(a.worker))
    root = a.workdir or tempfile.mkdtemp(prefix="dflash_memory_")
    target, data = _write_inputs(a, root)
    device = "GPU max_memory_allocated" if torch.cuda.is_available() else "CPU peak RSS - baseline"
    print(f"target: {a.layers} layers, hidden {a.hidden}, ffn {a.ffn}, vocab {a.vocab}; draft: 1 "
          f"layer; seq {a.seq_length}, micro-batch {a.micro_batch_size}, global batch "
          f"{a.global_batch_size}, {a.steps} steps; peak = {device}")
    print(f"{'layout':>7} {'rank':>4} {'stage':>5} {'params MiB':>10} {'trainable MiB':>13} "
          f"{'peak MiB':>9}")
    mib = 2 ** 20
    for pp in a.pipeline_sizes:
        for row in _launch(_pretrain_flags(a, target, data, pp), pp):
            print(f"{'PP' + str(pp):>7} {row['rank']:>4} {row['stage']:>5} "
                  f"{row['params'] / mib:>10.1f} {row['trainable'] / mib:>13.1f} "
                  f"{row['peak'] / mib:>9.1f}")


if __name__ == "__main__":
    main()
