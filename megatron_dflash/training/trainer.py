"""`Trainer`: build → train steps → held-out τ → save → export, with megatron-core.

Everything distributed is megatron's own: `parallel_state` groups (`distributed.init_distributed`),
the pipeline schedule from `get_forward_backward_func`, `DistributedDataParallel` +
`DistributedOptimizer`, `finalize_model_grads`, `OptimizerParamScheduler` and dist-checkpointing
(`checkpoint.py`). The main job, the embedded demo, the tools and the tests drive it through
`Trainer(plan)` and its public methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dflash import checkpoint
from megatron_dflash.distributed import device as training_device
from megatron_dflash.log import log_last_rank
from megatron_dflash.run.plan import Plan
from megatron_dflash.training.builders import build_optimizer, build_training_chunk
from megatron_dflash.training.data import training_datasets
from megatron_dflash.training.export import export_draft
from megatron_dflash.training.microbatches import MicroBatches
from megatron_dflash.training.progress import Progress
from megatron_dflash.training.reports import reduce_reports, tau_and_accuracy
from megatron_dflash.training.signals import ExitSignalHandler
from megatron_dflash.training.step import global_weight_sum, make_forward_step, to_device
from megatron_dflash.training.supervision import check_supervised_blocks

EVAL_SEED = 987_654_321


class TrainingError(RuntimeError):
    """A run that cannot go on, with one line saying why."""


class Trainer:
    """One training run of a resolved `Plan`, on an initialised distributed world.

    Construction builds the data, the training chunk (frozen target + draft, DDP-wrapped), the
    optimizer and LR schedule, and loads `--load` (whole state, or only the draft weights with
    `--finetune`).
    """

    def __init__(self, plan: Plan):
        self.plan, run = plan, plan.run
        self.device = training_device()
        torch.manual_seed(run.training.seed)
        t0 = time.time()
        self.train_data, self.valid_data, self.pad_id = training_datasets(plan, self.device)
        check_supervised_blocks(self.train_data, plan.dflash.block_size)
        self.model = build_training_chunk(plan, self.device)
        self.optimizer, self.scheduler = build_optimizer(
            run.optimizer, self.model, bf16=run.precision.bf16,
            train_iters=run.training.train_iters)
        cfg, hf = plan.dflash, plan.target.hf_config
        log_last_rank(
            f"target {plan.target.path}: {hf.num_hidden_layers} layers, hidden {hf.hidden_size}"
            f" | {cfg.draft_variant} draft {cfg.num_draft_layers} layers, taps "
            f"{cfg.target_layer_ids}, block "
            f"{cfg.block_size}, mask id {cfg.mask_token_id}, gamma {cfg.loss_gamma:g}, distill "
            f"{plan.distill_weight:g} | {len(self.train_data)} training conversations | set-up "
            f"{time.time() - t0:.1f}s")
        self.iteration, self.consumed = 0, 0
        load = run.checkpoint.load
        if load and run.checkpoint.finetune:
            checkpoint.load_weights(load, self.model)
            log_last_rank(f"loaded draft weights from {load}; optimizer, schedule and data "
                          "start afresh")
        elif load:
            extra = checkpoint.load_checkpoint(load, self.model, self.optimizer, self.scheduler)
            self.iteration, self.consumed = extra["iteration"], extra["consumed_samples"]
            log_last_rank(f"resumed from {load} at iteration {self.iteration} "
                          f"({self.consumed} samples consumed)")

    @property
    def prefetch_depth(self) -> int:
        """Micro-batches prepared ahead: a whole step and the next step's first, so a step never
        waits for preparation."""
        return self.plan.num_microbatches + 1

    # --- steps ---------------------------------------------------------------------------

    def run_step(self, microbatches: list[dict], forward_only: bool):
        """One forward(+backward) over `microbatches` with megatron's schedule (`run_schedule`);
        returns the reports."""
        plan = self.plan
        return run_schedule(self.model, microbatches, plan.dflash, plan.distill_weight,
                            plan.run.dflash.loss_chunk_size, plan.run.training.micro_batch_size,
                            forward_only)

    def train_step(self, microbatches: list[dict]):
        """One optimizer step over this rank's micro-batches (`train_step`)."""
        return train_step(self.model, self.optimizer, self.scheduler, microbatches,
                          self.run_step)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, list[float]]:
        """τ̂ and per-position accuracy of the draft on held-out conversations (fixed anchors;
        unpacked, whatever --pack-sequences)."""
        run, valid = self.plan.run, self.valid_data
        self.model.eval()
        per_rank = run.training.micro_batch_size * parallel_state.get_data_parallel_world_size()
        n = min(run.logging.eval_samples, len(valid))
        n -= n % per_rank
        if n == 0:
            raise ValueError(f"--eval-samples/held-out data ({len(valid)}) cannot fill one "
                             "micro-batch per data-parallel rank")
        batches = MicroBatches(torch.utils.data.Subset(valid, range(n)), self.plan, self.pad_id,
                               0, shuffle=False, seed=EVAL_SEED, pack=False)
        reports = self.run_step([to_device(batches.next(), self.device)
                                 for _ in range(n // per_rank)], forward_only=True)
        self.model.train()
        return tau_and_accuracy(reduce_reports(reports))

    # --- the run -------------------------------------------------------------------------

    def train(self) -> dict:
        """Train to --train-iters (or a signal); returns {'tau_start', 'tau_end', 'losses',
        'grad_norms', 'skipped_iterations', 'exit_signal'} on every rank."""
        run = self.plan.run
        result = {"losses": [], "grad_norms": [], "exit_signal": None}
        if self.valid_data is not None:
            result["tau_start"] = self._log_held_out()
        batches = MicroBatches(self.train_data, self.plan, self.pad_id, self.consumed)
        writer = _tensorboard(run.logging.tensorboard_dir)
        progress = Progress(run.training.train_iters, self.iteration, run.logging.log_interval,
                            self._metrics_path())
        # SIGTERM / SIGUSR1 (SLURM pre-emption, time limit): finish the iteration, save, leave.
        signal = ExitSignalHandler() if run.checkpoint.exit_signal_handler else None
        skipped_total, skipped_in_row = 0, 0
        ahead = batches.prefetcher(self.device, depth=self.prefetch_depth)
        with signal or contextlib.nullcontext(), ahead as prefetched:
            while self.iteration < run.training.train_iters:
                t = time.time()
                microbatches = []
                for _ in range(self.plan.num_microbatches):
                    mb, self.consumed = prefetched.next()
                    microbatches.append(mb)
                reports, grad_norm = self.train_step(microbatches)
                self.iteration += 1
                r = reduce_reports(reports)
                loss = float(r["loss"][0] / r["loss"][1].clamp(min=1e-12))
                tau, acc = tau_and_accuracy(r)
                if r["tau"][1] == 0:
                    progress.print(f"iteration {self.iteration}: no supervised block in this "
                                   "global batch (no response span holds a block of "
                                   f"{self.plan.dflash.block_size} tokens)")
                if math.isfinite(grad_norm) and math.isfinite(loss):
                    skipped_in_row = 0
                else:  # megatron's optimizer found inf/NaN gradients and made no update
                    skipped_total, skipped_in_row = skipped_total + 1, skipped_in_row + 1
                    progress.print(f"iteration {self.iteration}: loss {loss} / grad norm "
                                   f"{grad_norm} not finite: update skipped ({skipped_in_row} "
                                   "in a row)")
                    if skipped_in_row >= run.training.max_skipped_steps:
                        raise TrainingError(
                            f"{skipped_in_row} iterations in a row had non-finite loss or "
                            f"gradients (last: iteration {self.iteration}); stopping "
                            f"(--max-skipped-steps {run.training.max_skipped_steps}); lower --lr "
                            "or check the data")
                lr = self.scheduler.get_lr(self.optimizer.param_groups[0])
                result["losses"].append(loss)
                result["grad_norms"].append(grad_norm)
                metrics = {"loss": loss, "tau": tau, "acc": acc, "lr": lr, "grad_norm": grad_norm,
                           "consumed_samples": self.consumed, "skipped_iterations": skipped_total}
                tokens = sum(mb["tokens"].numel() for mb in microbatches) \
                    * parallel_state.get_data_parallel_world_size()
                progress.iteration(self.iteration, metrics, tokens, time.time() - t)
                if writer is not None:
                    for k, v in (("loss", loss), ("tau_hat", tau), ("lr", lr),
                                 ("grad_norm", grad_norm), ("acc_pos1", acc[0])):
                        writer.add_scalar(f"train/{k}", v, self.iteration)
                interval = run.logging.eval_interval
                if self.valid_data is not None and interval and self.iteration % interval == 0 \
                        and self.iteration < run.training.train_iters:
                    progress.print(f"held-out tau {self.evaluate()[0]:.3f} at iteration "
                                   f"{self.iteration}")
                exiting = signal is not None and signal.should_exit()
                save_interval = run.checkpoint.save_interval
                if run.checkpoint.save and (
                        exiting or self.iteration == run.training.train_iters
                        or (save_interval and self.iteration % save_interval == 0)):
                    progress.print(f"saved checkpoint {self.save(run.checkpoint.save)}")
                if exiting:
                    result["exit_signal"] = (signal.received.name if signal.received
                                             else "a signal on another rank")
                    progress.print(f"exiting after iteration {self.iteration}: received "
                                   f"{result['exit_signal']}"
                                   + ("" if run.checkpoint.save else " (no --save: nothing saved)"))
                    break
        progress.close()
        result["skipped_iterations"] = skipped_total
        if self.valid_data is not None and result["exit_signal"] is None:
            result["tau_end"] = self._log_held_out()
        if writer is not None:
            writer.close()
        return result

    def run(self) -> dict:
        """`train`, then `--export` (when the draft was trained to the end or saved)."""
        result = self.train()
        export = self.plan.run.checkpoint.export
        if export and (result["exit_signal"] is None or self.plan.run.checkpoint.save):
            result["export"] = self.export(export)
            log_last_rank(f"exported the draft (iteration {self.iteration}) to "
                          f"{result['export']}")
        elif export:
            log_last_rank(f"--export {export}: nothing exported (no --save: no checkpoint of "
                          "the draft was saved before the exit)")
        return result

    # --- checkpoints and export ----------------------------------------------------------

    def extra_state(self) -> dict:
        """What a checkpoint records besides the tensors: the draft's config, the target, the
        world and the data position."""
        target = self.plan.target
        return {"dflash_config": dataclasses.asdict(self.plan.dflash),
                "target": {"path": os.path.abspath(target.path),
                           "hf_config": target.hf_config.to_dict()},
                "world_size": dist.get_world_size(), "consumed_samples": self.consumed,
                "pack_sequences": self.plan.run.data.pack_sequences}

    def save(self, root: str) -> str:
        """A checkpoint of this iteration under `root` (collective); returns its path."""
        return checkpoint.save_checkpoint(root, self.iteration, self.model, self.optimizer,
                                          self.scheduler, self.extra_state())

    def export(self, directory: str) -> str:
        """The draft in the reference format in `directory` (collective; `export_draft`)."""
        return export_draft(self, directory)

    def _log_held_out(self) -> float:
        tau, acc = self.evaluate()
        log_last_rank(f"held-out tau {tau:.3f} at iteration {self.iteration} | acc@1..3 "
                      + " ".join(f"{a:.3f}" for a in acc[:3]))
        return tau

    def _metrics_path(self) -> str | None:
        """--metrics-file, else <--save>/metrics.jsonl, else none."""
        run = self.plan.run
        if run.logging.metrics_file:
            return run.logging.metrics_file
        return os.path.join(run.checkpoint.save, "metrics.jsonl") if run.checkpoint.save \
            else None


def run_schedule(model, microbatches: list[dict], cfg, distill_weight: float, chunk_rows: int,
                 micro_batch_size: int, forward_only: bool):
    """One forward(+backward) over `microbatches` (on the training device) with megatron's
    schedule; returns the reports (on the last pipeline stage)."""
    scale = 1.0
    if not forward_only:  # Σw over DP x CP; megatron scales by CP, its DDP averages over DP x CP
        total = global_weight_sum(
            microbatches, parallel_state.get_data_parallel_group(with_context_parallel=True))
        scale = len(microbatches) * parallel_state.get_data_parallel_world_size() \
            / max(total, 1e-12)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(cfg, distill_weight, scale, chunk_rows),
        data_iterator=iter(microbatches), model=[model], num_microbatches=len(microbatches),
        seq_length=microbatches[0]["tokens"].shape[1], micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def train_step(model, optimizer, scheduler, microbatches: list[dict], run_step):
    """One optimizer step: `run_step(microbatches, forward_only=False)`, then megatron's
    optimizer and LR schedule. Returns (the reports, on the last pipeline stage only, and the
    global gradient norm before clipping; NaN when megatron's optimizer found inf/NaN gradients
    and skipped the update and the LR schedule step)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_step(microbatches, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if not update_successful:  # inf/NaN gradients (build_optimizer): no update
        return reports, math.nan
    scheduler.step(increment=1)
    return reports, float(grad_norm or 0.0)


def _tensorboard(directory: str | None):
    if directory is None or dist.get_rank() != dist.get_world_size() - 1:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=directory)
