"""What a plan builds: the frozen target, the draft, the training chunk megatron trains, and the
optimizer with its LR schedule. The main job, the tools and the tests build through these."""
from __future__ import annotations

import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_dflash.run.config import OptimizerArgs
from megatron_dflash.run.plan import Plan, TargetPlan
from megatron_dflash.specs import build_draft
from megatron_dflash.targets import build_target, load_hf_weights
from megatron_dflash.training.module import DFlashTrainingModule
from megatron_dflash.training.pipeline import word_embedding_replica


def build_frozen_target(target: TargetPlan, *, last_layer: int | None = None,
                        post_process: bool | None = None, load: bool = True):
    """This pipeline stage's frozen target (`build_target`), its HF weights loaded (this rank's
    slices) unless `load` is False (random weights: benchmarks)."""
    model = build_target(target.hf_config, target.config, backend=target.backend,
                         post_process=post_process, last_layer=last_layer)
    if load:
        load_hf_weights(model, target.path)
    return model


def target_last_layer(plan: Plan) -> int | None:
    """The deepest target layer the run needs: nothing reads past the deepest tap without
    distillation, so the target is built as a feature extractor up to it (later layers, final
    norm and their weights are never allocated, loaded or run); from an offline feature cache
    no decoder layer at all, only the embedding and output layer the draft borrows."""
    if plan.data.offline_features is not None:
        return -1
    return None if plan.distill_weight > 0 else max(plan.dflash.target_layer_ids)


def build_training_chunk(plan: Plan, device: torch.device, load_target: bool = True):
    """The frozen target (this pipeline stage's layers) and, on the last stage, a fresh draft,
    as one DDP-wrapped training chunk."""
    target = build_frozen_target(plan.target, last_layer=target_last_layer(plan),
                                 load=load_target)
    dcfg = plan.draft_config
    if target.post_process:
        draft = build_draft(plan.dflash, dcfg, plan.target.backend, plan.attention)
        # The borrowed LM head expects inputs at the scale of the target's final norm: start
        # there (random targets keep the draft's own initial norm).
        if load_target:
            with torch.no_grad():
                draft.decoder.final_layernorm.weight.copy_(
                    target.target_family.final_norm_weight(plan.target.path))
        embedding = (None if target.pre_process
                     else word_embedding_replica(target, plan.target.path))
        module = DFlashTrainingModule(target, draft, embedding=embedding)
    else:
        module = DFlashTrainingModule(target, config=dcfg,
                                      target_layer_ids=plan.dflash.target_layer_ids)
    return wrap_training_chunk(module.to(device), dcfg,
                               plan.run.optimizer.use_distributed_optimizer)


def wrap_training_chunk(module: DFlashTrainingModule, dcfg, use_distributed_optimizer: bool):
    """`module` as megatron's schedule and optimizer take it: Float16Module when the draft is
    bf16 (the routers' fp32 expert bias kept exact), then megatron DDP (fp32 gradient reduction,
    overlapped with the backward), with the config hooks the schedule calls."""
    if dcfg.bf16:
        fp32 = _fp32_buffers(module)
        module = Float16Module(dcfg, module)
        _restore_buffers(module.module, fp32)
    ddp = DistributedDataParallel(
        config=dcfg, module=module,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
            overlap_grad_reduce=True))
    dcfg.no_sync_func = ddp.no_sync
    dcfg.grad_sync_func = ddp.start_grad_sync
    dcfg.finalize_model_grads_func = finalize_model_grads
    return ddp


# Buffers that are checkpoint data kept in fp32 whatever the model's dtype: the MoE routers'
# expert bias (HF `e_score_correction_bias`), which decides near-tie routing.
_FP32_BUFFERS = (".router.expert_bias",)


def _fp32_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()
            if name.endswith(_FP32_BUFFERS) and b.dtype == torch.float32}


def _restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put `saved` back (Float16Module casts every floating buffer to bf16)."""
    for name, value in saved.items():
        owner, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner)
        owner._buffers[leaf] = value.to(owner._buffers[leaf].device)  # same persistence


def build_optimizer(opt: OptimizerArgs, model, *, bf16: bool, train_iters: int):
    """megatron's optimizer (Adam, distributed by default) and LR schedule.

    A constant loss scale of 1 (which changes no number) turns on megatron's own inf/NaN check of
    the gradients in its mixed-precision optimizers — the distributed one and any bf16 one: a
    step whose gradients are not finite makes no update (`Trainer.train_step`)."""
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer, loss_scale=1.0), [model])
    warmup = int(opt.lr_warmup_fraction * train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=train_iters, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=train_iters,
        wd_incr_style="constant")
    return optimizer, scheduler
