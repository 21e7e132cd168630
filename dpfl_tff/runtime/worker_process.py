"""The local TFF `worker_binary` process: started tied to our lifetime (PR_SET_PDEATHSIG), pinned, logged, stopped
and reaped, and an `atexit` hook for anything left.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import subprocess
import time
from collections.abc import Collection
from typing import IO

import portpicker
import tensorflow_federated as tff

from dpfl_tff.runtime.tff_internals import remote_executor_grpc_stub
from dpfl_tff.runtime.loopback_binding import _LoopbackBinder, _start_loopback_only

WORKER_BINARY = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")

_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
]
_PR_SET_PDEATHSIG = 1
WORKER_MALLOC_ARENA_MAX = "2"

_live_workers: set[subprocess.Popen] = set()
# The workers of the `local_context()` blocks now open in this process, innermost last.

_binders: dict[subprocess.Popen, "_LoopbackBinder | str"] = {}  # workers started with loopback_only


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pinned_child(cpus: tuple[int, ...]) -> None:  # runs in the child between fork and exec
    _die_with_parent()
    os.sched_setaffinity(0, cpus)


def start_worker(
    port: int | None = None,
    log: IO | None = None,
    max_concurrent_computation_calls: int = -1,
    loopback_only: bool = False,
    cpus: Collection[int] | None = None,
) -> tuple[subprocess.Popen, int]:
    """Starts a `worker_binary` tied to this process' lifetime.

    The worker gets `MALLOC_ARENA_MAX=2` unless the environment sets it: with
    glibc's default (8 arenas per core) its many threads fragment the heap and
    its RSS grew 5-11 MB per 100 MLP rounds here; with 2 arenas it stays flat
    (`scripts/bench_round.py --memory_rounds`).

    The worker listens on all interfaces (TFF's worker has no option for
    it). With `loopback_only`, its bind to the wildcard address is redirected
    to loopback (see `_LoopbackBinder`); where that mechanism is unavailable
    it listens on all interfaces as before, and `loopback_status(proc)` says
    why once it is ready.

    Args:
      port: TCP port; a free one is picked when None.
      log: open file for the worker's stdout and stderr; /dev/null when None.
      max_concurrent_computation_calls: passed through to the worker.
      loopback_only: listen on loopback only, if this machine allows it.
      cpus: the CPU ids the worker may run on (as `taskset -c`), set before
        it starts, so TensorFlow sizes its thread pools to them; None: all.

    Returns:
      The process and its port.

    Raises:
      RuntimeError: if the TFF wheel has no worker binary.
    """
    if not os.path.isfile(WORKER_BINARY):
        raise RuntimeError(f"TFF worker binary not found at {WORKER_BINARY}")
    port = port or portpicker.pick_unused_port()
    out = log if log is not None else subprocess.DEVNULL
    env = dict(os.environ)
    env.setdefault("MALLOC_ARENA_MAX", WORKER_MALLOC_ARENA_MAX)
    argv = [WORKER_BINARY, f"--port={port}", f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
    popen_kw = dict(
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        preexec_fn=_die_with_parent if cpus is None else functools.partial(_pinned_child, tuple(cpus)),
        start_new_session=True,  # a terminal's Ctrl-C goes to us, not to it
        env=env,
    )
    if loopback_only:
        proc, binder = _start_loopback_only(argv, log, **popen_kw)
        _binders[proc] = binder
    else:
        proc = subprocess.Popen(argv, **popen_kw)
    _live_workers.add(proc)
    return proc, port


def loopback_status(proc: subprocess.Popen) -> str | None:
    """For a ready worker started with `loopback_only`: None if it listens on loopback only, else why not."""
    binder = _binders.get(proc)
    if binder is None:
        return "not requested"
    if isinstance(binder, str):
        return binder
    if binder.bound:
        return None
    return binder.failure or "its bind() was not seen"


def stop_worker(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops a worker (SIGINT, then SIGKILL after `timeout`; at once if it is stopped, e.g. by SIGSTOP) and reaps it."""
    if proc.poll() is None:
        try:
            if _is_stopped(proc.pid):
                raise subprocess.TimeoutExpired(proc.args, 0)  # SIGINT would wait for a SIGCONT
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _live_workers.discard(proc)
    _binders.pop(proc, None)


def _is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T: SIGSTOP, or t: a tracer)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


@atexit.register
def _stop_all_workers() -> None:
    for proc in list(_live_workers):
        stop_worker(proc, timeout=2.0)


def wait_until_ready(
    stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub,
    address: str,
    timeout: float,
    proc: subprocess.Popen | None = None,
) -> None:
    """Blocks until `stub` answers, or raises naming `address`."""
    deadline = time.monotonic() + timeout
    while not stub.is_ready:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"TFF worker at {address} exited with code {proc.returncode} before it was ready"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"TFF worker at {address} not reachable after {timeout:.0f} s")
        time.sleep(0.05)


def exit_status(returncode: int) -> str:
    """'killed by SIGKILL' or 'exited with code 3' for a `Popen.returncode`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


