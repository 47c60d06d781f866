"""The checks of a run against the files its flags name: data, tokenizer (mask token), the
checkpoint to resume, the feature cache and the export directory; each failure one line naming
the flag."""
from __future__ import annotations

import os

from megatron_dflash.config import DFlashConfig
from megatron_dflash.log import log_rank0
from megatron_dflash.run.checks import check, one_line, writable
from megatron_dflash.run.config import RunConfig


def check_moe_target(run: RunConfig, hf_config, where: str) -> None:
    """The expert-parallel flags against the target's config.json: a dense target takes none,
    an MoE target's experts and per-expert FFN must split evenly, and the allgather dispatcher
    needs equal shapes across an expert group that holds different data."""
    from megatron_dflash.targets import moe

    p = run.parallel
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    if not moe.is_moe(hf_config):
        dense = f"the target ({where}) is dense (no experts); it needs an MoE target"
        check(ep == 1, f"--expert-model-parallel-size={ep}: {dense}")
        check(etp is None, f"--expert-tensor-parallel-size={etp}: {dense}")
        check(not p.moe_grouped_gemm, f"--moe-grouped-gemm: {dense}")
        return
    experts = moe.num_experts(hf_config)
    check(experts % ep == 0,
          f"--expert-model-parallel-size={ep} must divide the target's num_experts={experts} "
          f"({where}): every expert-parallel rank holds the same number of experts")
    ffn = moe.expert_ffn_hidden_size(hf_config)
    name = (f"--expert-tensor-parallel-size={etp}" if etp is not None else
            f"--expert-tensor-parallel-size (default --tensor-model-parallel-size="
            f"{p.tensor_model_parallel_size})")
    etp = p.tensor_model_parallel_size if etp is None else etp
    check(ffn % etp == 0, f"{name} must divide the target's per-expert FFN width {ffn} "
                          f"({where})")
    # An expert group (ETP x EP ranks) wider than the attention TP group spans data-parallel
    # ranks, whose micro-batches megatron's allgather dispatcher gathers as equal shapes.
    check(p.moe_token_dispatcher_type != "allgather" or etp * ep <= p.tensor_model_parallel_size
          or run.data.seq_length_buckets == 1,
          f"--moe-token-dispatcher-type allgather with --seq-length-buckets="
          f"{run.data.seq_length_buckets}: the expert-parallel ranks ({etp * ep} = "
          "--expert-tensor-parallel-size x --expert-model-parallel-size) hold different "
          "data-parallel ranks' micro-batches, which allgather needs to be the same shape; use "
          "--seq-length-buckets 1 or --moe-token-dispatcher-type alltoall")


def check_data_paths(run: RunConfig):
    """--train-data / --valid-data exist (a file, or an indexed dataset's prefix)."""
    from megatron_dflash.run.plan import DataPlan

    for name in ("train_data", "valid_data"):
        for path in getattr(run.data, name) or []:
            check(os.path.exists(path) or os.path.exists(path + ".bin"),
                  f"--{name.replace('_', '-')}: {path} does not exist")
    return DataPlan(train=run.data.train_data, valid=run.data.valid_data)


def resolve_mask_token(run: RunConfig, vocab_size: int) -> int:
    """No --mask-token-id: the id `resolve_mask_token_id` finds from the target's tokenizer
    (or --tokenizer's), printed with how it was found (rank 0)."""
    from megatron_dflash.data.mask_token import resolve_mask_token_id
    from megatron_dflash.data.tokenize import (SentencePieceChatTokenizer, load_chat_tokenizer,
                                               tokenizer_spec)

    spec = tokenizer_spec(run.target.tokenizer, run.target.target)
    try:
        chat = load_chat_tokenizer(spec)
    except ValueError as e:
        raise ValueError(f"--mask-token-id is not given and the tokenizer to find it from cannot "
                         f"be loaded ({one_line(e)}); pass --mask-token-id") from None
    tokenizer = chat.sp if isinstance(chat, SentencePieceChatTokenizer) else chat.tokenizer
    mask_id, how = resolve_mask_token_id(tokenizer, vocab_size)
    log_rank0(f"mask token: id {mask_id} from {spec}: {how}")
    return mask_id


def checkpoint_changes(run: RunConfig, cfg: DFlashConfig, flags: dict[str, str]) -> list[str]:
    """--load: the checkpoint is readable and holds a draft of these settings; returns what
    changed that may (`checkpoint.check_compatible`)."""
    from megatron_dflash import checkpoint

    load = run.checkpoint.load
    try:
        extra = checkpoint.read_extra(load)
        changes = checkpoint.check_compatible(extra.get("dflash_config"), cfg, flags=flags,
                                              where=f"checkpoint {load}")
    except (OSError, ValueError) as e:
        raise ValueError(f"--load: {one_line(e)}") from None
    # The data position counts conversations of one stream: packed rows and single
    # conversations consume it differently, so a resume keeps the setting it was saved with.
    packed = bool(extra.get("pack_sequences", False))
    check(run.checkpoint.finetune or packed == run.data.pack_sequences,
          f"--pack-sequences: checkpoint {load} was trained {'with' if packed else 'without'} "
          "packed rows; resume with the same setting, or use --finetune to start the data "
          "afresh")
    return changes


def check_offline_features(run: RunConfig, data, cfg: DFlashConfig, distill_weight: float):
    """--offline-features: a layout and objective that can train from cached taps, and an
    existing cache that matches this run (one message naming what differs). Returns `data`
    with the cache's dtype and whether it already holds the cache."""
    import dataclasses

    from megatron_dflash import feature_cache

    directory = run.data.offline_features
    if directory is None:
        return data
    name = f"--offline-features {directory}"
    dtype = run.data.offline_features_dtype or ("bf16" if run.precision.bf16 else "fp32")
    pp = run.parallel.pipeline_model_parallel_size
    check(pp == 1, f"{name}: --pipeline-model-parallel-size={pp}: a run from cached features "
                   "builds no target decoder layer, so there is nothing to pipeline; use data "
                   "or tensor parallelism")
    check(distill_weight == 0,
          f"{name}: the cache holds the taps, not the teacher's next-token distribution: "
          "distillation (--distill-weight > 0) needs the target online; pass --distill-weight 0 "
          "or drop --offline-features")
    data = dataclasses.replace(data, offline_features=directory, offline_features_dtype=dtype)
    if not feature_cache.is_cache(directory):
        check(not os.path.exists(directory)
              or (os.path.isdir(directory) and not os.listdir(directory)),
              f"{name}: exists and holds no {feature_cache.MANIFEST} (an interrupted write "
              "leaves DIR.partial, never DIR): choose a new directory or remove it")
        check(writable(directory), f"{name}: cannot be created (no write permission)")
        return data
    try:
        expected = feature_cache.cache_manifest(run.target.target, cfg.target_layer_ids,
                                                run.data.seq_length, dtype)
        feature_cache.check_manifest(feature_cache.read_manifest(directory), expected, name)
        valid = os.path.join(directory, feature_cache.VALID_SPLIT)
        if run.data.valid_data:
            check(feature_cache.is_cache(valid),
                  f"{name}: holds no held-out split ({valid}) for --valid-data (the cache was "
                  "written without it): drop --valid-data or write a new cache")
            feature_cache.check_manifest(feature_cache.read_manifest(valid), expected,
                                         f"{name} ({valid})")
    except (OSError, ValueError) as e:
        raise ValueError(one_line(e)) from None
    return dataclasses.replace(data, cached=True)


def check_export(path: str) -> None:
    """--export DIR: new, empty or an earlier export (only reference-format files), writable."""
    from megatron_dflash.draft_export import is_export

    if os.path.exists(path):
        check(os.path.isdir(path), f"--export {path}: exists and is not a directory")
        check(not os.listdir(path) or is_export(path),
              f"--export {path}: exists, is not empty and is not an earlier export "
              "(config.json + model.safetensors): choose a new directory")
    check(writable(path), f"--export {path}: not writable (no write permission)")
