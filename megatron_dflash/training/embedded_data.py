"""The embedded default's material: chitchat prompts for training and for the held-out
measurement, the human replies to them, and the target's own answers (regenerated once)."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from megatron_dflash.run.config import ParallelArgs, PrecisionArgs
from megatron_dflash.run.plan import Plan, resolve_target

TRAIN_PROMPTS = 128
"""Distinct chitchat prompts the target answers for training: what a 2-core CPU generates in
about three minutes (SmolLM2 in fp32 there: ~45 generated tokens/s at batch 32, its ~40-token
prompts included; batch 64 is slower), so the whole demo stays near ten minutes."""
MAX_NEW_TOKENS = 64
REGENERATE_BATCH = 32
MIN_PROMPT_CHARS = 12
"""Shorter user turns ("ok", "lol") are not prompts."""
EVAL_PROMPTS, EVAL_NEW_TOKENS = 6, 40
"""Held-out prompts and tokens per prompt for the final speculative-decoding measurement (on
2 CPU cores about 160 s: the target alone decodes ~4 tokens/s, each DFlash step costs ~2 of its
steps)."""


def prompts(path: str, limit: int, exclude=frozenset()) -> list[dict]:
    """The first `limit` distinct user turns of a chitchat split (the opening prompts both people
    were given, then what people said to each other), each as a one-turn conversation: there
    are only ~115 distinct opening prompts, and a short user turn is a fair chat prompt."""
    seen, out = set(exclude), []
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for turn in range(max(len(r["messages"]) for r in records)):  # openings first
        for r in records:
            if turn >= len(r["messages"]) or r["messages"][turn]["role"] != "user":
                continue
            text = r["messages"][turn]["content"]
            if len(text) >= MIN_PROMPT_CHARS and text not in seen:
                seen.add(text)
                out.append({"id": f"{r['id']}/{turn}",
                            "messages": [{"role": "user", "content": text}]})
                if len(out) == limit:
                    return out
    return out


def eval_prompts(chitchat: str) -> list[dict]:
    """The held-out prompts of the final measurement."""
    return prompts(os.path.join(chitchat, "chitchat_held_out.jsonl"), EVAL_PROMPTS)


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".partial", path)


def train_prompts(chitchat: str) -> str:
    """The training prompts' JSONL (written once by rank 0; held-out prompts excluded)."""
    path = os.path.join(chitchat, f"prompts_train_{TRAIN_PROMPTS}.jsonl")
    if dist.get_rank() == 0 and not os.path.isfile(path):
        held_out = {c["messages"][0]["content"] for c in eval_prompts(chitchat)}
        _write_jsonl(path, prompts(os.path.join(chitchat, "chitchat_train.jsonl"),
                                   TRAIN_PROMPTS, exclude=held_out))
    dist.barrier()
    return path


def human_answers(chitchat: str) -> str:
    """--embedded-answers human: the same training prompts, each answered by the human reply that
    followed it in chitchat (prompts the conversation ended on are left out)."""
    path = os.path.join(chitchat, f"human_train_{TRAIN_PROMPTS}.jsonl")
    prompts_path = train_prompts(chitchat)
    if dist.get_rank() == 0 and not os.path.isfile(path):
        with open(os.path.join(chitchat, "chitchat_train.jsonl"), encoding="utf-8") as f:
            records = {r["id"]: r["messages"] for r in map(json.loads, f)}
        out = []
        with open(prompts_path, encoding="utf-8") as f:
            for prompt in map(json.loads, f):
                cid, turn = prompt["id"].rsplit("/", 1)
                messages = records[cid][int(turn):int(turn) + 2]
                if len(messages) == 2 and messages[1]["role"] == "assistant":
                    out.append({"id": prompt["id"], "messages": messages})
        _write_jsonl(path, out)
    dist.barrier()
    return path


def regenerate(plan: Plan, prompts_path: str, output: str, features: str, manifest: dict) -> None:
    """The target's greedy answers to `prompts_path` into `output`, its taps into the feature
    cache `features`: the fp32 target at the run's tensor/expert-parallel layout, on one
    pipeline stage, local backend (`megatron_dflash.regeneration`)."""
    from transformers import AutoTokenizer

    from megatron_dflash.data.conversations import DataReport
    from megatron_dflash.generation import BatchGenerator, stop_token_ids
    from megatron_dflash.regeneration import (ChatPrompts, FeatureOutput, read_conversations,
                                              regenerate_to_file)
    from megatron_dflash.training.builders import build_frozen_target

    run = plan.run
    parallel = ParallelArgs(tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
                            expert_model_parallel_size=run.parallel.expert_model_parallel_size,
                            expert_tensor_parallel_size=run.parallel.expert_tensor_parallel_size,
                            moe_token_dispatcher_type=run.parallel.moe_token_dispatcher_type)
    generation = dataclasses.replace(run, parallel=parallel, precision=PrecisionArgs())
    target = build_frozen_target(resolve_target(generation, plan.target.hf_config))
    if torch.cuda.is_available():
        target = target.cuda()
    tokenizer = AutoTokenizer.from_pretrained(run.target.target)
    conversations = read_conversations([prompts_path], DataReport())
    generator = BatchGenerator(target, stop_token_ids(run.target.target, tokenizer),
                               plan.target.layer_ids)
    regenerate_to_file(generator, ChatPrompts(tokenizer), conversations, output,
                       batch_size=REGENERATE_BATCH, max_new_tokens=MAX_NEW_TOKENS,
                       features=FeatureOutput(features, manifest), log_interval=30.0)
