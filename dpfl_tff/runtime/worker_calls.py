"""Calls to TFF workers: watched (`calls_in_flight`), abandonable (`abort_calls`, the watchdog's lever), and the
errors a lost worker raises (`WorkerLost`, `LocalWorkerDied`, `WorkerStalled`).
"""

from __future__ import annotations

import functools
import subprocess
import threading
import time
import weakref
from collections.abc import Callable

import grpc

from dpfl_tff.runtime.tff_internals import remote_executor_grpc_stub, remote_executor_stub
from dpfl_tff.runtime.worker_process import exit_status

def _grpc_reason(error: BaseException) -> str:
    """'gRPC UNAVAILABLE: Socket closed' from a gRPC error, or TFF's wrapper of one."""
    for e in (error, *getattr(error, "args", ())):
        if isinstance(e, grpc.Call):
            return f"gRPC {e.code().name}: {e.details()}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class WorkerLost(RuntimeError):
    """A TFF worker stopped answering, or the local one died, during a computation."""

    def __init__(self, address: str, cause: BaseException | None = None, message: str | None = None):
        super().__init__(message or f"TFF worker at {address} stopped answering ({_grpc_reason(cause)})")
        self.address = address


class LocalWorkerDied(WorkerLost):
    """The private local worker (our child process) exited during a computation."""

    def __init__(self, address: str, proc: subprocess.Popen, log_path: str | None):
        log = f"its log: {log_path}" if log_path else "its output went to /dev/null"
        super().__init__(
            address,
            message=f"local TFF worker {address} (pid {proc.pid}) {exit_status(proc.returncode)} ({log})",
        )
        self.pid = proc.pid
        self.returncode = proc.returncode
        self.log_path = log_path


class WorkerStalled(WorkerLost):
    """A call to a TFF worker was abandoned by `abort_calls` (it gave no answer for too long, or the run stops)."""


_calls_lock = threading.Lock()
_in_flight: dict[int, tuple[str, float]] = {}  # id of a call's token -> (its worker's name, monotonic start)
_watched: "weakref.WeakSet[_WatchedStub]" = weakref.WeakSet()


class _WatchedStub(remote_executor_stub.RemoteExecutorStub):
    """A worker's stub whose calls in flight are listed (`calls_in_flight`) and can be abandoned (`abort_calls`).

    Costs a dict insertion and removal per gRPC call (a handful per round).
    """

    def __init__(self, stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub, worker: str,
                 abandon: Callable[[], None]):
        self._inner, self.worker, self._abandon = stub, worker, abandon
        self.aborted: str | None = None  # why, once abandoned: every call raises WorkerStalled from then on
        self.closed = False  # its context was left: values collected later are not disposed (`close`)
        _watched.add(self)

    @property
    def is_ready(self) -> bool:
        return self._inner.is_ready

    def get_executor(self, request):
        return self._call("get_executor", request)

    def create_value(self, request):
        return self._call("create_value", request)

    def create_struct(self, request):
        return self._call("create_struct", request)

    def create_call(self, request):
        return self._call("create_call", request)

    def create_selection(self, request):
        return self._call("create_selection", request)

    def compute(self, request):
        return self._call("compute", request)

    def compute_within(self, request, timeout: float | None):
        """`compute` with a gRPC deadline (`timeout` seconds; None: none), from any thread."""
        call = functools.partial(self._inner._stub.Compute, timeout=timeout)  # noqa: SLF001
        return self._call("compute", request, lambda r: remote_executor_grpc_stub._request(call, r))  # noqa: SLF001

    def dispose(self, request):
        return self._call("dispose", request)

    def dispose_executor(self, request):
        return self._call("dispose_executor", request)

    def _call(self, name: str, request, send: Callable | None = None):
        if self.closed:
            if name.startswith("dispose"):
                return None  # a value collected after its context was left: the worker is stopped or forgot it
            raise WorkerLost(self.worker, message=f"{self.worker}: its execution context was closed")
        if self.aborted is not None:
            if name.startswith("dispose"):
                return None  # clean-up of an abandoned worker's values (closing, collecting): nothing to do
            raise WorkerStalled(self.worker, message=self.aborted)
        token = object()
        with _calls_lock:
            _in_flight[id(token)] = (self.worker, time.monotonic())
        try:
            return (send or getattr(self._inner, name))(request)
        except Exception as e:
            if self.closed and name.startswith("dispose"):
                return None
            if self.aborted is not None:  # the failure abort_calls caused (a closed channel, a killed worker)
                if name.startswith("dispose"):
                    return None
                raise WorkerStalled(self.worker, message=self.aborted) from e
            raise
        finally:
            with _calls_lock:
                del _in_flight[id(token)]

    def close(self) -> None:
        """Its context is left (before its channel closes): a later dispose (a value collected) does nothing."""
        self.closed = True

    def abort(self, message: str) -> None:
        self.aborted = message
        self._abandon()


def calls_in_flight() -> list[tuple[str, float]]:
    """(worker, `time.monotonic()` at its start) of every call to a TFF worker now waiting for its answer.

    `worker` names it as errors do: "local TFF worker localhost:PORT (pid N)" or "TFF worker at host:port".
    """
    with _calls_lock:
        return list(_in_flight.values())


def abort_calls(message: str) -> list[str]:
    """Abandons every call to a TFF worker now in flight: each raises `WorkerStalled(message)` in its caller.

    Our local worker is killed (SIGKILL, by pid: it is our child, and it
    would not be trusted again); the channel to a remote one is closed,
    which cancels its calls (the remote worker itself is not ours). Every
    later call to those workers raises the same error at once.

    Returns:
      The names of the workers whose calls were abandoned.
    """
    busy = {w for w, _ in calls_in_flight()}
    hit = [s for s in list(_watched) if s.worker in busy]
    for stub in hit:
        stub.abort(message)
    return sorted({s.worker for s in hit})


# TFF's AsyncExecutionContext.invoke retries a failing worker forever (30 s apart);
# `__wrapped__` is the same coroutine without that decorator.
