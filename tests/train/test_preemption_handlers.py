"""The trainer's preemption handlers: a signal inside the loop sets the flag (USR2 asks for a requeue, TERM only
saves), and the handlers they replaced are back afterwards."""
from __future__ import annotations

import os
import signal


def test_signals_set_the_flag_and_the_previous_handlers_come_back():
    from pipeline.preemption import Preemption

    seen = []

    def mine(signum, _frame):
        seen.append(signum)

    previous = {s: signal.signal(s, mine) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        with Preemption() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.flag and not stop.requeue_requested  # scancel: save only
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requeue_requested
        assert seen == []  # neither reached the handlers that were installed before
        assert all(signal.getsignal(s) is mine for s in (signal.SIGUSR2, signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
