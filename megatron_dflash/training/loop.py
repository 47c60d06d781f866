"""`pretrain(args)`: build target, draft, data and optimizer, then train with megatron-core.

Everything distributed is megatron's own: `parallel_state` groups, the pipeline schedule from
`get_forward_backward_func`, `DistributedDataParallel` + `DistributedOptimizer`,
`finalize_model_grads`, `OptimizerParamScheduler` and dist-checkpointing (`checkpoint.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module

from megatron_dflash import atomic, checkpoint, feature_cache
from megatron_dflash.draft_export import TOKENIZER_FILES, export_checkpoint
from megatron_dflash.config import DFlashConfig, draft_transformer_config
from megatron_dflash.data.dataset import ResumableSampler, build_dataset, collate
from megatron_dflash.data.tokenize import load_chat_tokenizer, tokenizer_spec
from megatron_dflash.fp8 import sequence_multiple
from megatron_dflash.specs import get_dflash_model_spec
from megatron_dflash.targets import (build_target, hf_tensor, load_hf_config, load_hf_weights,
                                   target_transformer_config)
from megatron_dflash.training.arguments import dflash_config, moe_parallel
from megatron_dflash.training.embedded import finish_embedded_default, prepare_embedded_default
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.pipeline import word_embedding_replica
from megatron_dflash.training.prefetch import Prefetcher
from megatron_dflash.training.progress import Progress, is_logging_rank
from megatron_dflash.training.signals import ExitSignalHandler
from megatron_dflash.training.step import (anchor_generator, global_weight_sum, make_forward_step,
                                           prepare_microbatch, to_device)

EVAL_SEED = 987_654_321


def log(msg: str) -> None:
    """Print once, from the last rank (it holds the pipeline's last stage and the losses)."""
    if is_logging_rank():
        print(msg, flush=True)


def build_models(args, device):
    """Frozen target (HF import; this pipeline stage's layers) and, on the last stage, a fresh
    draft, as one DDP-wrapped training chunk.

    Without distillation nothing reads the target past its deepest tapped layer, so it is built
    as a feature extractor up to that layer (`build_target(last_layer=...)`): later layers, its
    final norm and their weights are never allocated, loaded or run. Training from an offline
    feature cache (--offline-features) builds no decoder layer at all: only the embedding and
    output layer the draft borrows.
    """
    hf_config, tcfg, cfg = model_configs(args)
    last_layer = None if args.distill_weight > 0 else max(cfg.target_layer_ids)
    if args.offline_features:
        last_layer = -1
    target = build_target(hf_config, tcfg, backend=_backend(args), last_layer=last_layer)
    load_hf_weights(target, args.target)
    # PP > 1: a sent payload is freed at once (only its autograd node is needed, for the zero
    # gradient), and since micro-batches differ in length the schedule exchanges every payload's
    # shape. (Set after construction: TransformerConfig refuses variable lengths with its default
    # MoE token dispatcher, which a dense model never uses.)
    pipelined = args.pipeline_model_parallel_size > 1
    # The target is allocated on the CPU and loaded there; the draft is initialised where it
    # trains.
    dcfg = draft_transformer_config(cfg, tcfg, perform_initialization=True,
                                    use_cpu_initialization=device.type == "cpu",
                                    deallocate_pipeline_outputs=pipelined, **args.fp8.fields())
    dcfg.variable_seq_lengths = pipelined
    if target.post_process:
        draft = build_module(get_dflash_model_spec(cfg.num_draft_layers, _backend(args),
                                                   args.attention),
                             config=dcfg, dflash_config=cfg)
        # The borrowed LM head expects inputs at the scale of the target's final norm: start there.
        with torch.no_grad():
            draft.decoder.final_layernorm.weight.copy_(hf_tensor(args.target, "model.norm.weight"))
        embedding = None if target.pre_process else word_embedding_replica(target, args.target)
        module = DFlashTrainingModule(target, draft, embedding=embedding)
    else:
        module = DFlashTrainingModule(target, config=dcfg, target_layer_ids=cfg.target_layer_ids)
    return wrap_training_chunk(module.to(device), dcfg, args.use_distributed_optimizer), cfg, \
        hf_config


def model_configs(args):
    """(HF config, the target's TransformerConfig, the resolved DFlashConfig): the same settings
    parse_args checked against config.json before anything was built."""
    hf_config = load_hf_config(args.target)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tcfg = target_transformer_config(hf_config, tensor_parallel_size=args.tensor_model_parallel_size,
                                     sequence_parallel=args.sequence_parallel, params_dtype=dtype,
                                     pipeline_parallel_size=args.pipeline_model_parallel_size,
                                     **moe_parallel(args), **args.target_fp8.fields())
    cfg = dflash_config(args).resolve(tcfg, vocab_size=hf_config.vocab_size,
                                      target_rope_theta=hf_config.rope_parameters["rope_theta"])
    return hf_config, tcfg, cfg


def wrap_training_chunk(module: DFlashTrainingModule, dcfg, use_distributed_optimizer: bool):
    """`module` as megatron's schedule and optimizer take it: Float16Module when the draft is
    bf16, then megatron DDP (fp32 gradient reduction), with the config hooks the schedule calls."""
    if dcfg.bf16:
        module = Float16Module(dcfg, module)
    ddp = DistributedDataParallel(
        config=dcfg, module=module,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer))
    dcfg.no_sync_func = ddp.no_sync
    dcfg.finalize_model_grads_func = finalize_model_grads
    return ddp


def _backend(args) -> str:
    return "te" if args.transformer_impl == "transformer_engine" else "local"


def build_optimizer(args, model):
    """megatron's optimizer (Adam, distributed by default) and LR schedule.

    A constant loss scale of 1 (which changes no number) turns on megatron's own inf/NaN check of
    the gradients in its mixed-precision optimizers — the distributed one and any bf16 one: a
    step whose gradients are not finite makes no update (`train_step`)."""
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer, loss_scale=1.0), [model])
    warmup = int(args.lr_warmup_fraction * args.train_iters)
    scheduler = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")
    return opt, scheduler


class MicroBatches:
    """This data-parallel rank's micro-batches, prepared (anchors drawn) from the resumable sampler.

    Sequences are padded to the smallest of `--seq-length-buckets` fixed lengths that holds the
    micro-batch (one bucket: always `--seq-length`), each a multiple of what sequence
    parallelism and the target's and draft's FP8 GEMMs need, so compiled attention sees one shape
    per bucket; the block tokens (N * block_size) are padded to what the draft's GEMMs need.
    """

    def __init__(self, dataset, args, cfg: DFlashConfig, pad_id: int, consumed_samples: int,
                 shuffle: bool = True, seed: int | None = None):
        self.dataset, self.cfg, self.pad_id = dataset, cfg, pad_id
        self.seed = args.seed if seed is None else seed
        tp, sp = args.tensor_model_parallel_size, args.sequence_parallel
        self.buckets = sequence_buckets(args.seq_length, args.seq_length_buckets,
                                        sequence_multiple(tp, sp, args.fp8, args.target_fp8))
        self.block_multiple = sequence_multiple(tp, sp, args.fp8)
        self.attention = args.attention
        self.sampler = ResumableSampler(
            len(dataset), args.micro_batch_size, parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), seed=self.seed,
            consumed_samples=consumed_samples, shuffle=shuffle)
        self._it = iter(self.sampler)

    def next(self) -> dict:
        indices = next(self._it)
        s = self.sampler
        position = s.consumed_samples - s.step + s.rank * s.micro_batch_size
        samples = [self.dataset[i] for i in indices]
        batch = collate(samples, self.pad_id, buckets=self.buckets)
        features = None  # the offline cache's taps, padded as the tokens are
        if "features" in samples[0]:
            features = feature_cache.pad_features(samples, batch["tokens"].shape[1])
        return prepare_microbatch(batch["tokens"], batch["loss_mask"], self.cfg,
                                  anchor_generator(self.seed, position), self.attention,
                                  self.block_multiple, batch["lengths"], features)

    def prefetcher(self, device: torch.device, depth: int = 2) -> Prefetcher:
        """These micro-batches prepared `depth` ahead, each with the consumed-sample count after it."""
        return Prefetcher(lambda: (self.next(), self.sampler.consumed_samples), device, depth)


def sequence_buckets(seq_length: int, count: int, multiple: int) -> list[int]:
    """`count` evenly spaced padded lengths up to `seq_length`, each rounded up to `multiple`."""
    return sorted({-(-(seq_length * (i + 1) // count) // multiple) * multiple
                   for i in range(count)})


def _reduce_reports(reports: list[dict]) -> dict[str, torch.Tensor]:
    """Sum the micro-batch reports, then over data-parallel ranks. Only the last pipeline stage
    has reports (the loss lives there); the other stages receive its sums."""
    out = None
    if parallel_state.is_pipeline_last_stage():
        out = {k: sum(r[k].double() for r in reports) for k in ("loss", "correct", "total", "tau")}
        for v in out.values():
            dist.all_reduce(v, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [None if out is None else {k: v.cpu() for k, v in out.items()}]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        out = box[0]
    return out


def run_step(model, microbatches: list[dict], cfg, args, forward_only: bool):
    """One forward(+backward) over `microbatches` (on the training device) with megatron's
    schedule; returns the reports."""
    scale = 1.0
    if not forward_only:
        total = global_weight_sum(microbatches, parallel_state.get_data_parallel_group())
        scale = len(microbatches) * parallel_state.get_data_parallel_world_size() / max(total, 1e-12)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(cfg, args.distill_weight, scale,
                                            args.loss_chunk_size),
        data_iterator=iter(microbatches), model=[model], num_microbatches=len(microbatches),
        seq_length=microbatches[0]["tokens"].shape[1], micro_batch_size=args.micro_batch_size,
        forward_only=forward_only)


def train_step(model, optimizer, scheduler, microbatches: list[dict], cfg, args):
    """One optimizer step over this rank's micro-batches: (their reports, on the last pipeline
    stage only, and the global gradient norm before clipping; NaN when megatron's optimizer
    found inf/NaN gradients and skipped the update and the LR schedule step)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_step(model, microbatches, cfg, args, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:  # inf/NaN gradients (build_optimizer): no update, as Megatron-LM
        return reports, math.nan
    scheduler.step(increment=1)
    return reports, float(grad_norm or 0.0)


@torch.no_grad()
def evaluate_tau(model, valid, cfg, args, pad_id) -> tuple[float, list[float]]:
    """τ̂ and per-position accuracy of the draft on held-out conversations (fixed anchors)."""
    model.eval()
    n = min(args.eval_samples, len(valid))
    n -= n % (args.micro_batch_size * parallel_state.get_data_parallel_world_size())
    if n == 0:
        raise ValueError(f"--eval-samples/held-out data ({len(valid)}) cannot fill one micro-batch "
                         "per data-parallel rank")
    batches = MicroBatches(torch.utils.data.Subset(valid, range(n)), args, cfg, pad_id, 0,
                           shuffle=False, seed=EVAL_SEED)
    count = n // (args.micro_batch_size * parallel_state.get_data_parallel_world_size())
    device = next(model.parameters()).device
    reports = run_step(model, [to_device(batches.next(), device) for _ in range(count)], cfg, args,
                       forward_only=True)
    model.train()
    return _tau_and_accuracy(_reduce_reports(reports))


def build_data(args):
    """(training dataset, held-out dataset or None, pad id) from --train-data / --valid-data."""
    needs_tokenizer = any(not IndexedDataset.exists(p) for p in args.train_data + (args.valid_data or []))
    tokenizer = load_chat_tokenizer(tokenizer_spec(args.tokenizer, args.target)) if needs_tokenizer else None
    train, report = build_dataset(args.train_data, tokenizer, args.seq_length)
    if report is not None:
        log(report.summary())
    if args.max_train_samples:
        train = torch.utils.data.Subset(train, range(min(args.max_train_samples, len(train))))
    valid = build_dataset(args.valid_data, tokenizer, args.seq_length)[0] if args.valid_data else None
    pad_id = tokenizer.pad_id if tokenizer else 0  # padding is never attended to nor supervised
    return train, valid, pad_id


def offline_features(args, splits, pad_id: int, device):
    """--offline-features DIR: the (train, held-out or None) datasets read from the cache. When
    `splits` (train, valid or None) are given, DIR holds no cache yet: it is written first by the
    frozen target's forward (`feature_cache.write_feature_cache`, as tools/cache_features.py
    does), and the target is freed before the training models are built."""
    hf_config, tcfg, cfg = model_configs(args)
    manifest = feature_cache.cache_manifest(args.target, cfg.target_layer_ids, args.seq_length,
                                            args.offline_features_dtype)
    directory = args.offline_features
    if splits is not None:
        target = build_target(hf_config, tcfg, backend=_backend(args), post_process=False,
                              last_layer=max(cfg.target_layer_ids))
        load_hf_weights(target, args.target)
        feature_cache.write_feature_cache(
            directory, {"train": splits[0], **({"valid": splits[1]} if splits[1] else {})},
            target.to(device), cfg.target_layer_ids, manifest,
            micro_batch_size=args.micro_batch_size, pad_id=pad_id,
            pad_multiple=sequence_multiple(args.tensor_model_parallel_size,
                                           args.sequence_parallel, args.target_fp8), log=log)
        del target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    train = feature_cache.FeatureCacheDataset(directory, manifest)
    log(f"feature cache {directory}: {len(train)} samples, {train.manifest['num_tokens']} "
        "tokens (training from it builds no target decoder layer)")
    valid = None
    if args.valid_data:
        valid = feature_cache.FeatureCacheDataset(
            os.path.join(directory, feature_cache.VALID_SPLIT), manifest)
    return train, valid


def pretrain(args) -> dict:
    """Train; returns {'tau_start', 'tau_end', 'losses', 'grad_norms'} (and 'export', the
    --export directory) on every rank (for tests and the embedded demo)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    embedded = args.target is None or args.train_data is None
    if embedded:
        prepare_embedded_default(args)
    if args.distill_weight is None:
        args.distill_weight = 0.0
    torch.manual_seed(args.seed)

    t0 = time.time()
    # An existing feature cache stands for the data: nothing is tokenised or read from it.
    cached = args.offline_features is not None and feature_cache.is_cache(args.offline_features)
    train, valid, pad_id = (None, None, 0) if cached else build_data(args)
    if args.offline_features is not None:
        train, valid = offline_features(args, None if cached else (train, valid), pad_id, device)
        if args.max_train_samples:
            train = torch.utils.data.Subset(train, range(min(args.max_train_samples, len(train))))
    model, cfg, hf_config = build_models(args, device)
    optimizer, scheduler = build_optimizer(args, model)
    log(f"target {args.target}: {hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}"
        f" | draft {cfg.num_draft_layers} layers, taps {cfg.target_layer_ids}, block {cfg.block_size},"
        f" mask id {cfg.mask_token_id}, gamma {cfg.loss_gamma:g}, distill {args.distill_weight:g}"
        f" | {len(train)} training conversations | set-up {time.time() - t0:.1f}s")

    iteration, consumed = 0, 0
    if args.load and args.finetune:
        checkpoint.load_weights(args.load, model)
        log(f"loaded draft weights from {args.load}; optimizer, schedule and data start afresh")
    elif args.load:
        extra = checkpoint.load_checkpoint(args.load, model, optimizer, scheduler)
        iteration, consumed = extra["iteration"], extra["consumed_samples"]
        log(f"resumed from {args.load} at iteration {iteration} ({consumed} samples consumed)")
    batches = MicroBatches(train, args, cfg, pad_id, consumed)
    writer = _tensorboard(args)
    result = {"losses": [], "grad_norms": []}
    if valid is not None:
        result["tau_start"], acc = evaluate_tau(model, valid, cfg, args, pad_id)
        log(f"held-out tau {result['tau_start']:.3f} at iteration {iteration} | acc@1..3 "
            + " ".join(f"{a:.3f}" for a in acc[:3]))

    extra_state = {"dflash_config": dataclasses.asdict(cfg),
                   "target": {"path": os.path.abspath(args.target), "hf_config": hf_config.to_dict()},
                   "world_size": dist.get_world_size()}
    progress = Progress(args.train_iters, iteration, args.log_interval, _metrics_path(args))
    # SIGTERM / SIGUSR1 (SLURM pre-emption, time limit): finish the iteration, save, leave.
    exit_signal = ExitSignalHandler() if args.exit_signal_handler else None
    result["exit_signal"], skipped_total, skipped_in_row = None, 0, 0
    with exit_signal or contextlib.nullcontext(), batches.prefetcher(device) as prefetched:
        while iteration < args.train_iters:
            t = time.time()
            microbatches = []
            for _ in range(args.num_microbatches):
                mb, consumed = prefetched.next()
                microbatches.append(mb)
            reports, grad_norm = train_step(model, optimizer, scheduler, microbatches, cfg, args)
            iteration += 1
            r = _reduce_reports(reports)
            loss = float(r["loss"][0] / r["loss"][1].clamp(min=1e-12))
            tau, acc = _tau_and_accuracy(r)
            if r["tau"][1] == 0:
                progress.print(f"iteration {iteration}: no supervised block in this global batch "
                               f"(no response span holds a block of {cfg.block_size} tokens)")
            if math.isfinite(grad_norm) and math.isfinite(loss):
                skipped_in_row = 0
            else:  # megatron's optimizer found inf/NaN gradients and made no update
                skipped_total, skipped_in_row = skipped_total + 1, skipped_in_row + 1
                progress.print(f"iteration {iteration}: loss {loss} / grad norm {grad_norm} not "
                               f"finite: update skipped ({skipped_in_row} in a row)")
                if skipped_in_row >= args.max_skipped_steps:
                    raise TrainingError(
                        f"{skipped_in_row} iterations in a row had non-finite loss or gradients "
                        f"(last: iteration {iteration}); stopping (--max-skipped-steps "
                        f"{args.max_skipped_steps}); lower --lr or check the data")
            lr = scheduler.get_lr(optimizer.param_groups[0])
            result["losses"].append(loss)
            result["grad_norms"].append(grad_norm)
            metrics = {"loss": loss, "tau": tau, "acc": acc, "lr": lr, "grad_norm": grad_norm,
                       "consumed_samples": consumed, "skipped_iterations": skipped_total}
            tokens = sum(mb["tokens"].numel() for mb in microbatches) \
                * parallel_state.get_data_parallel_world_size()
            progress.iteration(iteration, metrics, tokens, time.time() - t)
            if writer is not None:
                for k, v in (("loss", loss), ("tau_hat", tau), ("lr", lr), ("grad_norm", grad_norm),
                             ("acc_pos1", acc[0])):
                    writer.add_scalar(f"train/{k}", v, iteration)
            if valid is not None and args.eval_interval and iteration % args.eval_interval == 0 \
                    and iteration < args.train_iters:
                t_, _ = evaluate_tau(model, valid, cfg, args, pad_id)
                progress.print(f"held-out tau {t_:.3f} at iteration {iteration}")
            exiting = exit_signal is not None and exit_signal.should_exit()
            if args.save and (exiting or iteration == args.train_iters
                              or (args.save_interval and iteration % args.save_interval == 0)):
                path = checkpoint.save_checkpoint(
                    args.save, iteration, model, optimizer, scheduler,
                    dict(extra_state, consumed_samples=consumed))
                progress.print(f"saved checkpoint {path}")
            if exiting:
                result["exit_signal"] = (exit_signal.received.name if exit_signal.received
                                         else "a signal on another rank")
                progress.print(f"exiting after iteration {iteration}: received "
                               f"{result['exit_signal']}"
                               + ("" if args.save else " (no --save: nothing saved)"))
                break
    progress.close()
    result["skipped_iterations"] = skipped_total
    if valid is not None and result["exit_signal"] is None:
        result["tau_end"], acc = evaluate_tau(model, valid, cfg, args, pad_id)
        log(f"held-out tau {result['tau_end']:.3f} at iteration {iteration} | acc@1..3 "
            + " ".join(f"{a:.3f}" for a in acc[:3]))
    if writer is not None:
        writer.close()
    if args.export and (result["exit_signal"] is None or args.save):
        result["export"] = export_draft(args, model, optimizer, scheduler, iteration,
                                        dict(extra_state, consumed_samples=consumed))
        log(f"exported the draft (iteration {iteration}) to {result['export']}")
        if embedded and getattr(args, "embedded_eval_prompts", None):
            finish_embedded_default(args, result)
    elif args.export:
        log(f"--export {args.export}: nothing exported (no --save: no checkpoint of the draft "
            "was saved before the exit)")
    return result


def export_draft(args, model, optimizer, scheduler, iteration: int, extra: dict) -> str:
    """--export DIR: the draft in the reference format, from this iteration's checkpoint in
    --save (or, without one, a temporary checkpoint beside DIR), which `draft_export` reads with
    the TP/PP shards gathered: every rank reads, rank 0 writes. Collective. An earlier export in
    DIR is replaced once the new one is complete."""
    out = os.path.abspath(args.export)
    root = args.save
    if root is None or not os.path.isdir(checkpoint.iteration_dir(root, iteration)):
        root = out + ".checkpoint-partial"
        checkpoint.save_checkpoint(root, iteration, model, optimizer, scheduler, extra)
    rank0 = dist.get_rank() == 0
    fresh = rank0 and (not os.path.exists(out) or not os.listdir(out))  # rank 0 alone writes
    written = out if fresh else out + ".export-partial"
    if rank0:
        shutil.rmtree(out + ".export-partial", ignore_errors=True)
    tokenizer = args.target if any(os.path.isfile(os.path.join(args.target, f))
                                   for f in TOKENIZER_FILES) else None
    try:
        export_checkpoint(root, written, iteration=iteration, tokenizer_dir=tokenizer)
        dist.barrier()  # every rank has read the checkpoint
        if rank0 and not fresh:
            atomic.publish(written, out, replace=True)
    finally:
        if rank0 and root != args.save:
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    return out


class TrainingError(RuntimeError):
    """A run that cannot go on, with one line saying why."""


def _tau_and_accuracy(r: dict) -> tuple[float, list[float]]:
    """τ̂ (mean acceptance length over the blocks with a supervised slot; 1.0 when there are
    none) and per-position accuracy from summed reports."""
    tau = float(r["tau"][0] / r["tau"][1]) if r["tau"][1] > 0 else 1.0
    return tau, (r["correct"] / r["total"].clamp(min=1)).tolist()


def _metrics_path(args) -> str | None:
    """--metrics-file, else <--save>/metrics.jsonl, else none."""
    if args.metrics_file:
        return args.metrics_file
    return os.path.join(args.save, "metrics.jsonl") if args.save else None


def _tensorboard(args):
    if args.tensorboard_dir is None or dist.get_rank() != dist.get_world_size() - 1:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=args.tensorboard_dir)

