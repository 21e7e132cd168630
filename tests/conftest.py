"""Shared fixtures; the session fails if any TFF worker process survives it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def worker_pids() -> list[int]:
    """Pids of all running TFF `worker_binary` processes on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0]
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd.endswith(b"worker_binary") and state != b"Z":
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def tff_context():
    """A private TFF worker for tests that run TFF computations directly."""
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
