"""Ctrl-C for the command line, acted on only at safe points of bnfold's own code.

SIGTERM (what ``timeout`` and service managers send) is taken the same way where its handler is
the default, so that a terminated command also leaves no temporary file; it exits with 143.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be,
including inside Python code that NNabla's C++ is running (graph building, callbacks, function
hooks): C++ unwound by a Python exception can leave NNabla's state broken, and a later call crashes
the process. So while :func:`ctrl_c_at_safe_points` is active, the first Ctrl-C only sets a flag, and
:func:`check` (called by progress reports and between stages) raises KeyboardInterrupt there. A
second Ctrl-C ends the process at once, after ``on_second`` (which removes temporary files and says
what was written); a watcher thread sees it even while the main thread is inside a long NNabla or
NumPy call that holds no GIL, where Python's handler would not run until the call returns.
"""
import os
import signal
import threading
from contextlib import contextmanager

EXIT_INTERRUPTED = 130

_active = None   # the _Guard of the innermost active ctrl_c_at_safe_points


class _Guard:
    def __init__(self, on_second, taken=(signal.SIGINT, signal.SIGTERM)):
        self.on_second = on_second
        self.taken = frozenset(taken)   # the signals whose handler this guard is
        self.claimed = False            # the main thread has said it was interrupted
        self.pending = False        # a Ctrl-C that check() has not yet raised
        self.seen = False           # any Ctrl-C while active
        self.signal = None          # the first signal taken (SIGINT or SIGTERM)
        self.counts = {"handler": 0, "watcher": 0}
        self._exiting = threading.Lock()
        try:   # stderr as it is now: file descriptor 2 may be redirected when the line is due
            self.stderr = os.dup(2)
        except OSError:
            self.stderr = None

    def _count(self, who, signum=signal.SIGINT):
        # the handler (main thread) and the watcher (its own thread) each see every signal: each
        # counts its own, so a signal is never counted twice
        self.counts[who] += 1
        if self.signal is None:
            self.signal = signum
        self.pending = self.seen = True
        if self.counts[who] >= 2:
            self._exit_now()

    def handler(self, signum, frame):
        self._count("handler", signum)

    def exit_status(self) -> int:
        """128 + the first signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signal or signal.SIGINT)

    def watch(self, fd):
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for byte in data:
                if byte == 0:       # the guard is leaving
                    return
                if byte in self.taken:   # the wakeup fd also gets the signals a program's
                    # own handlers take: those are not this guard's
                    self._count("watcher", signal.Signals(byte))

    def claim_exit(self) -> bool:
        """For the main thread about to say it was interrupted and return: True where it may (a
        second Ctrl-C then ends the process at once without saying it again), False where a
        second Ctrl-C is already ending the process with its own line."""
        self.claimed = self._exiting.acquire(blocking=False)
        return self.claimed

    def _exit_now(self):
        if not self._exiting.acquire(blocking=False):
            if self.claimed:        # the main thread has said it: end now, without a second line
                os._exit(self.exit_status())
            return                  # the other thread is exiting
        message = "bnfold: interrupted"
        try:
            message = self.on_second() or message
        finally:
            try:
                os.write(2 if self.stderr is None else self.stderr,
                         (message + "\n").encode(errors="replace"))
            finally:
                os._exit(self.exit_status())

    def close(self):
        if self.stderr is not None:
            os.close(self.stderr)
            self.stderr = None


def check() -> None:
    """Raise KeyboardInterrupt here if a Ctrl-C came since the last check (only while
    :func:`ctrl_c_at_safe_points` is active, and in the main thread). Cheap: call it often."""
    guard = _active
    if guard is not None and guard.pending and \
            threading.current_thread() is threading.main_thread():
        guard.pending = False
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C came while the innermost guard was active."""
    return _active is not None and _active.seen


@contextmanager
def ctrl_c_at_safe_points(on_second, keep: bool = False):
    """Inside, Ctrl-C is acted on at :func:`check` (see the module's docstring); ``on_second()``
    returns the one line to print when a second Ctrl-C ends the process. SIGINT is taken where
    Python's handler has it, SIGTERM where its handler is the default: each on its own (a command
    started in the background by a shell script ignores SIGINT, and SIGTERM is then the way to stop
    it). On leaving, the handlers and the signal wakeup fd are as they were, the handlers put back
    last, so that a Ctrl-C during the cleanup is still only a flag. ``keep=True`` (a process about
    to exit, its work done) leaves the guard in place instead: a late Ctrl-C cannot turn into a
    traceback as the interpreter shuts down. Outside the main thread, or where neither signal can be
    taken, this changes nothing."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {}
    for signum, takes in ((signal.SIGINT, lambda h: h is not None and h is not signal.SIG_IGN),
                          (signal.SIGTERM, lambda h: h is signal.SIG_DFL)):
        try:
            handler = signal.getsignal(signum)
        except ValueError:
            continue
        if takes(handler):   # a handler the program set, SIG_IGN, or one outside Python stays
            previous[signum] = handler
    if not previous:
        yield None
        return
    guard = _Guard(on_second, previous)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous_wakeup = None
    watcher = None
    if previous_wakeup is not None:
        watcher = threading.Thread(target=guard.watch, args=(read_fd,), name="bnfold-ctrl-c",
                                   daemon=True)
        try:
            watcher.start()
        except RuntimeError:   # no more threads: a second Ctrl-C acts when Python's handler runs
            watcher = None
    for signum in previous:
        signal.signal(signum, guard.handler)
    outer, _active = _active, guard
    try:
        yield guard
    finally:
        if not keep:
            _leave(guard, outer, previous, previous_wakeup, watcher, read_fd, write_fd)


def _leave(guard, outer, previous, previous_wakeup, watcher, read_fd, write_fd):
    """Undo ``ctrl_c_at_safe_points``: the watcher stopped and the wakeup fd put back while the
    guard's handlers still take every signal; the handlers last."""
    global _active
    if previous_wakeup is not None:
        signal.set_wakeup_fd(previous_wakeup)
    if watcher is not None:
        os.set_blocking(write_fd, True)
        os.write(write_fd, b"\0")
        watcher.join()
    os.close(write_fd)
    os.close(read_fd)
    guard.close()
    _active = outer
    for signum, handler in previous.items():
        signal.signal(signum, handler)


__all__ = ["EXIT_INTERRUPTED", "check", "ctrl_c_at_safe_points", "interrupted"]
