"""StopGuard in one process: a caught signal only sets a flag, and once a stop was requested
later duplicates are ignored for the rest of the process (they used to kill exiting ranks)."""

import os
import signal
import subprocess
import sys
import textwrap

from megatron_rlp.train.signals import StopGuard


def test_signal_sets_flag_and_stop_reason():
    with StopGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.received == signal.SIGUSR1
        assert guard.should_stop() and guard.reason == "SIGUSR1 received"


def test_without_a_signal_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopGuard():
        assert signal.getsignal(signal.SIGUSR1) != before
    assert signal.getsignal(signal.SIGUSR1) == before


def test_duplicate_signal_during_shutdown_does_not_kill_the_process():
    """The stopped process gets the signal again after the guard ended, while exiting:
    it must still exit 0 (SIGUSR1's default action would end it with -10)."""
    code = textwrap.dedent("""
        import os, signal, sys
        from megatron_rlp.train.signals import StopGuard
        with StopGuard() as guard:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        print("exiting cleanly")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "exiting cleanly" in out.stdout


def test_ctrl_c_stops_and_saves_and_a_second_one_aborts():
    """The first SIGINT is a stop request like SIGTERM (the step finishes, the run saves);
    a second one raises KeyboardInterrupt at once; after the guard Ctrl-C interrupts again."""
    before = signal.getsignal(signal.SIGINT)
    with StopGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop() and guard.reason == "SIGINT received"
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            aborted = True
        else:
            aborted = False
        assert aborted
    assert signal.getsignal(signal.SIGINT) == before
