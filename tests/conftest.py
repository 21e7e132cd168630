"""Shared fixtures; the session fails if any TFF worker process it started survives it."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Every process this session starts (drivers, their TFF workers, run_worker services) inherits this
# marker, so that the checks below see this session's workers only, never another run's on the machine.
SESSION_MARKER = f"DPFL_TFF_TEST_SESSION={uuid.uuid4().hex}".encode()
os.environ["DPFL_TFF_TEST_SESSION"] = SESSION_MARKER.split(b"=", 1)[1].decode()


def worker_pids() -> list[int]:
    """Pids of the running TFF `worker_binary` processes started by this test session."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0]
            if not cmd.endswith(b"worker_binary"):
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                ours = SESSION_MARKER in f.read().split(b"\0")
        except OSError:
            continue
        if ours and state != b"Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def own_signals():
    """A driver run in this process installs SIGINT/SIGTERM handlers: pytest's are restored afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session", autouse=True)
def tff_context():
    """One private TFF worker for the whole session (per xdist worker: pyproject's `-n 2` runs two):
    TFF computations and in-process runs (`training.run` reuses an enclosing local context) share it
    instead of starting their own."""
    from dpfl_tff import runtime

    with runtime.local_context():
        yield


def pytest_sessionfinish(session, exitstatus):
    import time

    deadline = time.monotonic() + 10
    left = worker_pids()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = worker_pids()
    if left:
        print(f"\nFAIL: TFF worker_binary processes left running after the tests: {left}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def run_app(app, name: str, args: list[str]) -> int:
    """An absl driver module's `main` in this process (the session's worker): its exit code.

    `args` are the flags; the parsed flags are restored afterwards.
    """
    from absl import flags
    from absl.testing import flagsaver

    argv = [name, *args]
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        try:
            app.main(argv[:1])
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def run_driver(args: list[str]) -> int:
    """`experiments.run_federated` in this process (no TF import, the session's worker): its exit code."""
    from experiments import run_federated

    return run_app(run_federated, "run_federated", args)
