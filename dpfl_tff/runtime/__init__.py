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

The package, one module per job (the public names are re-exported here):

  tff_internals.py     the private TFF modules used, behind a TFF version check
  worker_process.py    the local worker process: start (pinned, tied to us), stop, reap
  loopback_binding.py  the seccomp bind() redirector that keeps the local worker on loopback
  worker_calls.py      watched, abandonable calls to workers; the errors of a lost worker
  executor_cache.py    the remote executor with its value caches, compilation by identity, kept and resident state
  contexts.py          install(), local_context(), remote_context(), execution_context()
"""

from __future__ import annotations

from dpfl_tff.runtime.contexts import (
    WorkersRefused,
    WorkersUnreachable,
    check_reachable,
    execution_context,
    install,
    live_worker_pids,
    local_context,
    remote_context,
)
from dpfl_tff.runtime.executor_cache import (
    ResidentState, StateLost, fetch_state, keep_state_in_worker, states_in_worker)
from dpfl_tff.runtime.tff_internals import SUPPORTED_TFF_VERSIONS
from dpfl_tff.runtime.worker_calls import LocalWorkerDied, WorkerLost, WorkerStalled, abort_calls, calls_in_flight
from dpfl_tff.runtime.worker_process import (
    GRPC_CHANNEL_OPTIONS,
    WORKER_BINARY,
    WORKER_MALLOC_ARENA_MAX,
    exit_status,
    loopback_status,
    start_worker,
    stop_worker,
    wait_until_ready,
)

__all__ = [
    "GRPC_CHANNEL_OPTIONS", "LocalWorkerDied", "ResidentState", "SUPPORTED_TFF_VERSIONS", "StateLost", "WORKER_BINARY",
    "WORKER_MALLOC_ARENA_MAX", "WorkerLost", "WorkerStalled", "WorkersRefused", "WorkersUnreachable", "abort_calls",
    "calls_in_flight", "check_reachable", "execution_context", "exit_status", "fetch_state", "install",
    "keep_state_in_worker", "live_worker_pids", "local_context", "loopback_status", "remote_context", "start_worker",
    "states_in_worker", "stop_worker", "wait_until_ready",
]
