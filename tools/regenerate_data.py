"""Regenerate the assistant turns of JSONL conversations with the frozen megatron target.

  [torchrun --nproc-per-node N] python tools/regenerate_data.py --target HF_DIR \\
      --input chat.jsonl [...] --output regenerated.jsonl [--batch-size 8] [--max-new-tokens 512] \\
      [--temperature T --top-p P --seed S] [--last-turn-only] [--thinking on|off] \\
      [--tensor-model-parallel-size TP] [--expert-model-parallel-size EP] \\
      [--offline-features DIR --seq-length S [--target-layer-ids ...]]

Input: OpenAI `messages` or ShareGPT `conversations` lines (ids from an `id` field, else
file:line; bad lines are reported with file:line and skipped). Output: `{"id", "messages"}` lines
in input order. User/system turns are kept and every assistant turn is regenerated in order
(`--last-turn-only`: the last one); a conversation ending with a user turn gets a new answer.
Greedy unless --temperature > 0; generation stops at the target's eos ids (generation_config.json)
and its tokenizer's eos. Data-parallel ranks take disjoint shards; a killed run restarted with the
same flags resumes where it stopped (`OUTPUT.parts/`). `--offline-features DIR` also writes the
target's tapped hidden states of every regenerated conversation, captured while generating, as
a feature cache for `examples/pretrain_dflash.py --offline-features DIR`.
Runs in fp32 on CPU or GPU as is (plain `python` or `torchrun`); without CUDA it applies
megatron-core's CPU adaptations (`megatron_dflash.cpu`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_dflash import cpu


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Runs on CPU or GPU as is (plain `python` or `torchrun`).")
    p.add_argument("--target", required=True, help="HF checkpoint directory of the target")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: --target)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL conversation files")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512, help="per assistant turn")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (per conversation id)")
    p.add_argument("--last-turn-only", action="store_true",
                   help="regenerate only the last assistant turn")
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking for the chat template (default: the template's)")
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between progress lines")
    g = p.add_argument_group("parallelism (as in training)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"],
                   default="allgather")
    g = p.add_argument_group("feature cache")
    g.add_argument("--offline-features", default=None,
                   help="also write the regenerated conversations' target features here")
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="taps (default: the reference's 5 layers)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="the training --seq-length the cache is for (samples are cut to it)")
    g.add_argument("--offline-features-dtype", choices=["bf16", "fp32"], default="fp32")
    return p


def validate(a: argparse.Namespace, world_size: int):
    """Every check that needs no weights; ValueError naming the flag. Returns the HF config."""
    from megatron_dflash.config import _check_layer_ids, build_target_layer_ids
    from megatron_dflash.feature_cache import is_cache
    from megatron_dflash.training import arguments

    for flag in ("batch_size", "max_new_tokens", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(a, flag)} must be >= 1")
    if a.temperature < 0:
        raise ValueError(f"--temperature={a.temperature} must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p={a.top_p} must be in (0, 1]")
    if a.pipeline_model_parallel_size != 1:
        raise ValueError(f"--pipeline-model-parallel-size={a.pipeline_model_parallel_size}: "
                         "generation runs on one pipeline stage (pipelined decoding is not "
                         "implemented); use tensor/expert parallelism to split the target")
    if world_size % a.tensor_model_parallel_size:
        raise ValueError(f"world size {world_size} is not divisible by "
                         f"--tensor-model-parallel-size={a.tensor_model_parallel_size}")
    for path in a.input:
        if not os.path.isfile(path):
            raise ValueError(f"--input: {path} does not exist")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ValueError(f"--output={a.output}: {out_dir} is not a writable directory")
    # the fields training's checks read that generation fixes
    a.moe_grouped_gemm, a.transformer_impl, a.seq_length_buckets = False, "local", 1
    arguments._check_expert_layout(a, world_size)
    hf_config = arguments._target_hf_config(a)
    arguments._check_moe_target(a, hf_config)
    tokenizer = a.tokenizer or a.target
    if a.offline_features is not None:
        if a.seq_length is None or a.seq_length < 1:
            raise ValueError("--offline-features needs --seq-length (>= 1): the training "
                             "--seq-length the cache is for")
        if is_cache(a.offline_features) or (os.path.exists(a.offline_features)
                                            and os.listdir(a.offline_features)):
            raise ValueError(f"--offline-features={a.offline_features}: exists and is not empty")
        layers = hf_config.num_hidden_layers
        a.target_layer_ids = a.target_layer_ids or build_target_layer_ids(layers, 5)
        try:
            _check_layer_ids(a.target_layer_ids, layers)
        except ValueError as e:
            raise ValueError(f"--target-layer-ids: {e}") from None
    if not os.path.isdir(tokenizer):
        raise ValueError(f"--tokenizer={tokenizer}: not a directory")
    return hf_config


def _initialize(a: argparse.Namespace) -> None:
    """torchrun's world (or a world of one process) with the flags' model-parallel layout."""
    from megatron.core import parallel_state, tensor_parallel

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=a.tensor_model_parallel_size,
        expert_model_parallel_size=a.expert_model_parallel_size,
        expert_tensor_parallel_size=a.expert_tensor_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(a.seed)


def _stop_token_ids(target_dir: str, tokenizer) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list) and the tokenizer's eos."""
    stops = []
    path = os.path.join(target_dir, "generation_config.json")
    if os.path.isfile(path):
        eos = json.load(open(path)).get("eos_token_id")
        stops += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    return sorted(set(stops))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from transformers import AutoTokenizer

    try:
        hf_config = validate(args, world_size)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
        if not tokenizer.chat_template:
            raise ValueError(f"--tokenizer={args.tokenizer or args.target}: no chat template")
    except (OSError, ValueError) as e:
        parser.error(" ".join(str(e).split()))
    if not torch.cuda.is_available():
        cpu.apply()  # megatron-core's CPU adaptations
    _initialize(args)

    from megatron_dflash import regenerate as regen
    from megatron_dflash.data.conversations import DataReport
    from megatron_dflash.feature_cache import cache_manifest
    from megatron_dflash.targets import build_target, load_hf_weights, target_transformer_config

    report = DataReport()
    conversations = regen.read_conversations(args.input, report)
    if dist.get_rank() == 0:
        print(report.summary(), flush=True)
    config = target_transformer_config(
        hf_config, tensor_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type)
    target = build_target(hf_config, config, backend="local")
    load_hf_weights(target, args.target)
    if torch.cuda.is_available():
        target = target.cuda()
    features = None
    if args.offline_features is not None:
        features = regen.FeatureOutput(args.offline_features, cache_manifest(
            args.target, args.target_layer_ids, args.seq_length, args.offline_features_dtype))
    generator = regen.BatchGenerator(target, _stop_token_ids(args.target, tokenizer),
                                     args.target_layer_ids if features is not None else None)
    thinking = None if args.thinking is None else args.thinking == "on"
    written = regen.regenerate_to_file(
        generator, regen.ChatPrompts(tokenizer, thinking), conversations, args.output,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        sampling=regen.Sampling(args.temperature, args.top_p, args.seed),
        last_turn_only=args.last_turn_only, features=features, log_interval=args.log_interval)
    if dist.get_rank() == 0:
        print(f"regenerate: {written} conversations written to {args.output}"
              + (f", features to {args.offline_features}" if features is not None else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
