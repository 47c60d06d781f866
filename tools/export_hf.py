"""Export a trained DFlash draft checkpoint (any TP, either backend) to the reference HF format.

  python tools/export_hf.py --checkpoint CKPT_ROOT --output OUT_DIR [--iteration N] \\
      [--dtype fp32|bf16|fp16] [--tokenizer-dir TARGET_DIR]

OUT_DIR gets config.json + model.safetensors (and the tokenizer files when asked), loadable by
`dflash.model.DFlashDraftModel.from_pretrained` (a DFlash2 draft: `DFlash2DraftModel`), vLLM and
SGLang. Runs in one process. A bad
checkpoint or argument is one error message and exit status 1, with nothing written.
"""
from __future__ import annotations

import argparse
import sys

from megatron_dflash.draft_export import export_checkpoint
from megatron_dflash.reference_format import DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint root (holds "
                                                       "latest_checkpointed_iteration.txt)")
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="tensor dtype (default: as stored)")
    p.add_argument("--tokenizer-dir", default=None, help="copy the target's tokenizer files")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, iteration=args.iteration,
                                dtype=args.dtype, tokenizer_dir=args.tokenizer_dir)
    except (OSError, ValueError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
