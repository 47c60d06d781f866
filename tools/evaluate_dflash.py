"""Measure a DFlash draft: lossless greedy speculative decoding vs target-only greedy decoding.

  [torchrun --nproc-per-node TP] python tools/evaluate_dflash.py --draft CKPT_ROOT|DRAFT_DIR \\
      [--target TARGET_HF_DIR] [--prompts FILE.jsonl] [--num-prompts N] [--max-new-tokens N] \\
      [--block-size B] [--stop-token-ids ID ...] [--plot acceptance.png] [--output report.json]

The target defaults to the embedded SmolLM2-135M-Instruct (dequantised once into
cache/smollm2-135m-instruct). Prompts: JSONL lines {"prompt": str}, {"messages": [...]},
{"turns": [str, ...]} (first turn) or {"input_ids": [...]}; text goes through the target
tokenizer's chat template. Reports τ (mean acceptance length), the per-position acceptance rate,
tokens/s and the speedup over target-only decoding measured in the same run, and whether every
output equals target-only greedy decoding (exit status 2 if one does not). A DFlash2 draft
proposes its candidate selector's greedy path over each slot's top-K. Runs in fp32, on CPU
or GPU as is: without CUDA it applies megatron-core's CPU adaptations (`megatron_dflash.cpu`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch.distributed as dist

from megatron_dflash.evaluate import build_decoder, evaluate, plot_position_acceptance
from megatron_dflash.generation import stop_token_ids
from megatron_dflash.distributed import device, distributed, world_size
from megatron_dflash.log import log_rank0
from megatron_dflash.run.config import ParallelArgs
from megatron_dflash.targets.gguf import SMOLLM2_STOP_TOKEN_ID, convert_gguf, smollm2_gguf

EMBEDDED_TARGET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "cache", "smollm2-135m-instruct")
DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three tips for staying focused while studying.",
    "What is the capital of France, and why is it famous?",
    "Write a Python function that reverses a string.",
    "Describe your ideal weekend.",
    "How do plants make their food?",
    "Give me a recipe for a simple pancake.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Runs on CPU or GPU as is (plain `python` or `torchrun`, fp32); without CUDA "
               "megatron-core's CPU adaptations (megatron_dflash.cpu) are applied.")
    p.add_argument("--draft", required=True,
                   help="training checkpoint root, or a reference-format draft directory")
    p.add_argument("--target", default=None,
                   help="target HF checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=None, help="JSONL prompts (default: built-in)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None, help="default: the draft's")
    p.add_argument("--stop-token-ids", type=int, nargs="*", default=None,
                   help="default: the target's eos_token_id (generation_config.json first)")
    p.add_argument("--plot", default=None, help="write the per-position acceptance as PNG")
    p.add_argument("--output", default=None, help="write the report as JSON")
    return p


def _target_dir(path: str | None) -> str:
    if path is not None:
        return path
    gguf_dir, gguf_file = smollm2_gguf()
    return convert_gguf(gguf_dir, gguf_file, EMBEDDED_TARGET, stop_token_id=SMOLLM2_STOP_TOKEN_ID)


def _prompts(path: str | None, target_dir: str, limit: int | None) -> list[list[int]]:
    from transformers import AutoTokenizer

    records = [{"prompt": p} for p in DEFAULT_PROMPTS]
    if path is not None:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(f"{path}: no prompts")
    tokenizer = None
    out = []
    for i, r in enumerate(records):
        if "input_ids" in r:
            out.append(list(r["input_ids"]))
            if not out[-1]:
                raise ValueError(f"{path}: line {i + 1} has no input_ids")
            continue
        if "messages" in r:
            messages = r["messages"]
        elif "turns" in r or "prompt" in r:
            messages = [{"role": "user", "content": r["turns"][0] if "turns" in r else r["prompt"]}]
        else:
            raise ValueError(f"{path}: line {i + 1} has none of prompt, messages, turns, input_ids")
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(target_dir)
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        out.append(tokenizer.encode(text, add_special_tokens=False))
        if not out[-1]:
            raise ValueError(f"{path or 'built-in prompts'}: prompt {i + 1} encodes to no "
                             f"tokens with {target_dir}'s tokenizer (has it tokenizer files?)")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with distributed(ParallelArgs(tensor_model_parallel_size=world_size())):
        try:
            target_dir = _target_dir(args.target)
            prompts = _prompts(args.prompts, target_dir, args.num_prompts)
            stops = (args.stop_token_ids if args.stop_token_ids is not None
                     else stop_token_ids(target_dir))
            where = device()
            decoder = build_decoder(target_dir, args.draft, where if where.type == "cuda" else None)
            report, _ = evaluate(decoder, prompts, args.max_new_tokens, stops, args.block_size)
            if dist.get_rank() == 0 and args.plot:
                plot_position_acceptance(report.position_acceptance, args.plot,
                                         f"tau={report.tau:.2f}  {os.path.basename(args.draft)}")
        except (OSError, ValueError) as e:
            print(f"evaluate_dflash: error: {e}", file=sys.stderr)
            return 1
        variant = decoder.draft.dflash_config.draft_variant
        log_rank0(f"requests: {report.num_requests}  block size: {report.block_size}  "
                  f"stop tokens: {stops}  draft: {variant}"
                  + (" (proposals: the candidate selector's path)" if variant == "dflash2" else ""))
        log_rank0(f"tau (mean acceptance length): {report.tau:.3f}")
        log_rank0("acceptance rate by position: "
                  + " ".join(f"{r:.2f}" for r in report.position_acceptance))
        log_rank0(f"baseline: {report.baseline_tokens_per_second:.2f} tok/s  dflash: "
                  f"{report.dflash_tokens_per_second:.2f} tok/s  speedup: {report.speedup:.2f}x")
        log_rank0("lossless: " + ("yes (every output equals target-only greedy decoding)"
                                  if report.lossless
                                  else f"NO, requests {report.mismatched_requests}"))
        if args.output and dist.get_rank() == 0:
            with open(args.output, "w") as f:
                json.dump(dataclasses.asdict(report), f, indent=2)
    return 0 if report.lossless else 2


if __name__ == "__main__":
    sys.exit(main())
