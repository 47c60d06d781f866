"""Write the offline feature cache: the frozen target's tapped hidden states over the training
(and held-out) data, for `examples/pretrain_dflash.py --offline-features OUT`.

  torchrun --nproc-per-node N tools/cache_features.py --target DIR --train-data DATA... \\
      --offline-features OUT [--valid-data DATA...] [--target-layer-ids ... | --num-draft-layers N]
      [--seq-length L] [--tensor-model-parallel-size T] [--sequence-parallel] [--bf16]
      [--offline-features-dtype fp32|bf16] [--micro-batch-size B]

It takes the main job's target, data, taps, parallel and precision flags (the same names and
checks), so the cache matches a training run given the same flags; nothing of the draft's
objective or optimizer. It runs the training module's path — `build_target(last_layer=max tap)`
+ `FeatureCapture`, at any TP size; data-parallel ranks take disjoint samples — and prints the
disk use per token and in total before writing (refused when the file system has less free
space). The layout is `megatron_dflash/feature_cache.py`'s. A bad flag is argparse's usage line
and one error line (status 2); a bad input found once running is one line and status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_dflash.training.progress import silence_known_warnings

silence_known_warnings()  # before megatron is imported

from megatron_dflash import feature_cache  # noqa: E402
from megatron_dflash.config import build_target_layer_ids, check_layer_ids  # noqa: E402
from megatron_dflash.distributed import device, distributed, world_size  # noqa: E402
from megatron_dflash.run import flags  # noqa: E402
from megatron_dflash.run.checks import check, check_layout, one_line, writable  # noqa: E402
from megatron_dflash.run.data_checks import check_data_paths  # noqa: E402
from megatron_dflash.run.plan import resolve_target  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flags.add_target_flags(p, required=True)
    flags.add_data_flags(p, embedded=False)
    flags.add_taps_flags(p)
    flags.add_parallel_flags(p, pipeline=False)
    flags.add_precision_flags(p, draft=False)
    g = p.add_argument_group("batches")
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="samples per target forward")
    return p


def plan_for(argv):
    """The cache writer's plan, (run, target, data): the target and its taps at the flags'
    layout, and the data; exits with argparse's usage line and one error line on a bad flag."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    run = flags.run_config(ns)
    run = dataclasses.replace(run, training=dataclasses.replace(
        run.training, micro_batch_size=ns.micro_batch_size))
    try:
        out = run.data.offline_features
        check(not feature_cache.is_cache(out), f"--offline-features {out}: already holds a "
                                               "feature cache")
        check(writable(out), f"--offline-features {out}: cannot be created (no write permission)")
        check(ns.micro_batch_size >= 1, f"--micro-batch-size={ns.micro_batch_size} must be >= 1")
        check_layout(run, world_size())
        target = resolve_target(run)
        layer_ids = run.dflash.target_layer_ids or build_target_layer_ids(
            target.hf_config.num_hidden_layers, run.dflash.num_draft_layers)
        try:
            check_layer_ids(layer_ids, target.hf_config.num_hidden_layers)
        except ValueError as e:
            raise ValueError(f"--target-layer-ids: {one_line(e)}") from None
        target.layer_ids = list(layer_ids)
        data = dataclasses.replace(
            check_data_paths(run), offline_features=out,
            offline_features_dtype=run.data.offline_features_dtype or (
                "bf16" if run.precision.bf16 else "fp32"))
    except ValueError as e:
        parser.error(one_line(e))
    return run, target, data


def main(argv=None) -> int:
    run, target, data = plan_for(sys.argv[1:] if argv is None else list(argv))
    from megatron_dflash.training.data import build_data, offline_features

    with distributed(run.parallel, run.training.seed):
        try:
            train, valid, pad_id = build_data(run, data)
            offline_features(run, target, data, (train, valid), pad_id, device())
        except (OSError, ValueError) as e:
            print(f"cache_features: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
