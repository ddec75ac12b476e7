"""PreemptionWatcher in one process: signals set the flag, handlers are restored."""
import os
import signal
import threading

import pytest

from hpctrain.comm.null import NullCommunicator
from hpctrain.train.preemption import PreemptionWatcher


def _raise(signum):
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_stop(signum):
    with PreemptionWatcher() as w:
        assert not w.signalled and not w.should_stop()
        assert not w.should_stop()          # asking twice has no side effect
        _raise(signum)
        assert w.signalled and w.signum == signum
        assert w.reason == signal.Signals(signum).name
        assert w.should_stop() and w.should_stop(NullCommunicator())
        assert w.stopped


def test_first_signal_is_kept():
    with PreemptionWatcher() as w:
        _raise(signal.SIGUSR1)
        _raise(signal.SIGTERM)
        assert w.signum == signal.SIGUSR1


def test_handlers_restored_on_close():
    seen = []

    def mine(s, f):
        seen.append(s)

    old_usr1 = signal.signal(signal.SIGUSR1, mine)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        w = PreemptionWatcher()
        assert w.installed
        assert signal.getsignal(signal.SIGUSR1) == w._handler
        _raise(signal.SIGUSR1)
        assert seen == [] and w.signalled   # ours ran, not the previous one
        w.close()
        assert not w.installed
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == old_term
        _raise(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        w.close()                           # closing twice is harmless
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)


def test_install_later_and_custom_signals():
    before = signal.getsignal(signal.SIGUSR2)
    w = PreemptionWatcher(signals=[signal.SIGUSR2], install=False)
    assert not w.installed and signal.getsignal(signal.SIGUSR2) == before
    w.install()
    w.install()                             # idempotent: keeps the first previous handler
    _raise(signal.SIGUSR2)
    w.close()
    assert w.signum == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before


def test_trigger_without_signal():
    w = PreemptionWatcher(install=False)
    assert not w.should_stop(None)
    w.trigger()
    assert w.should_stop(None) and w.reason == "SIGUSR1"


def test_not_main_thread_warns_and_still_agrees():
    out = {}

    def body():
        with pytest.warns(RuntimeWarning, match="main thread"):
            w = PreemptionWatcher()
        out["installed"] = w.installed
        out["before"] = w.should_stop()
        w.trigger(signal.SIGTERM)
        out["after"] = w.should_stop()
        w.close()

    before = signal.getsignal(signal.SIGUSR1)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == {"installed": False, "before": False, "after": True}
    assert signal.getsignal(signal.SIGUSR1) == before


def test_rejects_empty_signal_list():
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionWatcher(signals=())
