#!/usr/bin/env bash
# One srun task of a DFlash job: torch.distributed's rank variables from SLURM's, then the command.
# (torchrun, when it is the command, sets its own for the workers it starts.)
# USR1 is ignored from here on, so a launcher in between (torchrun) outlives the save-and-exit
# signal that SLURM sends to every process of the step; the trainer installs its own handler
# (megatron_dflash/training/signals.py), which replaces the inherited "ignore".
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
trap '' USR1
exec "$@"
