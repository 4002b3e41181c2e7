"""Ctrl-C held while a fold writes: the arrays are then either untouched or completely folded."""
import signal
import threading
from contextlib import contextmanager


@contextmanager
def held():
    """Inside, SIGINT is recorded instead of acted on; on leaving, the previous handler is restored
    and, if a SIGINT came, given it (Python's default raises KeyboardInterrupt there). Only the main
    thread receives signals, so elsewhere, or where the previous handler is not a Python one, this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:   # not the main interpreter
        previous = None
    if not callable(previous):   # SIG_IGN, SIG_DFL or set outside Python: leave it alone
        yield
        return
    pending = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            previous(signal.SIGINT, pending[0])
