"""Serves a TFF worker (the C++ executor service in the TFF wheel) for `run_federated --workers`.

  uv run python -m experiments.run_worker --make_credentials=creds     # once per experiment
  uv run python -m experiments.run_worker --port=8000 --worker_credentials=creds/worker

A TFF worker runs whatever computation it is sent. With --worker_credentials
the port (all interfaces) is a mutual-TLS front (`dpfl_tff.worker_auth`): only
a driver presenting the driver certificate of the same credential
(`run_federated --worker_credentials=creds/driver`) gets through, to the TFF
worker, which listens on 127.0.0.1 only; every refused connection prints one
line on stderr. With --insecure_workers instead, the TFF worker itself listens
on all interfaces, unauthenticated, as TFF's does, and a warning says so. The
worker holds no experiment state, so a driver can resume on a restarted worker. SIGTERM or SIGINT stops it and exits 0; if the
worker process dies by itself this exits 1. The worker is tied to this process:
if this process is killed, even by SIGKILL, the kernel kills the worker too.
Exit codes: 0 stopped by a signal (or credentials made), 1 the worker died or
could not be restricted to loopback, 2 bad flags, a bad credential or port busy.
"""

from __future__ import annotations

import signal
import socket
import sys
import time

from absl import flags

from dpfl_tff import config
from experiments import cli

PORT = flags.DEFINE_integer("port", None, "TCP port (1..65535) to listen on, on all interfaces.")
# Shared with run_federated: one definition, the configuration field's (`dpfl_tff.config`).
_SHARED = dict(config.flag_fields(config.ExperimentConfig))
CREDENTIALS = cli.define_once(flags.DEFINE_string, "worker_credentials", _SHARED["worker_credentials"].default,
                              _SHARED["worker_credentials"].metadata["help"], __name__)
INSECURE = cli.define_once(flags.DEFINE_bool, "insecure_workers", _SHARED["insecure_workers"].default,
                           _SHARED["insecure_workers"].metadata["help"], __name__)
MAKE_CREDENTIALS = flags.DEFINE_string(
    "make_credentials", None,
    "Write a new credential to this folder (new or empty) and exit: DIR/worker for every run_worker, "
    "DIR/driver for run_federated --worker_credentials (a fresh CA whose key is not kept; ECDSA P-256, "
    "valid 365 days).",
)
MAX_CONCURRENT_CALLS = flags.DEFINE_integer(
    "max_concurrent_computation_calls",
    -1,
    "Most computation calls the worker runs at once (>= 1), or -1 for no limit.",
)
STARTUP_TIMEOUT = flags.DEFINE_float(
    "startup_timeout", 60.0, "Seconds (> 0) to wait for the worker to answer before giving up."
)


def _error(msg: str) -> None:
    cli.usage_error(msg)


def _port_is_free(port: int) -> bool:
    """Whether `port` can be bound on all interfaces (IPv6 if the machine has it, else IPv4)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # this address family is not available here
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed port (TIME_WAIT) is free
            try:
                sock.bind((host, port))
            except OSError:
                return False
        return True
    return True


def _make_credentials(directory: str) -> None:
    from dpfl_tff import worker_auth

    try:
        worker, driver = worker_auth.make_credentials(directory)
    except OSError as e:  # FileExistsError included
        _error(str(e) if isinstance(e, FileExistsError) else f"--make_credentials={directory}: {e}")
    print(f"credential written to {directory}: copy {worker} to every worker machine "
          f"(run_worker --worker_credentials={worker}) and keep {driver} on the driver's "
          f"(run_federated --worker_credentials={driver}); key.pem files are secret", flush=True)


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    if MAKE_CREDENTIALS.value is not None:
        _make_credentials(MAKE_CREDENTIALS.value)
        return
    port = PORT.value
    if port is None or not 1 <= port <= 65535:
        _error(f"--port={port}: give the TCP port to listen on, in 1..65535")
    if MAX_CONCURRENT_CALLS.value == 0 or MAX_CONCURRENT_CALLS.value < -1:
        _error(f"--max_concurrent_computation_calls={MAX_CONCURRENT_CALLS.value}: must be >= 1, or -1 for no limit")
    if not STARTUP_TIMEOUT.value > 0:
        _error(f"--startup_timeout={STARTUP_TIMEOUT.value}: must be > 0 seconds")
    if CREDENTIALS.value and INSECURE.value:
        _error(f"--worker_credentials={CREDENTIALS.value} with --insecure_workers: give one of them")
    if not CREDENTIALS.value and not INSECURE.value:
        _error("--worker_credentials is missing: give the worker's credential (make one with "
               "--make_credentials=DIR, then --worker_credentials=DIR/worker), or --insecure_workers to serve "
               "anyone who can reach the port")
    credential = front_socket = None
    if CREDENTIALS.value:
        from dpfl_tff import worker_auth

        try:
            credential = worker_auth.load(CREDENTIALS.value, "worker")
        except worker_auth.CredentialError as e:
            _error(str(e))
        try:
            front_socket = worker_auth.bound_socket(port)
        except OSError:
            _error(f"--port={port}: the port is in use; choose another")
    elif not _port_is_free(port):
        _error(f"--port={port}: the port is in use; choose another")

    received: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import grpc  # late: the flags are checked before TFF's slow import

    from dpfl_tff import runtime
    from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if credential is None:
        log(f"WARNING: --insecure_workers: this TFF worker on port {port} (all interfaces) runs any computation "
            "anyone who can reach the port sends it, as this user, unencrypted; see docs/several-machines.md "
            "\"Security\"")
        proc, worker_port = runtime.start_worker(
            port=port, log=sys.stderr, max_concurrent_computation_calls=MAX_CONCURRENT_CALLS.value)
    else:
        proc, worker_port = runtime.start_worker(
            log=sys.stderr, max_concurrent_computation_calls=MAX_CONCURRENT_CALLS.value, loopback_only=True)
    address = f"localhost:{worker_port}"
    channel = grpc.insecure_channel(address, runtime.GRPC_CHANNEL_OPTIONS)
    try:
        runtime.wait_until_ready(remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel), address, STARTUP_TIMEOUT.value, proc)
    except RuntimeError as e:
        runtime.stop_worker(proc)
        log(f"error: {e}")
        sys.exit(1)
    finally:
        channel.close()
    front = None
    if credential is not None:
        reason = runtime.loopback_status(proc)
        if reason is not None:
            runtime.stop_worker(proc)
            log(f"error: the TFF worker could not be restricted to loopback ({reason}), so --worker_credentials "
                "could be bypassed; nothing is served. Use --insecure_workers only on a private network")
            sys.exit(1)
        front = worker_auth.TlsFront(front_socket, worker_port, credential, log)
        print(
            f"TFF worker listening on {socket.getfqdn()}:{port} (all interfaces, mutual TLS: only drivers holding "
            f"the driver credential of {CREDENTIALS.value}; TFF worker pid {proc.pid} on 127.0.0.1:{worker_port}); "
            f"use --workers=HOST:{port}; SIGTERM or Ctrl-C stops it",
            flush=True,
        )
    else:
        print(
            f"TFF worker listening on {socket.getfqdn()}:{port} (all interfaces, unauthenticated: "
            f"--insecure_workers; pid {proc.pid}); use --workers=HOST:{port} --insecure_workers; SIGTERM or "
            "Ctrl-C stops it",
            flush=True,
        )
    while not received and proc.poll() is None:
        time.sleep(0.2)
    if front is not None:
        front.close()
    if received:
        runtime.stop_worker(proc)
        print(f"stopped by {signal.Signals(received[0]).name}: worker on port {port} shut down", flush=True)
        sys.exit(0)
    log(f"error: the TFF worker on port {port} exited with code {proc.returncode}")
    sys.exit(1)


GROUPS = (("run_worker", (PORT, CREDENTIALS, INSECURE, MAKE_CREDENTIALS, MAX_CONCURRENT_CALLS, STARTUP_TIMEOUT)),)


def run() -> None:
    cli.run(main, __doc__, GROUPS)


if __name__ == "__main__":
    run()
