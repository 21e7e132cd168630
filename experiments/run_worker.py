"""Serves a TFF worker (the C++ executor service in the TFF wheel) for `run_federated --workers`.

  uv run python -m experiments.run_worker --port=8000

The worker listens on all interfaces (`[::]:PORT`). It runs whatever
computations a driver sends it; it holds no experiment state, so a driver can
resume on a restarted worker. SIGTERM or SIGINT stops it and exits 0; if the
worker process dies by itself this exits 1. The worker is tied to this process:
if this process is killed, even by SIGKILL, the kernel kills the worker too.
Exit codes: 0 stopped by a signal, 1 the worker died, 2 bad flags or port busy.
"""

from __future__ import annotations

import signal
import socket
import sys
import time

from absl import flags

from experiments import cli

PORT = flags.DEFINE_integer("port", None, "TCP port (1..65535) to listen on, on all interfaces.")
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


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    port = PORT.value
    if port is None or not 1 <= port <= 65535:
        _error(f"--port={port}: give the TCP port to listen on, in 1..65535")
    if MAX_CONCURRENT_CALLS.value == 0 or MAX_CONCURRENT_CALLS.value < -1:
        _error(f"--max_concurrent_computation_calls={MAX_CONCURRENT_CALLS.value}: must be >= 1, or -1 for no limit")
    if not STARTUP_TIMEOUT.value > 0:
        _error(f"--startup_timeout={STARTUP_TIMEOUT.value}: must be > 0 seconds")
    if not _port_is_free(port):
        _error(f"--port={port}: the port is in use; choose another")

    received: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import grpc  # late: the flags are checked before TFF's slow import

    from dpfl_tff import runtime
    from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub

    proc, _ = runtime.start_worker(port=port, log=sys.stderr, max_concurrent_computation_calls=MAX_CONCURRENT_CALLS.value)
    address = f"localhost:{port}"
    channel = grpc.insecure_channel(address, runtime.GRPC_CHANNEL_OPTIONS)
    try:
        runtime.wait_until_ready(remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel), address, STARTUP_TIMEOUT.value, proc)
    except RuntimeError as e:
        runtime.stop_worker(proc)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        channel.close()
    print(
        f"TFF worker listening on {socket.getfqdn()}:{port} (all interfaces, pid {proc.pid}); "
        f"use --workers=HOST:{port}; SIGTERM or Ctrl-C stops it",
        flush=True,
    )
    while not received and proc.poll() is None:
        time.sleep(0.2)
    if received:
        runtime.stop_worker(proc)
        print(f"stopped by {signal.Signals(received[0]).name}: worker on port {port} shut down", flush=True)
        sys.exit(0)
    print(f"error: the TFF worker on port {port} exited with code {proc.returncode}", file=sys.stderr, flush=True)
    sys.exit(1)


GROUPS = (("run_worker", (PORT, MAX_CONCURRENT_CALLS, STARTUP_TIMEOUT)),)


def run() -> None:
    cli.run(main, __doc__, GROUPS)


if __name__ == "__main__":
    run()
