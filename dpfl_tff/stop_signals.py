"""A stop signal's exception never cuts a write or a checkpoint short, nor lands in clean-up code.

Pure Python (importing it imports nothing heavy): the drivers' signal
handler (`experiments.run_federated.Signals`) asks `hold` whether to raise
now; the round loop wraps what it writes in `deferred()`.

Python runs a signal handler in the main thread, whichever thread the kernel
delivered the signal to; blocking the signal in the main thread
(`signal.pthread_sigmask`) therefore does not hold it back while other threads
run (TensorFlow's, gRPC's, the TFF context's, the watchdog): the kernel
hands it to one of them and the handler still runs in the main thread,
inside the block. So the deferral is done here, in Python: inside
`deferred()`, the handler's exception is kept and raised when the outermost
block ends (or dropped, when the block ends by an exception of its own, or
with `raise_pending=False`: the loop is already on its way out with a stop).

A handler that raises inside a finalizer (`__del__`, a `weakref.finalize`
callback such as TFF's disposal of a worker's value) has its exception
printed and ignored by Python, after cutting the finalizer short: there
`hold` says not to raise; the run then stops after the round in progress
(or when the stop's grace runs out: `dpfl_tff.watchdog`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import FrameType

_depth = 0  # nesting of `deferred()` blocks in the main thread
_pending: BaseException | None = None  # the first exception a handler left to the end of the block


@contextlib.contextmanager
def deferred(raise_pending: bool = True) -> Iterator[None]:
    """A stop signal's exception waits until the block ends (in the main thread; elsewhere nothing changes).

    Args:
      raise_pending: when the outermost block ends normally, raise the
        exception a handler left (`hold`); False: drop it (the caller raises
        a stop of its own right after).
    """
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only
        return
    _depth += 1
    ended = False
    try:
        yield
        ended = True
    finally:
        _depth -= 1
        if _depth == 0:
            pending, _pending = _pending, None
            if ended and raise_pending and pending is not None:
                raise pending


def hold(error: BaseException, frame: FrameType | None) -> str | None:
    """Whether a signal handler about to raise `error` must not: None (raise it now), or why not.

    "deferred": inside `deferred()` (kept, raised when the block ends);
    "finalizer": the signal interrupted a finalizer (not raised at all).
    """
    global _pending
    if _depth > 0:
        if _pending is None:
            _pending = error
        return "deferred"
    if _in_finalizer(frame):
        return "finalizer"
    return None


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether `frame` (a signal handler's interrupted frame) runs inside a `__del__` or a weakref finalizer."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (
                code.co_name == "__call__" and os.path.basename(code.co_filename) == "weakref.py"):
            return True
        frame = frame.f_back
    return False
