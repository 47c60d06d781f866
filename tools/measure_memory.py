"""Per-rank memory of DFlash training: PP sizes for a dense target, EP sizes for an MoE target,
CP sizes at long sequences, measured; and the analytic model (`megatron_dflash/step_memory.py`)
for a Qwen3-8B-like target at 32K and 128K tokens.

  python tools/measure_memory.py [--pipeline-sizes 1 2] [--layers 16 --hidden 512 ...]
  python tools/measure_memory.py --moe --world-size 4 [--expert-parallel-sizes 1 2 4]
  python tools/measure_memory.py --context-parallel-sizes 1 2 4 --layers 4 --hidden 256 \
      --ffn 768 --seq-length 2048
  python tools/measure_memory.py --analytic [--lengths 32768 131072] [--cp-sizes 1 2 4 8]

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
(megatron's distributed optimizer). With context parallelism each rank runs the target on S/CP
tokens and the draft on N/CP blocks, but every rank holds the whole weights and the draft's
whole context (the gathered taps and each draft layer's context K/V); CP shards the optimizer
state like DP. The target is frozen: no gradients, no optimizer state.

Columns: the rank's parameter bytes — the target's experts, the rest of the target, the draft —
the bytes of its optimizer state (Adam moments and fp32 master copies), and its peak memory:
on a GPU `torch.cuda.max_memory_allocated`; on the CPU the process's peak resident set
(getrusage max RSS) minus its resident set just before the model was built (Python, torch and
megatron themselves). `activations` is the most a training step holds above what is allocated
when it starts (GPU: the CUDA allocator's peak; CPU: the resident set's, `activation_peak`),
`static` the weights, the draft's gradient buffer and the optimizer state, and
`analytic` the model's peak for the same shapes and layout on the draft's (last) stage of a
dense target (`step_memory.step_memory`, its CPU terms); it is meant for sizes where the step's
activations dominate the resident set's noise (MiBs of Python and allocator state).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

from megatron_dflash import step_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = 3
# The analytic table's target: Qwen3-8B (36 layers, GQA 32/8 x 128, untied 151936 vocabulary),
# built up to its deepest tap (the reference's taps for five draft layers, [1, 9, 17, 25, 33]:
# 34 layers), and a five-layer draft of its width; bf16, no distillation.
QWEN3_8B = dict(hidden=4096, ffn=12288, heads=32, groups=8, head_dim=128, vocab=151936, layers=34,
                taps=5, draft_layers=5, draft_ffn=12288, draft_heads=32, draft_groups=8,
                draft_head_dim=128)
CARD_GIB = 80


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", action="store_true",
                   help="a Qwen3-MoE target (default: a dense Llama target)")
    p.add_argument("--pipeline-sizes", type=int, nargs="+", default=None,
                   help="default: 1 2 (dense), 1 (--moe or --context-parallel-sizes)")
    p.add_argument("--expert-parallel-sizes", type=int, nargs="+", default=None,
                   help="--moe only; default: 1 2 4")
    p.add_argument("--context-parallel-sizes", type=int, nargs="+", default=None,
                   help="measure these CP sizes (default: 1)")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes of every layout (default: PP x EP x CP of each layout)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536, help="dense FFN (also the draft's)")
    p.add_argument("--experts", type=int, default=16, help="--moe: routed experts per layer")
    p.add_argument("--moe-ffn", type=int, default=512, help="--moe: FFN size of each expert")
    p.add_argument("--top-k", type=int, default=2, help="--moe: experts per token")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-anchors", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="default: a new temporary directory")
    g = p.add_argument_group("the analytic model (no run)")
    g.add_argument("--analytic", action="store_true", help=(
        f"print the model's per-rank memory for a Qwen3-8B-like target on one node of "
        f"--gpus {CARD_GIB} GB cards (DP = GPUs / (TP x CP)) instead of measuring"))
    g.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    g.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    g.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2],
                   help="with sequence parallelism when > 1")
    g.add_argument("--gpus", type=int, default=8)
    g.add_argument("--blocks", type=int, default=512, help="N blocks of 16 per sequence")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # pretrain flags, as JSON
    return p


def _layouts(p: argparse.ArgumentParser, a) -> list[tuple[int, int, int]]:
    """(PP, EP, CP) of every run, checked before anything is written."""
    if a.expert_parallel_sizes is not None and not a.moe:
        p.error("--expert-parallel-sizes: the dense target has no experts; add --moe")
    context = a.context_parallel_sizes or [1]
    pipeline = a.pipeline_sizes or ([1] if a.moe or a.context_parallel_sizes else [1, 2])
    expert = a.expert_parallel_sizes or ([1, 2, 4] if a.moe else [1])
    for flag, sizes in (("--pipeline-sizes", pipeline), ("--expert-parallel-sizes", expert),
                        ("--context-parallel-sizes", context)):
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
    bad = [cp for cp in context if a.seq_length % (2 * cp)]
    if bad:
        p.error(f"--context-parallel-sizes {bad[0]}: --seq-length {a.seq_length} must be a "
                f"multiple of 2 x CP = {2 * bad[0]}")
    layouts = [(pp, ep, cp) for pp in pipeline for ep in expert for cp in context]
    if a.world_size is not None:
        bad = [layout for layout in layouts if a.world_size % math.prod(layout)]
        if bad:
            p.error(f"--world-size {a.world_size} is not divisible by PP x EP x CP = "
                    + " x ".join(map(str, bad[0])))
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


def _pretrain_flags(a, target: str, data: str, pp: int, ep: int, cp: int = 1) -> list[str]:
    flags = ["--target", target, "--mask-token-id", str(MASK), "--train-data", data,
             "--seq-length", str(a.seq_length), "--block-size", "16",
             "--num-anchors", str(a.num_anchors), "--num-draft-layers", "1",
             "--target-layer-ids", *map(str, sorted({1, a.layers // 2, a.layers - 2})),
             "--micro-batch-size", str(a.micro_batch_size),
             "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.steps),
             "--distill-weight", "0.5", "--pipeline-model-parallel-size", str(pp),
             "--context-parallel-size", str(cp), "--seq-length-buckets", "1"]
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


def activation_peak(step) -> int:
    """The most `step()` holds above what is allocated when it starts: the CUDA allocator's peak,
    or on the CPU the process's peak resident set during the step (Linux's VmHWM, reset first
    through /proc/self/clear_refs) above its resident set at the start. Frees return memory to
    the system at once (`_launch` sets glibc's mmap threshold to 64 KiB), so the resident set
    follows what is allocated, whichever thread frees it (gloo's workers free gathered tensors,
    which torch's profiler on this thread would not see)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - start) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def shapes_of(plan) -> step_memory.Shapes:
    """The analytic model's shapes of a plan's target and draft."""
    t, d = plan.target.config, plan.dflash
    distill = plan.distill_weight > 0
    return step_memory.Shapes(
        hidden=t.hidden_size, ffn=t.ffn_hidden_size, heads=t.num_attention_heads,
        groups=t.num_query_groups, head_dim=t.kv_channels, vocab=plan.target.hf_config.vocab_size,
        layers=t.num_layers if distill else max(d.target_layer_ids) + 1,
        taps=len(d.target_layer_ids), draft_layers=d.num_draft_layers,
        draft_ffn=d.ffn_hidden_size, draft_heads=d.num_attention_heads,
        draft_groups=d.num_key_value_heads, draft_head_dim=d.head_dim,
        tied=plan.target.hf_config.tie_word_embeddings, final_norm=distill,
        qk_norm=t.qk_layernorm)


def measure(plan) -> dict:
    """Build the plan's `Trainer` and train `--train-iters` steps in the current world (the
    last one measured for its activations); this rank's layout position, parameter, gradient
    buffer and optimizer bytes, peak memory, and the analytic model's peak for it."""
    import psutil
    from megatron.core import parallel_state

    from megatron_dflash.training.microbatches import MicroBatches
    from megatron_dflash.training.trainer import Trainer

    baseline = psutil.Process().memory_info().rss
    trainer = Trainer(plan)
    batches = MicroBatches(trainer.train_data, plan, trainer.pad_id, 0)

    def step():
        trainer.train_step([batches.next() for _ in range(plan.num_microbatches)])

    for _ in range(plan.run.training.train_iters - 1):
        step()
    activations = activation_peak(step)
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in trainer.model.buffers)
    row = dict(rank=dist.get_rank(), stage=parallel_state.get_pipeline_model_parallel_rank(),
               ep_rank=parallel_state.get_expert_model_parallel_rank(),
               cp_rank=parallel_state.get_context_parallel_rank(), peak=peak,
               optimizer=optimizer_bytes(trainer.optimizer, trainer.model), grads=grads,
               activations=activations, **parameter_bytes(trainer.model))
    row["static"] = sum(row[k] for k in ("experts", "target", "draft", "grads", "optimizer"))
    p = plan.run.parallel
    layout = step_memory.Layout(tp=p.tensor_model_parallel_size,
                                pp=p.pipeline_model_parallel_size, cp=p.context_parallel_size,
                                dp=plan.data_parallel_size, sp=p.sequence_parallel)
    row["analytic"] = step_memory.step_memory(
        shapes_of(plan), layout, batches.buckets[-1], plan.dflash.num_anchors,
        plan.dflash.block_size, micro_batch=plan.run.training.micro_batch_size,
        bf16=plan.run.precision.bf16, distill=plan.distill_weight > 0,
        chunk_rows=plan.run.dflash.loss_chunk_size, gpu=trainer.device.type == "cuda")["peak"]
    return row


def analytic_table(a) -> None:
    """The model's per-rank GiB for the Qwen3-8B-like target (`QWEN3_8B`) at every length, TP
    and CP size on one node of `--gpus` cards, and whether it fits `CARD_GIB`."""
    shapes = step_memory.Shapes(**QWEN3_8B)
    print(f"analytic, per rank, GiB: Qwen3-8B-like target to its deepest tap ({shapes.layers} "
          f"layers) + a {shapes.draft_layers}-layer draft, bf16, {a.blocks} blocks of 16, "
          f"micro-batch 1, one node of {a.gpus} GPUs (DP = GPUs / (TP x CP)); Transformer "
          "Engine's CP attention, FlexAttention (megatron_dflash/step_memory.py)")
    columns = ("target weights", "draft weights, grads", "optimizer shard", "target forward",
               "draft context", "draft blocks", "draft loss / attention in flight", "peak")
    print(f"{'tokens':>7} {'layout':>11} " + " ".join(f"{c.split(',')[0][:14]:>14}"
                                                      for c in columns) + f" {'fits':>5}")
    for length in a.lengths:
        for tp in a.tp_sizes:
            for cp in a.cp_sizes:
                if a.gpus % (tp * cp):
                    continue
                layout = step_memory.Layout(tp=tp, cp=cp, dp=a.gpus // (tp * cp), sp=tp > 1)
                r = step_memory.step_memory(shapes, layout, length, a.blocks, 16)
                name = f"TP{tp}{'+SP' if tp > 1 else ''} CP{cp}"
                fits = "yes" if r["peak"] <= CARD_GIB * 10 ** 9 else "no"
                print(f"{length:>7} {name:>11} "
                      + " ".join(f"{r[c] / step_memory.GIB:>14.1f}" for c in columns)
                      + f" {fits:>5}")


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
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # see activation_peak
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
    if a.analytic:
        return analytic_table(a)
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
          f"draft: 1 layer; seq {a.seq_length}, {a.num_anchors} blocks of 16, micro-batch "
          f"{a.micro_batch_size}, global batch {a.global_batch_size}, {a.steps} steps; "
          f"peak = {device}")
    print(f"{'layout':>15} {'rank':>4} {'stage':>5} {'EP rank':>7} {'experts MiB':>11} "
          f"{'target rest MiB':>15} {'draft MiB':>9} {'optimizer MiB':>13} {'peak MiB':>9} "
          f"{'static MiB':>10} {'activations':>11} {'analytic MiB':>12}")
    mib = 2 ** 20
    for pp, ep, cp in layouts:
        world = a.world_size or pp * ep * cp
        label = (f"PP{pp}" + (f" EP{ep}" if a.moe else "") + (f" CP{cp}" if cp > 1 else "")
                 + f" DP{world // (pp * cp)}")
        for row in _launch(_pretrain_flags(a, target, data, pp, ep, cp), world, label):
            measured = row["static"] + row["activations"]
            analytic = (f"{row['analytic'] / mib:>12.1f} ({row['analytic'] / measured - 1:+.0%})"
                        if row["stage"] == pp - 1 and not a.moe else "")  # the draft's stage
            print(f"{label:>15} {row['rank']:>4} {row['stage']:>5} {row['ep_rank']:>7} "
                  f"{row['experts'] / mib:>11.1f} {row['target'] / mib:>15.1f} "
                  f"{row['draft'] / mib:>9.1f} {row['optimizer'] / mib:>13.1f} "
                  f"{row['peak'] / mib:>9.1f} {row['static'] / mib:>10.1f} "
                  f"{row['activations'] / mib:>11.1f} {analytic}")


if __name__ == "__main__":
    main()
