"""Running the main job in-process from the tests: flags → plan → the world's layout → train."""
from __future__ import annotations

import os

from megatron_dflash.distributed import init_distributed
from megatron_dflash.training.pretrain import parse_plan, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = 255  # never produced by `synthetic.pattern_dataset`


def train(argv: list[str], world_size: int | None = None) -> dict:
    """`examples/pretrain_dflash.py argv` in this process, on the tests' gloo world (megatron's
    model-parallel layout replaced by the plan's)."""
    plan = parse_plan(argv, world_size)
    init_distributed(plan.run.parallel, plan.run.training.seed)
    return pretrain(plan)


def flag_list(**flags) -> list[str]:
    """`--name value` flags from keywords (True: a bare switch; a list: several values)."""
    out = []
    for k, v in flags.items():
        out.append(f"--{k.replace('_', '-')}")
        if isinstance(v, (list, tuple)):
            out += [str(x) for x in v]
        elif v is not True:
            out.append(str(v))
    return out


def flags(target, train, valid=None, **kw) -> list[str]:
    """The unit tests' small training run on a tiny target (`target`, `data` fixtures)."""
    base = dict(target=target, mask_token_id=MASK, train_data=train, seq_length=48, block_size=8,
                num_draft_layers=1, num_anchors=4, micro_batch_size=2, global_batch_size=4,
                train_iters=10, lr=3e-3, min_lr=3e-4, log_interval=50, eval_samples=8, seed=7)
    if valid:
        base["valid_data"] = valid
    base.update(kw)
    out = []
    for k, v in base.items():
        out += [f"--{k.replace('_', '-')}"] + ([str(v)] if v is not True else [])
    return out


def run_in_process(argv: list[str]) -> dict:
    """`train` between two clean model-parallel states."""
    from tests.layout_testing import Utils

    Utils.destroy_model_parallel()
    try:
        return train(argv)
    finally:
        Utils.destroy_model_parallel()
