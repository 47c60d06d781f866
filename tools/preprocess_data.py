"""Preprocess JSONL conversations into a megatron-core indexed dataset for DFlash training.

  python tools/preprocess_data.py --input a.jsonl [b.jsonl ...] --output-prefix data/chat \\
      --tokenizer hf:TOKENIZER_DIR | hf:GGUF_DIR --gguf-file NAME.gguf | sp:MODEL.model \\
      --seq-length 2048 [--workers 8]

Writes PREFIX.{bin,idx} (tokens) and PREFIX_loss_mask.{bin,idx} (layout documented in
megatron_dflash.data.dataset), then prints the data report. Bad samples are reported, not fatal; a bad setup (missing input,
bad tokenizer, unusable chat template) is one error message and exit status 1, with nothing
written at PREFIX.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_dflash.data.conversations import DataReport
from megatron_dflash.data.dataset import encode_files, write_indexed_dataset
from megatron_dflash.data.tokenize import load_chat_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL files, OpenAI {'messages': ...} or ShareGPT {'conversations': ...}")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.{bin,idx} and "
                                                          "PREFIX_loss_mask.{bin,idx}")
    p.add_argument("--tokenizer", required=True,
                   help="hf:PATH (HF tokenizer dir, or a GGUF dir with --gguf-file) or sp:MODEL")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the hf: directory")
    p.add_argument("--seq-length", type=int, required=True, help="longer samples are truncated")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.seq_length < 1 or args.workers < 1:
            raise ValueError("--seq-length and --workers must be >= 1")
        for path in args.input:
            if not os.path.isfile(path):
                raise ValueError(f"--input {path}: no such file")
        out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
        if not os.path.isdir(out_dir):
            raise ValueError(f"--output-prefix {args.output_prefix}: "
                             f"directory {out_dir} does not exist")
        tokenizer = load_chat_tokenizer(args.tokenizer, args.gguf_file)
        report = DataReport()
        samples = encode_files(args.input, tokenizer, args.seq_length, report, args.workers)
        count = write_indexed_dataset(args.output_prefix, samples, tokenizer.vocab_size)
    except (OSError, ValueError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {count} conversations to {args.output_prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
