"""`resolve(run) -> Plan`: the run's flags checked against the files they name, once.

It reads the target's config.json and safetensors headers, its tokenizer (for a mask token), the
checkpoint to resume and the feature-cache manifest, and holds what everything after it builds
from: the HF config, the target's and the draft's `TransformerConfig`, the resolved
`DFlashConfig` and the data. Every failure is one `ValueError` naming the flag, before any model,
data or process group is built; nothing else builds these configs again. Tools that only run the
target resolve just that part (`resolve_target`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from megatron_dflash import fusions
from megatron_dflash.config import DFLASH2_DEFAULTS, DFlashConfig, draft_transformer_config
from megatron_dflash.fp8 import FP8Settings
from megatron_dflash.log import log_rank0
from megatron_dflash.run import data_checks
from megatron_dflash.run.checks import check, check_run, fp8_settings, one_line
from megatron_dflash.run.config import RunConfig
from megatron_dflash.run.target_config import read_target_config

# The flag that sets each DFlashConfig field; the other fields are the target's.
DFLASH_FLAGS = {
    "block_size": "--block-size", "num_draft_layers": "--num-draft-layers",
    "target_layer_ids": "--target-layer-ids", "mask_token_id": "--mask-token-id",
    "num_attention_heads": "--draft-num-attention-heads",
    "num_key_value_heads": "--draft-num-query-groups", "head_dim": "--draft-kv-channels",
    "ffn_hidden_size": "--draft-ffn-hidden-size", "loss_gamma": "--loss-gamma",
    "num_anchors": "--num-anchors", "draft_variant": "--draft-variant",
    "conv_kernel_size": "--conv-kernel-size", "conv_group_size": "--conv-group-size",
    "selector_rank": "--selector-rank", "selector_top_k": "--selector-top-k",
    "selector_loss_weight": "--selector-loss-weight", "output_multiplier": "--output-multiplier",
    "final_logit_softcapping": "--final-logit-softcapping",
    "input_embedding_scale": "--input-embedding-scale", "layer_types": "--draft-layer-types",
    "sliding_window": "--draft-sliding-window", "is_causal": "--draft-causal"}
TARGET_FIELDS = {"hidden_size": "the target's hidden_size",
                 "rope_theta": "the target's rope_theta",
                 "rope_scaling": "the target's rope scaling",
                 "norm_eps": "the target's rms_norm_eps"}


@dataclass
class TargetPlan:
    """The frozen target as this run builds it."""

    path: str
    hf_config: PretrainedConfig
    config: TransformerConfig
    """megatron's config of the target at this run's layout, dtype and FP8."""
    backend: str
    """"local" or "te" (`build_target`)."""
    fp8: FP8Settings
    layer_ids: list[int] | None = None
    """The taps, once known."""


@dataclass
class DataPlan:
    """Where the training and held-out samples come from."""

    train: list[str] | None
    valid: list[str] | None
    offline_features: str | None = None
    offline_features_dtype: str | None = None
    cached: bool = False
    """`offline_features` already holds a matching cache: it is the data."""


@dataclass
class Plan:
    """Everything a training run builds from, resolved once (`resolve`)."""

    run: RunConfig
    world_size: int
    data_parallel_size: int
    num_microbatches: int
    target: TargetPlan
    dflash: DFlashConfig
    draft_config: TransformerConfig
    draft_fp8: FP8Settings
    attention: str
    distill_weight: float
    data: DataPlan
    checkpoint_changes: list[str]

    def with_data(self, data: DataPlan) -> "Plan":
        """This plan training on other (prepared, checked) data."""
        return dataclasses.replace(self, data=data)


def resolve_target(run: RunConfig, hf_config: PretrainedConfig | None = None,
                   fp8: FP8Settings | None = None) -> TargetPlan:
    """The target's part of the plan: its HF config (read and checked as the import checks it,
    or `hf_config` for a target not written yet) and megatron config at the run's layout."""
    t, p = run.target, run.parallel
    check(t.target is not None, "--target is required")
    hf_config = hf_config if hf_config is not None else read_target_config(t.target)
    where = os.path.join(t.target, "config.json")
    layers = hf_config.num_hidden_layers
    check(layers % p.pipeline_model_parallel_size == 0,
          f"--pipeline-model-parallel-size={p.pipeline_model_parallel_size} must divide the "
          f"target's {layers} layers (every stage holds the same number)")
    data_checks.check_moe_target(run, hf_config, where)
    fp8 = fp8 if fp8 is not None else fp8_settings(run)[1]
    backend = "te" if run.precision.transformer_impl == "transformer_engine" else "local"
    from megatron_dflash.targets import target_transformer_config

    try:
        config = target_transformer_config(
            hf_config, tensor_parallel_size=p.tensor_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            params_dtype=torch.bfloat16 if run.precision.bf16 else torch.float32,
            pipeline_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size, cp_comm_type=p.cp_comm_type,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
            moe_token_dispatcher_type=p.moe_token_dispatcher_type,
            moe_grouped_gemm=p.moe_grouped_gemm, **fp8.fields())
        config = dataclasses.replace(config, **fusions.target_fields(
            backend, config.multi_latent_attention, fp8, packed_yarn=run.data.pack_sequences
            and hasattr(config, "yarn_rotary_scaling_factor")))
    except ValueError as e:  # megatron's checks of the target against the parallel layout
        tp = p.tensor_model_parallel_size
        name = f"--tensor-model-parallel-size={tp}" if tp > 1 else "--target"
        raise ValueError(f"{name}: the target ({where}): {one_line(e)}") from None
    _check_context_parallel(p.context_parallel_size, backend, config, where)
    check(not (run.data.pack_sequences and backend == "local" and config.multi_latent_attention
               and run.data.offline_features is None),
          f"--pack-sequences: the target ({where}) has multi-latent attention, whose local core "
          "attention (megatron's DotProductAttention) takes no packed sequences; use "
          "--transformer-impl transformer_engine (GPU) or --offline-features")
    return TargetPlan(t.target, hf_config, config, backend, fp8)


def _check_context_parallel(cp: int, backend: str, config: TransformerConfig, where: str):
    """The local backend splits the sequence in its SDPA core attention only (Transformer
    Engine's CP attention serves every attention on GPU)."""
    if cp == 1 or backend != "local":
        return
    check(not config.multi_latent_attention,
          f"--context-parallel-size={cp}: the target ({where}) has multi-latent attention, "
          "whose local core attention (megatron's DotProductAttention) does not split the "
          "sequence; use --transformer-impl transformer_engine (GPU)")
    check(not config.linear_attention_freq,
          f"--context-parallel-size={cp}: the target ({where}) has gated-delta-net layers, "
          "which are not split along the sequence here")


def resolve(run: RunConfig, world_size: int, hf_config: PretrainedConfig | None = None) -> Plan:
    """Check `run` against the world and its files and resolve every config (module
    docstring). `hf_config` stands for a target that is not written yet (the embedded default,
    converted on first use). Prints how the mask token was found and what a resumed
    checkpoint changes (rank 0)."""
    dp, num_microbatches = check_run(run, world_size)
    check(hf_config is not None or os.path.isdir(run.target.target or ""),
          f"--target={run.target.target}: not a directory")
    draft_fp8, target_fp8 = fp8_settings(run)
    target = resolve_target(run, hf_config, target_fp8)
    from megatron_dflash.targets import target_family

    limit = target_family(target.hf_config).sequence_limit(target.hf_config)
    check(limit is None or run.data.seq_length <= limit,
          f"--seq-length={run.data.seq_length}: the target ({target.path}/config.json) is "
          f"imported exactly only up to {limit} tokens (index_topk: its sparse attention is "
          "dense up to there)")
    data = data_checks.check_data_paths(run)
    d = run.dflash
    mask_token_id = d.mask_token_id
    if mask_token_id is None:
        mask_token_id = data_checks.resolve_mask_token(run, target.hf_config.vocab_size)
    cfg = DFlashConfig(
        block_size=d.block_size, num_draft_layers=d.num_draft_layers,
        target_layer_ids=d.target_layer_ids, mask_token_id=mask_token_id,
        num_attention_heads=d.draft_num_attention_heads,
        num_key_value_heads=d.draft_num_query_groups, head_dim=d.draft_kv_channels,
        ffn_hidden_size=d.draft_ffn_hidden_size, loss_gamma=d.loss_gamma,
        num_anchors=d.num_anchors, draft_variant=d.draft_variant,
        conv_kernel_size=d.conv_kernel_size, conv_group_size=d.conv_group_size,
        selector_rank=d.selector_rank, selector_top_k=d.selector_top_k,
        selector_loss_weight=d.selector_loss_weight, output_multiplier=d.output_multiplier,
        final_logit_softcapping=d.final_logit_softcapping,
        input_embedding_scale=d.input_embedding_scale, sliding_window=d.draft_sliding_window,
        layer_types=(None if d.draft_layer_types is None
                     else [f"{t}_attention" for t in d.draft_layer_types]),
        is_causal=d.draft_causal)
    rope_theta = (target.hf_config.rope_parameters or {}).get("rope_theta")
    try:
        cfg = cfg.resolve(target.config, vocab_size=target.hf_config.vocab_size,
                          target_rope_theta=rope_theta,
                          target_rope_scaling=target_family(target.hf_config).rope_scaling(
                              target.hf_config))
    except ValueError as e:
        raise ValueError(_with_flags(one_line(e), run, target)) from None
    target.layer_ids = cfg.target_layer_ids
    pipelined = run.parallel.pipeline_model_parallel_size > 1
    try:
        # The target is allocated on the CPU and loaded there; the draft is initialised where
        # it trains. PP > 1: a sent payload is freed at once (only its autograd node is needed)
        # and, since micro-batches differ in length, the schedule exchanges every shape.
        draft_config = draft_transformer_config(
            cfg, target.config, perform_initialization=True,
            use_cpu_initialization=not torch.cuda.is_available(),
            deallocate_pipeline_outputs=pipelined, **draft_fp8.fields(),
            **fusions.draft_fields(target.backend),
            # The draft sees the whole context on every CP rank (`context_parallel`).
            context_parallel_size=1, cp_comm_type=None)
    except ValueError as e:
        raise ValueError(f"the draft's TransformerConfig: {one_line(e)}") from None
    # Set after construction: TransformerConfig refuses variable lengths with its default MoE
    # token dispatcher, which the dense draft never uses.
    draft_config.variable_seq_lengths = pipelined
    changes = (data_checks.checkpoint_changes(run, cfg, DFLASH_FLAGS | TARGET_FIELDS)
               if run.checkpoint.load is not None else [])
    distill_weight = d.distill_weight if d.distill_weight is not None else 0.0
    data = data_checks.check_offline_features(run, data, cfg, distill_weight)
    if run.checkpoint.export is not None:
        data_checks.check_export(run.checkpoint.export)
    for line in changes:
        log_rank0(f"--load {run.checkpoint.load}: {line}")
    return Plan(run=run, world_size=world_size, data_parallel_size=dp,
                num_microbatches=num_microbatches, target=target, dflash=cfg,
                draft_config=draft_config, draft_fp8=draft_fp8,
                attention="sparse" if d.attention == "auto" else d.attention,
                distill_weight=distill_weight, data=data, checkpoint_changes=changes)


def _with_flags(msg: str, run: RunConfig, target: TargetPlan) -> str:
    """A `DFlashConfig.resolve` message with each field written as its flag; for a value the
    flag left to the target, say so."""
    where = os.path.join(target.path, "config.json")
    field = re.match(r"\w*", msg).group()
    for name, name_flag in DFLASH_FLAGS.items():
        msg = re.sub(rf"(?<![\w-]){name}(?!\w)", name_flag, msg)
    name_flag = DFLASH_FLAGS.get(field)
    if name_flag is None:
        return f"--target: {where}: {msg}"
    if getattr(run.dflash, name_flag[2:].replace("-", "_")) is None and field != "mask_token_id":
        msg += (f" (the DFlash2 default; set {name_flag})" if field in DFLASH2_DEFAULTS
                else f" (the target's value, from {where}; set {name_flag})")
    return msg
