"""A signal that reaches one rank makes every rank leave after the same iteration."""
import os
import signal

import pytest
import torch.distributed as dist

from megatron_dflash.training.signals import ExitSignalHandler


@pytest.mark.world(2)
def test_one_ranks_signal_stops_all_ranks():
    with ExitSignalHandler() as handler:
        assert not handler.should_exit()
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_exit()
        assert (handler.received is not None) == (dist.get_rank() == 1)
