"""Import a reference-format DFlash or DFlash2 draft (config.json + model.safetensors) as a
megatron draft checkpoint, to fine-tune or continue training.

  [torchrun --nproc-per-node TP] python tools/import_hf.py --draft DRAFT_DIR \\
      --checkpoint NEW_CKPT_ROOT [--target TARGET_HF_DIR]

Writes iteration 0 (the draft's sharded weights and `extra`, no optimizer) at tensor-parallel
size = number of processes; dist-checkpointing reshards it to any layout on load. With --target
the draft is checked against that target (hidden size, layers, vocabulary). A bad input is one
error message and exit status 1, with nothing written. Runs on CPU or GPU as is: without CUDA
it applies megatron-core's CPU adaptations (`megatron_dflash.cpu`).
"""
from __future__ import annotations

import argparse
import sys

from megatron_dflash.draft_import import import_reference
from megatron_dflash.distributed import distributed, world_size
from megatron_dflash.log import log_rank0
from megatron_dflash.run.config import ParallelArgs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Runs on CPU or GPU as is (plain `python` or `torchrun`); without CUDA "
               "megatron-core's CPU adaptations (megatron_dflash.cpu) are applied.")
    p.add_argument("--draft", required=True, help="reference-format draft directory")
    p.add_argument("--checkpoint", required=True, help="new checkpoint root to write")
    p.add_argument("--target", default=None, help="target HF checkpoint to check against")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tp = world_size()
    with distributed(ParallelArgs(tensor_model_parallel_size=tp)):
        try:
            path = import_reference(args.draft, args.checkpoint, target_dir=args.target)
        except (OSError, ValueError) as e:
            print(f"import_hf: error: {e}", file=sys.stderr)
            return 1
    log_rank0(f"imported {args.draft} to {path} (tensor-parallel size {tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
