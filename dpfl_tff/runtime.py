"""TFF execution contexts: a private local worker that cannot outlive us, or remote workers.

`import tensorflow_federated` installs a default context that starts the
`worker_binary` lazily, with the parent's stdout/stderr, and stops it only from
a garbage-collection `__del__`. A driver that is killed, or whose stdout is a
pipe, then leaves an orphan worker that keeps the pipe open.

`local_context()` replaces that context for the duration of a `with` block:

* the worker is started eagerly from the calling thread with
  `PR_SET_PDEATHSIG=SIGKILL`, so the kernel kills it if our process dies for
  any reason, SIGKILL included;
* its output goes to a log file (or /dev/null), never to our stdout;
* it listens on loopback only (TFF's worker binds every interface; see
  `_LoopbackBinder`), or, where that is not possible, one warning line says so;
* if it dies, the running call (or the next one) raises `LocalWorkerDied` with
  its exit status at once, instead of TFF's retrying it forever;
* on leaving the block (normally, on an exception, or on SIGTERM turned into
  `SystemExit` by the driver) it is terminated and reaped, and an `atexit`
  hook does the same for anything left.

`remote_context(addresses, credential=...)` runs the block on worker services
that someone else started (`experiments.run_worker`), splitting each call's
clients over them with TFF's mergeable-computation context; its channels are
mutual TLS with the run's credential (`dpfl_tff.worker_auth`), or plain for
workers started with `--insecure_workers`.

`install()` (called on entering either block) replaces TFF's lazily-starting
default context with one that raises: a TFF computation invoked outside these
blocks then fails with a clear error instead of starting a worker nobody
stops. Importing this module changes nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import IO, Any

import grpc
import numpy as np
import portpicker
import tensorflow_federated as tff
import tree
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure, tracing
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.computation import function_utils
from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl, runtime_error_context
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import executors_errors
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub, remote_executor_stub
from tensorflow_federated.python.core.impl.types import placements, type_conversions

from dpfl_tff import serialization, worker_auth

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
_active_local: list["_LocalWorker"] = []
_binders: dict[subprocess.Popen, "_LoopbackBinder | str"] = {}  # workers started with loopback_only

_installed = False


def install() -> None:
    """Replaces TFF's lazily-starting default context by one that raises (idempotent).

    TFF's own default context starts a `worker_binary` on the first call made
    outside any context and stops it only from a garbage-collection `__del__`:
    a driver that is killed, or whose stdout is a pipe, then leaves an orphan
    worker. After this, such a call fails with a clear error instead. It also
    turns TFF's tracing spans (debug log lines) off. Every context here calls
    it on entry (so that leaving the context restores the raising one, never
    TFF's); call it yourself before running TFF computations of your own
    outside them.
    """
    global _installed
    if not _installed:
        # TFF's only default tracing provider logs two absl debug lines per traced call (~1-2 ms per round
        # of the MLP); set once, before our first call (changing it while a span is open trips TFF's asserts).
        tracing.set_tracing_providers([])
        context_stack_impl.context_stack.set_default_context(runtime_error_context.create_runtime_error_context())
        gc.collect()  # free TFF's replaced context now, not at interpreter exit when its __del__ fails
        _installed = True


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _pinned_child(cpus: tuple[int, ...]) -> None:  # runs in the child between fork and exec
    _die_with_parent()
    os.sched_setaffinity(0, cpus)


# The worker has no flag for its listen address: TFF 0.87 binds "[::]:PORT", every interface
# (tensorflow_federated/cc/simulation/servers.cc). A loopback-only worker is started by a
# helper (a fresh `python -I -S`, single-threaded) that installs a seccomp filter turning the
# worker's bind() calls into notifications to us, sends us the notification fd, and execs the
# worker (same pid, our child). `_LoopbackBinder` binds the socket of a wildcard bind() to
# loopback instead (a copy of the worker's socket, by pidfd_getfd), and lets other binds run.
# Only bind() is filtered: a few BPF instructions per worker system call, nothing per round.
# Linux >= 5.6 on x86_64/aarch64; anything missing -> the worker runs as before (all interfaces).
_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH_*, __NR_bind, __NR_seccomp)
    "x86_64": (0xC000003E, 49, 317),
    "aarch64": (0xC00000B7, 200, 277),
}
_SECCOMP_HELPER = r"""
import ctypes, os, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
audit_arch, nr_bind, nr_seccomp = (int(a) for a in sys.argv[2:5])
worker = sys.argv[5:]
def go(message, fds=()):  # "+" with the fd, or "-" and why not (an fd needs a byte of data)
    socket.send_fds(sock, [message.encode()], list(fds))
    sock.close()
    os.execv(worker[0], worker)
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: lets an unprivileged process filter itself
        go("-prctl(PR_SET_NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno()))
    code = [  # classic BPF over struct seccomp_data {int nr; u32 arch; ...}
        (0x20, 0, 0, 4), (0x15, 0, 3, audit_arch),  # ld arch; jne -> allow
        (0x20, 0, 0, 0), (0x15, 0, 1, nr_bind),  # ld nr; jne -> allow
        (0x06, 0, 0, 0x7FC00000),  # SECCOMP_RET_USER_NOTIF
        (0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in code))
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(code), ctypes.addressof(insns)))
    # SECCOMP_SET_MODE_FILTER, flags NEW_LISTENER | SPEC_ALLOW (no speculation mitigation cost)
    listener = libc.syscall(ctypes.c_long(nr_seccomp), ctypes.c_long(1), ctypes.c_long(8 | 4), prog)
    if listener < 0:
        go("-seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): " + os.strerror(ctypes.get_errno()))
    go("+", [listener])
except Exception as e:
    go(f"-{type(e).__name__}: {e}")
"""
_NOTIF_RECV, _NOTIF_SEND, _NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102  # SECCOMP_IOCTL_NOTIF_*
_NR_PIDFD_GETFD = 438  # the same on every architecture
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _LoopbackBinder:
    """Answers the seccomp notifications of a worker's bind() calls (a daemon thread).

    A bind() to the wildcard address (`[::]` or `0.0.0.0`) is done on loopback
    instead (`::ffff:127.0.0.1` on a dual-stack IPv6 socket, `::1` on an
    IPv6-only one, `127.0.0.1` on IPv4) and the worker is told it succeeded
    (or gets the error of that bind); other binds run unchanged. If a
    wildcard bind cannot be redirected (e.g. pidfd_getfd not permitted), it
    runs unchanged too, and `failure` says why.
    """

    def __init__(self, proc: subprocess.Popen, listener: int, log: IO | None):
        self.proc = proc
        self.listener = listener
        self.log = log
        self.bound: list[str] = []  # loopback addresses the worker listens on, "127.0.0.1:PORT"
        self.failure: str | None = None
        threading.Thread(target=self._run, name=f"loopback-binder-{proc.pid}", daemon=True).start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if not any(ev & select.POLLIN for _, ev in events):
                    return  # POLLHUP: the worker is gone
                notif = bytearray(80)  # struct seccomp_notif
                try:
                    fcntl.ioctl(self.listener, _NOTIF_RECV, notif, True)
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # the caller was interrupted; poll again (HUP if gone)
                    raise
                nid, tid = struct.unpack_from("QI", notif)
                fd, addr, addrlen = struct.unpack_from("3Q", notif, 32)  # seccomp_data.args[0:3]
                try:
                    error = self._bind(nid, tid, fd, addr, addrlen)
                except Exception as e:  # noqa: BLE001  (any failure: the worker binds as before)
                    self.failure = f"{type(e).__name__}: {e}"
                    error = None
                # struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}; flag 1: CONTINUE the call
                resp = (nid, 0, 0, 1) if error is None else (nid, 0, error, 0)
                try:
                    fcntl.ioctl(self.listener, _NOTIF_SEND, bytearray(struct.pack("QqiI", *resp)), True)
                except OSError:
                    pass  # the caller is gone
        except Exception as e:  # noqa: BLE001  (binds fail from now on: local_context starts a plain worker)
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            os.close(self.listener)

    def _bind(self, nid: int, tid: int, fd: int, addr: int, addrlen: int) -> int | None:
        """Binds the worker's socket `fd` to loopback if `addr` is a wildcard: 0 or -errno; None: run the call."""
        mem = os.open(f"/proc/{tid}/mem", os.O_RDONLY)  # after exec: the worker's memory
        try:
            sa = os.pread(mem, min(addrlen, 128), addr)
        finally:
            os.close(mem)
        family, port = struct.unpack_from("=H", sa)[0], struct.unpack_from("!H", sa, 2)[0]
        wildcard = (family == socket.AF_INET6 and sa[8:24] == bytes(16)) or (
            family == socket.AF_INET and sa[4:8] == bytes(4)
        )
        if not wildcard:
            return None
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            copy = _libc.syscall(*map(ctypes.c_long, (_NR_PIDFD_GETFD, pidfd, fd, 0)))
            if copy < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(pidfd)
        with socket.socket(fileno=copy) as sock:
            fcntl.ioctl(self.listener, _NOTIF_ID_VALID, struct.pack("Q", nid))  # still the same call
            if family == socket.AF_INET:
                host, shown = "127.0.0.1", "127.0.0.1"
            elif sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                host, shown = "::1", "[::1]"
            else:
                host, shown = "::ffff:127.0.0.1", "127.0.0.1"
            try:
                sock.bind((host, port))
            except OSError as e:
                return -e.errno
        self.bound.append(f"{shown}:{port}")
        if self.log is not None:
            os.write(
                self.log.fileno(),
                f"dpfl_tff: this worker listens on {shown}:{port} only (loopback): its bind to the wildcard "
                f"address was redirected; its own 'listening on' line names the address it asked for\n".encode(),
            )
        return 0


def _start_loopback_only(
    argv: list[str], log: IO | None, **popen_kw
) -> tuple[subprocess.Popen, _LoopbackBinder | str]:
    """Starts `argv` via the seccomp helper; returns the process and its binder, or why there is none."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None or not hasattr(os, "pidfd_open") or not sys.executable:
        why = f"not supported here ({platform.machine()}, Python {platform.python_version()})"
        return subprocess.Popen(argv, **popen_kw), why
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SECCOMP_HELPER, str(theirs.fileno()), *map(str, arch), *argv],
            pass_fds=(theirs.fileno(),),
            **popen_kw,
        )
        theirs.close()
        ours.settimeout(60.0)
        try:
            message, fds, _, _ = socket.recv_fds(ours, 1024, 1)
        except OSError as e:
            message, fds = f"-helper: {e}".encode(), []
    if message != b"+" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return proc, message.decode(errors="replace")[1:] or "the helper exited"
    return proc, _LoopbackBinder(proc, fds[0], log)


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


class _RemoteExecutor(remote_executor.RemoteExecutor):
    """TFF's RemoteExecutor, with three savings per call of a computation.

    * `create_value` serializes with `serialization.serialize_into` (TFF's
      serializer spends ~30 ms on a 4.8 MB model state), and results are read
      with `serialization.deserialize` (2.8 -> 0.4 ms for the MLP's state).
    * A computation is sent to the worker once: TFF's execution context sends
      the (compiled, cached) computation with every call, ~3 ms per round for
      a small model. The worker's value of it is kept (for the 16 computations
      used last, until this executor closes) and called again; computations
      are immutable.
    """

    _KEEP = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._computations: collections.OrderedDict[int, tuple[object, remote_executor.RemoteValue, object]] = (
            collections.OrderedDict()
        )

    async def create_value(self, value, type_spec=None):
        if type_spec is None:
            return await super().create_value(value, type_spec)
        cached = self._computations.get(id(value)) if isinstance(type_spec, tff.FunctionType) else None
        if cached is not None and cached[0] is value and cached[2] == self._executor_id:  # noqa: SLF001
            self._computations.move_to_end(id(value))
            return cached[1]
        self._check_has_executor_id()
        request = executor_pb2.CreateValueRequest(executor=self._executor_id)  # noqa: SLF001
        serialization.serialize_into(value, type_spec, request.value)
        response = self._stub.create_value(request)  # noqa: SLF001
        if not isinstance(type_spec, tff.FunctionType):
            return remote_executor.RemoteValue(response.value_ref, type_spec, self)
        # Kept (with `value`, so that its id stays unique) until close(), which clears the
        # worker's state anyway: no dispose at interpreter exit, when the channel is closed.
        remote = remote_executor.RemoteValue(response.value_ref, type_spec, self, dispose_at_exit=False)
        self._computations[id(value)] = (value, remote, self._executor_id)  # noqa: SLF001
        self._computations.move_to_end(id(value))
        while len(self._computations) > self._KEEP:
            self._computations.popitem(last=False)  # the worker's copy is disposed when collected
        return remote

    async def _compute(self, value_ref, type_spec):
        if self._stream_structs:  # noqa: SLF001  (not used here; TFF's path)
            return await super()._compute(value_ref, type_spec)
        self._check_has_executor_id()
        request = executor_pb2.ComputeRequest(executor=self._executor_id, value_ref=value_ref)  # noqa: SLF001
        return serialization.deserialize(self._stub.compute(request).value, type_spec)  # noqa: SLF001

    def close(self):
        self._computations.clear()
        super().close()


class _ExecutorFactory(python_executor_stacks.ResourceManagingExecutorFactory):
    """TFF's factory (one executor per cardinalities), which can also close all its executors."""

    def close_all(self) -> None:
        """Closes every executor: the worker drops all values they hold (computations, states, data).

        The next call creates a new executor. Without this, a worker shared by
        several runs keeps every finished run's values (about 6 MiB per small
        run, measured), and grows with each run.
        """
        for ex in list(self._executors.values()):
            ex.close()
        self._executors.clear()


def _executor_factory(stub: remote_executor_stub.RemoteExecutorStub) -> _ExecutorFactory:
    def stack_fn(cardinalities):
        cardinalities.setdefault(placements.CLIENTS, 0)
        ex = _RemoteExecutor(stub)
        ex.set_cardinalities(cardinalities)
        return ex

    return _ExecutorFactory(stack_fn)


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


def exit_status(returncode: int) -> str:
    """'killed by SIGKILL' or 'exited with code 3' for a `Popen.returncode`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


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

    def dispose(self, request):
        return self._call("dispose", request)

    def dispose_executor(self, request):
        return self._call("dispose_executor", request)

    def _call(self, name: str, request):
        if self.aborted is not None:
            if name.startswith("dispose"):
                return None  # clean-up of an abandoned worker's values (closing, collecting): nothing to do
            raise WorkerStalled(self.worker, message=self.aborted)
        token = object()
        with _calls_lock:
            _in_flight[id(token)] = (self.worker, time.monotonic())
        try:
            return getattr(self._inner, name)(request)
        except Exception as e:
            if self.aborted is not None:  # the failure abort_calls caused (a closed channel, a killed worker)
                if name.startswith("dispose"):
                    return None
                raise WorkerStalled(self.worker, message=self.aborted) from e
            raise
        finally:
            with _calls_lock:
                del _in_flight[id(token)]

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
_INVOKE_ONCE = async_execution_context.AsyncExecutionContext.invoke.__wrapped__
# Between a dead worker's socket closing and its exit status being reapable.
_EXIT_GRACE_SECONDS = 1.0


def _run_coroutine(coroutine) -> Any:
    """Runs `coroutine` to completion on a new event loop in this (worker) thread."""
    return asyncio.run(coroutine)


class _CompileByIdentity:
    """A compiler pipeline whose cache is looked up by the computation object, not by its hash.

    TFF's pipeline caches by `hash(computation)`, which serializes the whole
    computation proto on every call (0.8 ms per round for the MLP's `next`).
    Computations are immutable; the 16 compiled last are kept.
    """

    _KEEP = 16

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self._compiled: collections.OrderedDict[int, tuple[object, object]] = collections.OrderedDict()

    def compile(self, comp):
        hit = self._compiled.get(id(comp))
        if hit is not None and hit[0] is comp:
            self._compiled.move_to_end(id(comp))
            return hit[1]
        compiled = self._pipeline.compile(comp)
        self._compiled[id(comp)] = (comp, compiled)  # `comp` kept: its id stays unique
        while len(self._compiled) > self._KEEP:
            self._compiled.popitem(last=False)
        return compiled


class _WorkerContext(async_execution_context.AsyncExecutionContext):
    """Runs calls on one worker; gives up after `retry_seconds` of failures.

    A remote worker's call (`proc` None) runs in a thread of its own, on its
    own event loop: TFF's RemoteExecutor makes blocking gRPC calls inside its
    coroutines, so on one event loop the workers of a mergeable call (one
    subround each) would run one after the other, not at the same time.

    For a remote worker (`proc` None) any gRPC failure that is not retryable,
    or retryable ones for `retry_seconds`, raise `WorkerLost`. For our local
    worker (`proc` given), a failed call first checks whether the process
    exited (a dead worker closes its socket, so a call blocked on it returns
    at once) and raises `LocalWorkerDied` with its exit status; errors of a
    live worker that are not retryable are raised unchanged. Successful calls
    cost nothing extra.
    """

    def __init__(
        self,
        address: str,
        stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub,
        retry_seconds: float,
        proc: subprocess.Popen | None = None,
        log_path: str | None = None,
    ):
        if proc is not None:
            name = f"local TFF worker {address} (pid {proc.pid})"
            abandon = proc.kill  # our child: its socket closes, so the call returns
        else:
            name = f"TFF worker at {address}"
            abandon = stub._channel.close  # noqa: SLF001  (cancels the calls on it)
        self.watched = _WatchedStub(stub, name, abandon)
        super().__init__(
            executor_fn=_executor_factory(self.watched),
            compiler_fn=native_compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._compiler_pipeline = _CompileByIdentity(self._compiler_pipeline)
        self._kept: _KeptState | None = None
        self.address = address
        self._retry_seconds = retry_seconds
        self._proc = proc
        self._log_path = log_path
        # Its own thread (asyncio's default pool has min(32, cores + 4) threads: more workers would queue).
        self._thread = None if proc is not None else concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"dpfl_tff_worker_{address}")

    def shutdown(self) -> None:
        """Ends the remote worker's call thread (a sweep opens one remote context per run)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def _check_alive(self, grace: float) -> None:
        """Raises `LocalWorkerDied` if the local worker exits within `grace` seconds."""
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return
        raise LocalWorkerDied(self.address, self._proc, self._log_path)

    async def invoke(self, comp, arg):
        if asyncio.iscoroutine(arg):
            arg = await arg  # once: a retry must not await it again
        deadline = time.monotonic() + self._retry_seconds
        wait = 0.1
        while True:
            try:
                if self._proc is None:
                    return await asyncio.get_running_loop().run_in_executor(
                        self._thread, _run_coroutine, _INVOKE_ONCE(self, comp, arg))
                if getattr(comp, _KEEPS_STATE, False):
                    return await self._invoke_keeping_state(comp, arg)
                return await _INVOKE_ONCE(self, comp, arg)
            except (executors_errors.RetryableError, grpc.RpcError) as e:
                retryable = isinstance(e, executors_errors.RetryableError)
                if self._proc is not None:
                    try:
                        self._check_alive(_EXIT_GRACE_SECONDS if retryable else 0.0)
                    except LocalWorkerDied as died:
                        raise died from e
                    if not retryable:
                        raise
                if not retryable or time.monotonic() > deadline:
                    raise WorkerLost(self.address, e) from e
                await asyncio.sleep(wait)
                wait = min(2 * wait, 2.0)

    async def _invoke_keeping_state(self, comp, arg):
        """TFF's invoke (without its retries) of a `keep_state_in_worker` computation on our local worker.

        The state it returns is also kept in the worker (a selection of the
        result); if the next call passes that same state object, unchanged
        (`_KeptState.unchanged`), the kept copy is used instead of sending the
        state again.
        """
        kept, self._kept = self._kept, None
        elements = structure.to_elements(arg)
        state = elements[0][1]
        if self._transform_args is not None:  # as TFF's invoke: a Struct argument is normalized and transformed
            args, kwargs = function_utils.unpack_args_from_struct(arg)
            args = self._transform_args(tree.traverse(_struct_to_python, args))
            kwargs = self._transform_args(tree.traverse(_struct_to_python, kwargs))
            arg = function_utils.pack_args_into_struct(args, kwargs)
        result_type = comp.type_signature.result
        comp = self._compiler_pipeline.compile(comp)
        cardinalities = self._cardinality_inference_fn(arg, comp.type_signature.parameter)
        with self._reset_factory_on_error(self._executor_factory, cardinalities) as executor:
            if kept is not None and kept.executor is executor and kept.unchanged(state):
                arg = structure.Struct([(elements[0][0], kept.remote), *list(structure.iter_elements(arg))[1:]])
            arg = await async_execution_context._ingest(executor, arg, comp.type_signature.parameter)  # noqa: SLF001
            call = await executor.create_call(await executor.create_value(comp, comp.type_signature), arg)
            remote_state = await executor.create_selection(call, 0)
            result = type_conversions.type_to_py_container(await call.compute(), result_type)
            if self._transform_result is not None:
                result = self._transform_result(result)
            self._kept = _KeptState(result[0], remote_state, executor)
            return result


def _struct_to_python(obj):
    return structure.to_odict_or_tuple(obj) if isinstance(obj, structure.Struct) else None


_KEEPS_STATE = "_dpfl_tff_keeps_state"


def keep_state_in_worker(comp) -> None:
    """Marks `comp`, a `(state, data) -> (state, ...)` computation such as a LearningProcess's `next`.

    On our local worker (`local_context`), a marked computation's returned
    state also stays in the worker; a following call of it with that same
    state object, unchanged, uses the worker's copy instead of sending the
    state again (0.8 MB for the MLP, ~4 ms per round here). The state is
    still returned in full: the caller's copy is the state, checkpoints and
    failures see it as before. Its arrays are made read-only, so that it
    cannot change in place unnoticed (a changed state, a new one or a leaf
    replaced, is sent as before). Elsewhere (remote workers) the mark does
    nothing.
    """
    setattr(comp, _KEEPS_STATE, True)


class _KeptState:
    """A state returned by a `keep_state_in_worker` computation and the worker's copy of it."""

    def __init__(self, state, remote, executor):
        self.state, self.remote, self.executor = state, remote, executor
        self.leaves = tree.flatten(state)
        for leaf in self.leaves:
            if isinstance(leaf, np.ndarray):
                leaf.flags.writeable = False

    def unchanged(self, state) -> bool:
        """Whether `state` is the kept object, with the same leaves, none of them made writable again."""
        if state is not self.state:
            return False
        leaves = tree.flatten(state)
        return len(leaves) == len(self.leaves) and all(
            a is b and not (isinstance(a, np.ndarray) and a.flags.writeable) for a, b in zip(leaves, self.leaves))


class _SyncWorkerContext(sync_execution_context.SyncExecutionContext):
    """TFF's sync context over a `_WorkerContext` instead of its forever-retrying async context."""

    def __init__(self, worker_context: _WorkerContext):
        super().__init__(
            executor_fn=worker_context.executor_factory,
            compiler_fn=native_compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._async_context = worker_context  # what SyncExecutionContext.invoke runs


class WorkersUnreachable(RuntimeError):
    """Some `--workers` addresses did not answer before training."""


class WorkersRefused(WorkersUnreachable):
    """A `--workers` address answered, but the TLS handshake failed: the two sides hold different credentials."""


def check_reachable(
    addresses: list[str], timeout: float, credential: worker_auth.Credential | None = None
) -> list[remote_executor_grpc_stub.RemoteExecutorGrpcStub]:
    """Connects to every address; raises naming all that do not answer within `timeout` seconds.

    Each address is first probed by one connection of our own
    (`worker_auth.probe` with `credential`, else `worker_auth.probe_insecure`),
    so that a worker holding another credential, or none, is named with the
    reason at once instead of gRPC's retrying it silently until the timeout.

    Args:
      addresses: `host:port` of each worker.
      timeout: seconds to wait for all of them.
      credential: the driver's credential (mutual TLS), or None for workers
        started with `--insecure_workers`.

    Returns:
      One stub per address, in order.

    Raises:
      WorkersRefused: a worker and this driver do not hold the same credential.
      WorkersUnreachable: some addresses did not answer.
    """
    deadline = time.monotonic() + timeout
    pending = list(addresses)
    while pending:
        for a in list(pending):
            wait = max(0.2, min(2.0, deadline - time.monotonic()))
            try:
                up = worker_auth.probe(a, credential, wait) if credential else worker_auth.probe_insecure(a, wait)
            except worker_auth.Refused as e:
                raise WorkersRefused(f"--workers: {e}") from None
            if up:
                pending.remove(a)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if credential is None:
        channels = [grpc.insecure_channel(a, GRPC_CHANNEL_OPTIONS) for a in addresses]
    else:
        channels = [worker_auth.secure_channel(a, credential, GRPC_CHANNEL_OPTIONS) for a in addresses]
    stubs = [remote_executor_grpc_stub.RemoteExecutorGrpcStub(c) for c in channels]
    while not pending and not all(s.is_ready for s in stubs) and time.monotonic() < deadline:
        time.sleep(0.05)
    down = pending or [a for a, s in zip(addresses, stubs) if not s.is_ready]
    if down:
        for c in channels:
            _close_unready_channel(c)
        raise WorkersUnreachable(
            f"--workers: TFF worker(s) not reachable after {timeout:g} s: {', '.join(down)} "
            "(start one per address with `uv run python -m experiments.run_worker --port=PORT`, or raise "
            "--worker_timeout)"
        )
    return stubs


@contextlib.contextmanager
def remote_context(
    addresses: list[str], timeout: float = 30.0, credential: worker_auth.Credential | None = None
) -> Iterator[None]:
    """Runs TFF computations on remote worker services for the `with` block.

    Every computation is compiled to TFF's mergeable form
    (`compile_to_mergeable_comp_form`): the clients of a call are split into
    one subround per worker, each worker runs the client work and the
    aggregation up to the merge of partial aggregates, and the merge and
    everything after it (for central DP: the noise, added once to the merged
    sum, and the server update) run once. A computation with a dependent
    second aggregation cannot be split and fails to compile.

    The workers are not ours: they are neither started nor stopped here.

    Args:
      addresses: `host:port` of each worker (`experiments.run_worker`).
      timeout: seconds to wait for every worker before starting, and how long
        a subround keeps retrying a worker that stopped answering before the
        call fails with `WorkerLost` naming it.
      credential: the driver's credential (`worker_auth.load(dir, "driver")`):
        every channel is mutual TLS with workers started with the same
        credential. None: workers started with `--insecure_workers`
        (unauthenticated, unencrypted); one warning line on stderr says so.

    Raises:
      WorkersRefused: a worker holds another credential, or none.
      WorkersUnreachable: a worker is not reachable within `timeout`.
    """
    install()
    if credential is None:
        _warn(f"WARNING: --insecure_workers: {', '.join(addresses)}: unauthenticated and unencrypted; anyone who "
              "can reach these ports can run code there and read the data sent (docs/several-machines.md "
              "\"Security\")")
    stubs = check_reachable(list(addresses), timeout, credential)
    contexts = [_WorkerContext(a, s, timeout) for a, s in zip(addresses, stubs)]
    stack = context_stack_impl.context_stack
    previous = stack.current
    stack.set_default_context(
        mergeable_comp_execution_context.MergeableCompExecutionContext(
            async_contexts=contexts,
            compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
        )  # as tff.backends.native.create_mergeable_comp_execution_context builds it
    )
    try:
        yield
    finally:
        stack.set_default_context(previous)
        for s in stubs:  # first: a call still waiting on a frozen worker is cancelled, so its thread ends
            s._channel.close()  # noqa: SLF001  (the stub owns no close())
        for c in contexts:
            c.shutdown()


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _LocalWorker:
    """Our private local worker: started at once, connected (`connect`) when first needed."""

    def __init__(self, log: IO | None, log_path: str | None, startup_timeout: float, retry_seconds: float,
                 warn: Callable[[str], None]):
        self.log, self.log_path, self.warn = log, log_path, warn
        self.startup_timeout, self.retry_seconds = startup_timeout, retry_seconds
        self.proc, self.port = start_worker(log=log, loopback_only=True)
        self.address = f"localhost:{self.port}"
        self.channel: grpc.Channel | None = None
        self.context: _SyncWorkerContext | None = None

    def connect(self) -> _SyncWorkerContext:
        """Waits until the worker answers (restarting it once without the loopback redirection if that failed)."""
        if self.context is not None:
            return self.context
        try:
            self.address, self.channel, stub = _connect(self.proc, self.port, self.startup_timeout)
            reason = loopback_status(self.proc)
        except RuntimeError as e:
            binder = _binders.get(self.proc)
            if not isinstance(binder, _LoopbackBinder) or binder.bound:
                raise
            # The redirection itself failed (the worker could not bind): once more, as TFF starts it.
            reason = f"{binder.failure or 'the worker could not bind'}; {e}"
            stop_worker(self.proc)
            self.proc, self.port = start_worker(log=self.log)
            self.address, self.channel, stub = _connect(self.proc, self.port, self.startup_timeout)
        if reason is not None:
            line = (
                f"WARNING: local TFF worker: pid {self.proc.pid}, port {self.port} (listens on all interfaces, "
                f"unauthenticated: could not restrict it to loopback: {reason}; see docs/several-machines.md "
                "\"Security\")"
            )
            self.warn(line)
            if self.log is not None:
                os.write(self.log.fileno(), f"dpfl_tff: {line}\n".encode())
        self.context = _SyncWorkerContext(
            _WorkerContext(self.address, stub, self.retry_seconds, proc=self.proc, log_path=self.log_path))
        return self.context

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        stop_worker(self.proc)


class _StartingWorkerContext(context_base.SyncContext):
    """The context of a `local_context(wait=False)` block: its first call waits for the worker, then runs there."""

    def __init__(self, worker: _LocalWorker):
        self._worker = worker

    @property
    def executor_factory(self):
        return self._worker.connect().executor_factory

    def invoke(self, comp, arg):
        return self._worker.connect().invoke(comp, arg)


@contextlib.contextmanager
def local_context(
    log_path: str | None = None,
    startup_timeout: float = 60.0,
    retry_seconds: float = 30.0,
    warn: Callable[[str], None] = _warn,
    wait: bool = True,
) -> Iterator[None]:
    """Runs TFF computations on a private local worker for the `with` block.

    The worker listens on loopback only (`start_worker(loopback_only=True)`).
    Where this machine does not allow that, it listens on all interfaces, as
    TFF's worker does, and one line through `warn` (stderr by default, and the
    worker log) gives its pid, its port and the reason.

    A call that fails because the worker died raises `LocalWorkerDied` (a
    `WorkerLost`) at once, with the worker's exit status, and so does the next
    call if it died between calls; a live worker that keeps answering
    UNAVAILABLE fails the call with `WorkerLost` after `retry_seconds`.

    Args:
      log_path: file that receives the worker's output (appended); /dev/null
        when None.
      startup_timeout: seconds to wait for the worker to answer.
      retry_seconds: how long a call retries a live worker that does not answer.
      warn: receives the line saying the worker listens on all interfaces.
      wait: wait on entry until the worker answers. False: the block starts
        while the worker is still starting (about 1 s here), and the first TFF
        call waits for it (and raises what entering would have raised); a run
        builds its computations meanwhile.

    Yields:
      Nothing; TFF computations invoked inside the block use the worker.
    """
    install()
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115
    worker = None
    stack = context_stack_impl.context_stack
    previous = stack.current
    try:
        worker = _LocalWorker(log, log_path, startup_timeout, retry_seconds, warn)
        stack.set_default_context(worker.connect() if wait else _StartingWorkerContext(worker))
        _active_local.append(worker)
        try:
            yield
        finally:
            _active_local.pop()
    finally:
        stack.set_default_context(previous)
        if worker is not None:
            worker.close()
        if log is not None:
            log.close()


def _connect(
    proc: subprocess.Popen, port: int, timeout: float
) -> tuple[str, grpc.Channel, remote_executor_grpc_stub.RemoteExecutorGrpcStub]:
    """A channel and stub to our worker on `port`, once it answers (else RuntimeError)."""
    address = f"localhost:{port}"
    channel = grpc.insecure_channel(address, GRPC_CHANNEL_OPTIONS)
    try:
        stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
        wait_until_ready(stub, address, timeout, proc)
    except BaseException:
        _close_unready_channel(channel)
        raise
    return address, channel, stub


def _close_unready_channel(channel: grpc.Channel) -> None:
    """Closes a channel that never connected once its connectivity-polling thread has stopped.

    Closed while that thread still tries to connect, the thread dies with "Cannot monitor channel state:
    Channel closed!" and a traceback on stderr. It stops within ~0.2 s once nothing is subscribed.
    """
    state = getattr(channel, "_connectivity_state", None)
    if state is not None and hasattr(channel, "_unsubscribe_all"):
        channel._unsubscribe_all()  # noqa: SLF001
        deadline = time.monotonic() + 1.0
        while state.polling and time.monotonic() < deadline:
            time.sleep(0.01)
    channel.close()


def execution_context(
    workers: tuple[str, ...] | list[str], log_path: str | None = None, timeout: float = 30.0,
    credential: worker_auth.Credential | None = None,
) -> contextlib.AbstractContextManager[None]:
    """The context a run executes in.

    `remote_context(workers, timeout, credential)` if workers are given. Otherwise, inside
    an enclosing `local_context()` (a sweep, a notebook, a test session), that
    context's worker is used, `log_path` gets one line naming it, and on
    leaving the block the worker's values of the block are cleared (its
    executors closed: a shared worker does not grow run by run); else a new
    `local_context(log_path, wait=False)`: the worker starts while the run
    builds its computations, and the first call waits for it.
    """
    if workers:
        return remote_context(list(workers), timeout, credential)
    if _active_local:
        return _reuse_local(log_path)
    return local_context(log_path=log_path, wait=False)


@contextlib.contextmanager
def _reuse_local(log_path: str | None) -> Iterator[None]:
    worker = _active_local[-1]
    worker.connect()  # its final pid and address (a restart without the loopback redirection changes them)
    proc = worker.proc
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"dpfl_tff: this run used the TFF worker of an enclosing runtime.local_context() (pid "
                    f"{proc.pid}, {worker.address}); its output goes to {worker.log_path or '/dev/null'}\n")
    try:
        yield
    finally:  # the shared worker forgets this run's values: a sweep's worker does not grow run by run
        factory = getattr(context_stack_impl.context_stack.current, "executor_factory", None)
        if isinstance(factory, _ExecutorFactory) and proc.poll() is None:
            try:
                factory.close_all()
            except (grpc.RpcError, executors_errors.RetryableError) as e:  # a worker that stopped answering
                _warn(f"WARNING: could not clear the shared TFF worker's values after the run: {_grpc_reason(e)}")


def live_worker_pids() -> list[int]:
    """Pids of workers started by this process that are still running."""
    return [p.pid for p in _live_workers if p.poll() is None]
