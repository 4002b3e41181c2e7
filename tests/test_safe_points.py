"""bnfold_gpu._safe_points: Ctrl-C acted on where bnfold's code checks for it, and the process's
signal state exactly as it was afterwards."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from bnfold_gpu import _safe_points


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_first_ctrl_c_waits_for_a_check():
    ran_on = []
    with _safe_points.ctrl_c_at_safe_points(lambda: "unused") as guard:
        _ctrl_c()
        ran_on.append("after the signal")      # not interrupted here
        assert guard.pending
        with pytest.raises(KeyboardInterrupt):
            _safe_points.check()
        _safe_points.check()                   # raised once per Ctrl-C
        assert guard.seen
    assert ran_on == ["after the signal"]


def test_check_does_nothing_outside_a_guard():
    _safe_points.check()
    assert not _safe_points.interrupted()


def _wakeup_fd():
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


def test_signal_state_is_restored():
    before, wakeup = signal.getsignal(signal.SIGINT), _wakeup_fd()
    term = signal.getsignal(signal.SIGTERM)
    threads = threading.active_count()
    with _safe_points.ctrl_c_at_safe_points(lambda: "unused"):
        assert signal.getsignal(signal.SIGINT) is not before and _wakeup_fd() != wakeup
        assert signal.getsignal(signal.SIGTERM) is not term or term is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before and _wakeup_fd() == wakeup
    assert signal.getsignal(signal.SIGTERM) is term
    assert threading.active_count() == threads


def test_sigterm_is_taken_as_ctrl_c_and_exits_143():
    code = ("import os, signal, sys, time\n"
            "from bnfold_gpu import _safe_points\n"
            "with _safe_points.ctrl_c_at_safe_points(lambda: 'unused') as guard:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    try:\n"
            "        _safe_points.check()\n"
            "    except KeyboardInterrupt:\n"
            "        print('at the check', guard.exit_status())\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "at the check 143\n" and r.returncode == 143 and r.stderr == "unused\n"


def test_a_sigterm_handler_of_the_program_is_left_alone():
    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with _safe_points.ctrl_c_at_safe_points(lambda: "unused"):
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ignored_ctrl_c_stays_ignored_and_sigterm_is_still_taken():
    # a command started in the background by a shell script ignores SIGINT: SIGTERM stops it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with _safe_points.ctrl_c_at_safe_points(lambda: "unused") as guard:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt):
                _safe_points.check()
            assert guard.exit_status() == 143
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)


def test_nothing_to_take_changes_nothing():
    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, mine)
    try:
        with _safe_points.ctrl_c_at_safe_points(lambda: "unused") as guard:
            assert guard is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def test_ctrl_c_while_the_guard_is_leaving_is_only_a_flag(monkeypatch):
    # the handlers are put back last: a Ctrl-C as the watcher is stopped raises nothing
    real = os.write
    sent = []

    def write(fd, data):
        if data == b"\0" and not sent:
            sent.append(fd)
            _ctrl_c()
        return real(fd, data)
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(_safe_points.os, "write", write)
    with _safe_points.ctrl_c_at_safe_points(lambda: "unused") as guard:
        pass
    assert sent and guard.pending and signal.getsignal(signal.SIGINT) is before


def test_kept_guard_takes_a_late_ctrl_c_as_a_flag():
    # keep=True (a process exiting once the work is done): a Ctrl-C after the guard's block is no
    # KeyboardInterrupt at shutdown; without keep, it would be one
    code = ("import os, signal, sys, time\n"
            "from bnfold_gpu import _safe_points\n"
            "keep = sys.argv[1] == 'keep'\n"
            "with _safe_points.ctrl_c_at_safe_points(lambda: 'gone', keep=keep):\n"
            "    pass\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.2)\n"
            "print('done')\n")
    kept = subprocess.run([sys.executable, "-c", code, "keep"], capture_output=True, text=True)
    assert kept.returncode == 0 and kept.stdout == "done\n" and kept.stderr == ""
    left = subprocess.run([sys.executable, "-c", code, "leave"], capture_output=True, text=True)
    assert left.returncode != 0 and "KeyboardInterrupt" in left.stderr


def test_outside_the_main_thread_nothing_changes():
    seen = []

    def body():
        with _safe_points.ctrl_c_at_safe_points(lambda: "unused") as guard:
            seen.append(guard)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [None]


def test_second_ctrl_c_exits_at_once_with_the_line_given():
    code = ("import os, signal, sys, time\n"
            "from bnfold_gpu import _safe_points\n"
            "with _safe_points.ctrl_c_at_safe_points(lambda: 'bnfold: gone'):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr == "bnfold: gone\n" and r.stdout == ""


def test_the_interrupted_line_is_said_once():
    # the main thread has said it was interrupted and is returning: a second Ctrl-C then ends
    # the process at once, without saying it again
    code = ("import os, signal, sys, time\n"
            "from bnfold_gpu import _safe_points\n"
            "with _safe_points.ctrl_c_at_safe_points(lambda: 'second line') as guard:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert guard.claim_exit()\n"
            "    print('interrupted', file=sys.stderr, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "print('returned')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr == "interrupted\n" and r.stdout == "", r


def test_a_signal_the_program_handles_is_not_the_guards():
    # the program's own SIGTERM handler is left alone, and the guard's watcher (which sees every
    # signal through the wakeup fd) does not count it either
    code = ("import os, signal, sys, time\n"
            "from bnfold_gpu import _safe_points\n"
            "seen = []\n"
            "signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))\n"
            "with _safe_points.ctrl_c_at_safe_points(lambda: 'gone') as guard:\n"
            "    for _ in range(3):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.05)\n"
            "    _safe_points.check()\n"
            "    print(len(seen), guard.seen)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "3 False\n" and r.stderr == "", r
