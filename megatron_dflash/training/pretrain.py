"""The main job as two public calls: `parse_plan` (flags → `RunConfig` → `Plan`) and `pretrain`
(the plan trained on an initialised world: the embedded default, or the `Trainer`)."""
from __future__ import annotations

from megatron_dflash.distributed import world_size as current_world_size
from megatron_dflash.run.checks import one_line
from megatron_dflash.run.flags import build_parser, parse_run_config
from megatron_dflash.run.plan import Plan, resolve
from megatron_dflash.training import embedded


def parse_plan(argv: list[str], world_size: int | None = None) -> Plan:
    """The main job's plan for `argv` (with neither --target nor --train-data: the embedded
    default's). A bad flag or input found here exits with argparse's usage line and one error
    line naming the flag (status 2), before anything is built."""
    parser = build_parser()
    run = parse_run_config(parser, list(argv), embedded.RUN_DEFAULTS)
    world = current_world_size() if world_size is None else world_size
    try:
        return embedded.resolve_embedded(run, world) if run.embedded else resolve(run, world)
    except ValueError as e:
        parser.error(one_line(e))


def pretrain(plan: Plan) -> dict:
    """Train `plan` on the initialised world (`distributed.init_distributed` at the plan's
    layout); returns the `Trainer.run` result (and the embedded default's measurement)."""
    from megatron_dflash.training.trainer import Trainer

    return embedded.train_embedded(plan) if plan.run.embedded else Trainer(plan).run()
