"""Regenerate the assistant turns of JSONL conversations with the frozen megatron target.

  [torchrun --nproc-per-node N] python tools/regenerate_data.py --target HF_DIR \\
      --input chat.jsonl [...] --output regenerated.jsonl [--batch-size 8] [--max-new-tokens 512] \\
      [--temperature T --top-p P --seed S] [--last-turn-only] [--thinking on|off] \\
      [--tensor-model-parallel-size TP] [--expert-model-parallel-size EP] \\
      [--offline-features DIR --seq-length S [--target-layer-ids ... | --num-draft-layers N]]

Input: OpenAI `messages` or ShareGPT `conversations` lines (ids from an `id` field, else
file:line; bad lines are reported with file:line and skipped). Output: `{"id", "messages"}` lines
in input order. User/system turns are kept and every assistant turn is regenerated in order
(`--last-turn-only`: the last one); a conversation ending with a user turn gets a new answer.
Greedy unless --temperature > 0; generation stops at the target's eos ids (generation_config.json)
and its tokenizer's eos. Data-parallel ranks take disjoint shards; a killed run restarted with the
same flags resumes where it stopped (`OUTPUT.parts/`; restarted with other output-shaping flags
it is refused, naming the flag). `--offline-features DIR` also writes the
target's tapped hidden states of every regenerated conversation, captured while generating, as
a feature cache for `examples/pretrain_dflash.py --offline-features DIR`.
Runs in fp32 on CPU or GPU as is (plain `python` or `torchrun`); without CUDA it applies
megatron-core's CPU adaptations (`megatron_dflash.cpu`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_dflash.training.progress import silence_known_warnings

silence_known_warnings()  # before megatron is imported

import torch  # noqa: E402

from megatron_dflash.config import build_target_layer_ids, check_layer_ids  # noqa: E402
from megatron_dflash.distributed import distributed, world_size  # noqa: E402
from megatron_dflash.feature_cache import is_cache  # noqa: E402
from megatron_dflash.log import log_rank0  # noqa: E402
from megatron_dflash.run import flags  # noqa: E402
from megatron_dflash.run.checks import check, check_layout, one_line  # noqa: E402
from megatron_dflash.run.plan import resolve_target  # noqa: E402

# The regeneration settings a resume must match (megatron_dflash.regeneration.Settings fields),
# by the flag that sets each.
SETTINGS_FLAGS = {
    "target": "--target", "target_config_sha256": "--target",
    "chat_template_sha256": "--tokenizer", "thinking": "--thinking",
    "temperature": "--temperature", "top_p": "--top-p", "seed": "--seed",
    "max_new_tokens": "--max-new-tokens", "last_turn_only": "--last-turn-only",
    "offline_features": "--offline-features", "target_layer_ids": "--target-layer-ids",
    "seq_length": "--seq-length", "features_dtype": "--offline-features-dtype"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Runs on CPU or GPU as is (plain `python` or `torchrun`).")
    flags.add_target_flags(p, required=True)
    g = p.add_argument_group("generation")
    g.add_argument("--input", nargs="+", required=True, help="JSONL conversation files")
    g.add_argument("--output", required=True, help="JSONL file to write")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=512, help="per assistant turn")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234, help="sampling seed (per conversation id)")
    g.add_argument("--last-turn-only", action="store_true",
                   help="regenerate only the last assistant turn")
    g.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="enable_thinking for the chat template (default: the template's)")
    g.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between progress lines")
    flags.add_parallel_flags(p, context=False)  # decoding does not split the sequence
    g = p.add_argument_group("feature cache")
    g.add_argument("--offline-features", default=None,
                   help="also write the regenerated conversations' target features here")
    g.add_argument("--seq-length", type=int, default=None,
                   help="the training --seq-length the cache is for (samples are cut to it)")
    g.add_argument("--offline-features-dtype", choices=["bf16", "fp32"], default="fp32")
    flags.add_taps_flags(p)
    p.set_defaults(num_draft_layers=5)  # the reference's five taps
    return p


def validate(a: argparse.Namespace):
    """Every check that needs no weights (ValueError naming the flag): the run's target part
    of the plan (fp32, local layers: generation's), with the taps when caching features."""
    for name in ("batch_size", "max_new_tokens"):
        check(getattr(a, name) >= 1, f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    check(a.temperature >= 0, f"--temperature={a.temperature} must be >= 0 (0 = greedy)")
    check(0 < a.top_p <= 1, f"--top-p={a.top_p} must be in (0, 1]")
    run = flags.run_config(a)
    pp = run.parallel.pipeline_model_parallel_size
    check(pp == 1, f"--pipeline-model-parallel-size={pp}: generation runs on one pipeline stage "
                   "(pipelined decoding is not implemented); use tensor/expert parallelism to "
                   "split the target")
    check(not run.parallel.sequence_parallel, "--sequence-parallel: decoding feeds one token "
                                              "at a time; use tensor parallelism alone")
    check_layout(run, world_size())
    for path in a.input:
        check(os.path.isfile(path), f"--input: {path} does not exist")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    check(os.path.isdir(out_dir) and os.access(out_dir, os.W_OK),
          f"--output={a.output}: {out_dir} is not a writable directory")
    tokenizer = a.tokenizer or a.target
    check(os.path.isdir(tokenizer), f"--tokenizer={tokenizer}: not a directory")
    target = resolve_target(run)
    if a.offline_features is not None:
        check(a.seq_length is not None and a.seq_length >= 1,
              "--offline-features needs --seq-length (>= 1): the training --seq-length the "
              "cache is for")
        check(not (is_cache(a.offline_features) or (os.path.exists(a.offline_features)
                                                    and os.listdir(a.offline_features))),
              f"--offline-features={a.offline_features}: exists and is not empty")
        layers = target.hf_config.num_hidden_layers
        ids = a.target_layer_ids or build_target_layer_ids(layers, a.num_draft_layers)
        try:
            check_layer_ids(ids, layers)
        except ValueError as e:
            raise ValueError(f"--target-layer-ids: {e}") from None
        target = dataclasses.replace(target, layer_ids=list(ids))
    return run, target


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        run, target = validate(args)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
        check(bool(tokenizer.chat_template),
              f"--tokenizer={args.tokenizer or args.target}: no chat template")
    except (OSError, ValueError) as e:
        parser.error(one_line(e))

    from megatron_dflash import regeneration as regen
    from megatron_dflash.data.conversations import DataReport
    from megatron_dflash.feature_cache import cache_manifest
    from megatron_dflash.generation import stop_token_ids
    from megatron_dflash.training.builders import build_frozen_target

    with distributed(run.parallel, args.seed):
        report = DataReport()
        conversations = regen.read_conversations(args.input, report)
        log_rank0(report.summary())
        model = build_frozen_target(target)
        if torch.cuda.is_available():
            model = model.cuda()
        features = None
        if args.offline_features is not None:
            features = regen.FeatureOutput(args.offline_features, cache_manifest(
                args.target, target.layer_ids, args.seq_length, args.offline_features_dtype))
        generator = regen.BatchGenerator(model, stop_token_ids(args.target, tokenizer),
                                         target.layer_ids if features is not None else None)
        thinking = None if args.thinking is None else args.thinking == "on"
        try:
            written = regen.regenerate_to_file(
                generator, regen.ChatPrompts(tokenizer, thinking), conversations, args.output,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                sampling=regen.Sampling(args.temperature, args.top_p, args.seed),
                last_turn_only=args.last_turn_only, features=features,
                log_interval=args.log_interval, target=args.target, flags=SETTINGS_FLAGS)
        except regen.SettingsMismatch as e:  # a resume with other flags: before any generation
            parser.error(str(e))
    log_rank0(f"regenerate: {written} conversations written to {args.output}"
              + (f", features to {args.offline_features}" if features is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
