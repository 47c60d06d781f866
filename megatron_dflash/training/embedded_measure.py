"""The embedded default's last step: the exported drafter measured as a user would, by lossless
greedy speculative decoding against the target alone on held-out chitchat prompts."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch.distributed as dist

from megatron_dflash.distributed import device
from megatron_dflash.log import log_last_rank
from megatron_dflash.run.plan import Plan
from megatron_dflash.training.embedded_data import EVAL_NEW_TOKENS, eval_prompts


def measure(plan: Plan, result: dict) -> None:
    """τ, per-position acceptance and speed-up of `result['export']` on the held-out prompts; a
    PNG plot and evaluation.json beside the export; where everything is, printed."""
    from transformers import AutoTokenizer

    from megatron_dflash.evaluate import build_decoder, evaluate, plot_position_acceptance
    from megatron_dflash.generation import stop_token_ids

    run = plan.run
    target = run.target.target
    tokenizer = AutoTokenizer.from_pretrained(target)
    chitchat = os.path.join(run.target.cache_dir, "chitchat")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c["messages"], tokenize=False,
                                                             add_generation_prompt=True),
                                add_special_tokens=False) for c in eval_prompts(chitchat)]
    t0 = time.time()
    where = device()
    decoder = build_decoder(target, result["export"], where if where.type == "cuda" else None)
    report, _ = evaluate(decoder, prompts, EVAL_NEW_TOKENS, stop_token_ids(target, tokenizer))
    run_dir = os.path.dirname(os.path.abspath(result["export"]))
    plot = os.path.join(run_dir, "acceptance.png")
    if dist.get_rank() == 0:
        plot_position_acceptance(report.position_acceptance, plot,
                                 f"DFlash drafter for SmolLM2-135M-Instruct: tau={report.tau:.2f}")
        with open(os.path.join(run_dir, "evaluation.json"), "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    log_last_rank(f"speculative decoding on {report.num_requests} held-out prompts x "
                  f"{EVAL_NEW_TOKENS} tokens (block {report.block_size}, "
                  f"{time.time() - t0:.0f}s):")
    log_last_rank(f"  tau (mean acceptance length) {report.tau:.3f} | acceptance by position "
                  + " ".join(f"{r:.2f}" for r in report.position_acceptance))
    log_last_rank(f"  target alone {report.baseline_tokens_per_second:.1f} tok/s | with the "
                  f"drafter {report.dflash_tokens_per_second:.1f} tok/s | speed-up "
                  f"{report.speedup:.2f}x | "
                  + ("lossless (every output equals the target's greedy decoding)"
                     if report.lossless else f"NOT lossless: requests {report.mismatched_requests}"))
    save = os.path.abspath(run.checkpoint.save)
    log_last_rank(f"checkpoint: {save}")
    log_last_rank(f"export:     {result['export']} (reference format: vLLM / SGLang / z-lab "
                  "dflash)")
    log_last_rank(f"plot:       {plot}")
    log_last_rank(f"metrics:    {os.path.join(save, 'metrics.jsonl')} and "
                  f"{os.path.join(run_dir, 'evaluation.json')}")
    result["evaluation"] = report
