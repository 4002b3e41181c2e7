"""One lock for NNabla's parameter scope, which is one for the whole process.

Reading a file builds its networks in a scope of bnfold's own, made current for a while, and a fold
registers its new parameters in the caller's: bnfold's calls from several threads take turns. (A
caller's own graph building in another thread meanwhile is not covered: NNabla gives no per-thread
scope.) Importing this module does not import nnabla.
"""
import functools
import threading

SCOPE_LOCK = threading.RLock()


def holding_scope_lock(f):
    """``f`` run while holding :data:`SCOPE_LOCK`."""
    @functools.wraps(f)
    def run(*args, **kwargs):
        with SCOPE_LOCK:
            return f(*args, **kwargs)
    return run
