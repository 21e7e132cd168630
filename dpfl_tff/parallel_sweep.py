"""A sweep's runs trained P at a time: P copies of the sweep command, each with its share of the runs, pinned.

`experiments.sweep --parallel=P` starts P copies of its own command line
(`spawn`), copy i (0-based) with `DPFL_SWEEP_SHARD=i/P` in its environment:
it trains runs i, i+P, i+2P, ... of the sweep (`share`), one after another
with its own local TFF worker, as a sweep with --parallel=1 does (resumable,
skipping a run another process holds). Before it starts, copy i is pinned to
cores i, i+P, ... of those this process may use (`cores_of`); its TFF worker
inherits the affinity, so TensorFlow sizes its thread pools to them. The
copies run in their own sessions: a terminal's Ctrl-C reaches only this
process, which forwards each SIGINT / SIGTERM once to every copy (`wait`):
the first stops every run after its current round, a second cuts the rounds
short, as for one run. A copy gets SIGTERM if this process dies.

No TensorFlow here: the parent only waits and writes the tables.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

SHARD_ENV = "DPFL_SWEEP_SHARD"
_PR_SET_PDEATHSIG = 1


def usable_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cores_of(index: int, parallel: int, cores: Sequence[int]) -> tuple[int, ...]:
    """The cores copy `index` of `parallel` is pinned to: every `parallel`-th of `cores`, from the `index`-th."""
    if not 1 <= parallel <= len(cores) or not 0 <= index < parallel:
        raise ValueError(f"copy {index} of {parallel} on {len(cores)} cores")
    return tuple(cores[index::parallel])


def shard() -> tuple[int, int] | None:
    """(i, P) when this process is copy i of a --parallel=P sweep (`DPFL_SWEEP_SHARD=i/P`), else None."""
    text = os.environ.get(SHARD_ENV)
    if not text:
        return None
    try:
        i, p = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"{SHARD_ENV}={text!r}: expected i/P with 0 <= i < P") from None
    if not 0 <= i < p:
        raise ValueError(f"{SHARD_ENV}={text!r}: expected i/P with 0 <= i < P")
    return i, p


def share(runs: Sequence, index: int, parallel: int) -> list:
    """The runs copy `index` of `parallel` trains: runs index, index+parallel, ..."""
    return list(runs[index::parallel])


def exit_code(codes: Sequence[int]) -> int:
    """The sweep's exit code from its copies': a stop (128+signal) first, then 1 (a round failed), 2, else 0."""
    stops = [c for c in codes if c > 128]
    if stops:
        return stops[0]
    for c in (1, 2):
        if c in codes:
            return c
    return next((c for c in codes if c != 0), 0)


def _child_setup(cpus: tuple[int, ...]) -> None:  # runs in the copy between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.sched_setaffinity(0, cpus)


def spawn(argv: Sequence[str], parallel: int, cores: Sequence[int]) -> list[subprocess.Popen]:
    """Starts the `parallel` copies of `python -m experiments.sweep argv` (see the module docstring)."""
    procs = []
    for i in range(parallel):
        env = dict(os.environ, **{SHARD_ENV: f"{i}/{parallel}"})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.sweep", *argv], env=env, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=lambda cpus=cores_of(i, parallel, cores): _child_setup(cpus)))
    return procs


def wait(procs: Sequence[subprocess.Popen], log: Callable[[str], None]) -> list[int]:
    """Waits for every copy, forwarding each SIGINT / SIGTERM this process gets to those still running.

    Returns:
      Their exit codes (a copy killed by signal s: 128 + s).
    """
    received: list[int] = []

    def forward(signum, frame):
        del frame
        received.append(signum)
        name = signal.Signals(signum).name
        again = " again: cutting the current rounds short" if len(received) > 1 else \
            ": every run stops after its current round"
        log(f"{name} received{again}")
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
