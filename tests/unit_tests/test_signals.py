"""Save-and-exit signal handling (training/signals.py) in one process; see also
tests/distributed/test_signals_dist.py."""
import os
import signal

from megatron_dflash.training.signals import ExitSignalHandler


def test_signal_is_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with ExitSignalHandler() as handler:
        assert not handler.should_exit()
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered before os.kill returns (main thread)
        assert handler.received == signal.SIGUSR1 and handler.should_exit()
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the loop decides
        assert handler.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGUSR1) is before
