"""Write the offline feature cache: the frozen target's tapped hidden states over the training
(and held-out) data, for `examples/pretrain_dflash.py --offline-features OUT`.

  torchrun --nproc-per-node N tools/cache_features.py --target DIR --train-data DATA... \\
      --offline-features OUT [--valid-data DATA...] [--target-layer-ids ...] [--seq-length L] \\
      [--tensor-model-parallel-size T] [--sequence-parallel] [--offline-features-dtype fp32|bf16]

It takes the main job's flags, and checks them the same way (those that only shape training are
accepted and ignored; --mask-token-id is not needed), so the cache matches a training run given
the same flags. It runs the training module's path — `build_target(last_layer=max tap)` +
`FeatureCapture`, at any TP size; data-parallel ranks take disjoint samples — and prints the disk
use per token and in total before writing (refused when the file system has less free space).
The layout is `megatron_dflash/feature_cache.py`'s. A bad flag is argparse's usage line and one
error line (status 2); a bad input found once running is one line and status 1.
"""
from __future__ import annotations

import datetime
import os
import sys

from megatron_dflash.training.progress import silence_known_warnings

silence_known_warnings()  # before megatron is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_dflash import cpu, feature_cache  # noqa: E402
from megatron_dflash.training.arguments import build_parser, parse_args  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--target", "--train-data", "--offline-features"):
        if flag not in argv:
            build_parser().error(f"{flag} is required")
    out = build_parser().parse_known_args(argv)[0].offline_features
    if feature_cache.is_cache(out):
        build_parser().error(f"--offline-features {out}: already holds a feature cache")
    if "--mask-token-id" not in argv:  # the target's features do not depend on it
        argv += ["--mask-token-id", "0"]
    args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    created = not dist.is_initialized()
    if created:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            cpu.apply()
        if "RANK" not in os.environ:  # plain `python tools/cache_features.py`
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT="29556")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    from megatron_dflash.training.loop import build_data, offline_features

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    try:
        parallel_state.initialize_model_parallel(args.tensor_model_parallel_size)
        train, valid, pad_id = build_data(args)
        offline_features(args, (train, valid), pad_id, device)
    except (OSError, ValueError) as e:
        print(f"cache_features: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
