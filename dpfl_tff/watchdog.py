"""No silent stall: a call to a TFF worker that gives no answer for the stall limit ends the run.

A worker that freezes (SIGSTOP, a frozen machine, a network partition without
a reset) leaves its caller waiting forever: TFF's gRPC calls have no deadline,
and the frozen peer's kernel keeps the connection open. `Watchdog` is a
daemon thread beside the round loop; twice a second it reads the calls now
waiting on a worker (`runtime.calls_in_flight`), and

* when one has waited the stall limit (`stall_limit`: --stall_seconds, or
  max(60 s, 20x the median round of this process), and at least 600 s until
  the first round of this process, which traces and compiles, has ended), it
  abandons them (`runtime.abort_calls`: our local worker is killed by pid, the
  channel to a remote one is closed): the round's call raises
  `runtime.WorkerStalled`, naming the worker and how long it was silent; the
  loop checkpoints the last completed round and fails the round (exit 1);
* while one waits longer than a quarter of the limit, it prints one line per
  quarter in place of the progress line's stale ETA,
  `round 34/60 | no answer for 45 s from local TFF worker localhost:PORT (pid N) | stall limit 60 s`;
* when a stop was requested (SIGTERM, SIGINT) and a call still waits
  `grace` seconds later (--stop_grace_seconds), it first lets the loop fetch
  the last completed round's state, which stays in the local worker
  (`before_stop_abandon`, answered within `FETCH_SECONDS` by a worker that is
  only busy), then abandons the calls the same way (unless they ended
  meanwhile) and keeps the stop request (`stop`): the loop raises it instead
  of the round's error (the checkpoint of the last completed round, exit
  128+signal).

The limit is about one call's answer, not a round's length: the round's
longest call (the worker computing the cohort's updates) is nearly all of it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence

from dpfl_tff import runtime

FIRST_ROUND_SECONDS = 600.0  # the least the first round of a process gets: it traces and compiles
FLOOR_SECONDS = 60.0
MEDIAN_FACTOR = 20
FETCH_SECONDS = 5.0  # how long a stop's abandonment waits for the last completed round's state from the worker
_WINDOW = 100  # the median is over the last rounds of this process, so the limit follows a run that slows down


def stall_limit(round_seconds: Sequence[float], configured: float | None) -> tuple[float, str]:
    """The stall limit of the next call, in seconds, and where it comes from.

    Args:
      round_seconds: the durations of the rounds this process completed after
        its first (which traces and compiles); empty until then.
      configured: --stall_seconds, or None.

    Returns:
      (limit, why): FIRST_ROUND_SECONDS (or `configured` if larger) until a
      round after the first has ended; then `configured`, or
      max(FLOOR_SECONDS, MEDIAN_FACTOR x the median of the last rounds).
    """
    if not round_seconds:
        if configured is not None and configured > FIRST_ROUND_SECONDS:
            return configured, "--stall_seconds"
        return FIRST_ROUND_SECONDS, f"at least {FIRST_ROUND_SECONDS:.0f} s until this process' first round has ended"
    if configured is not None:
        return configured, "--stall_seconds"
    median = statistics.median(round_seconds[-_WINDOW:])
    limit = max(FLOOR_SECONDS, MEDIAN_FACTOR * median)
    return limit, (f"max({FLOOR_SECONDS:.0f} s, {MEDIAN_FACTOR}x the median round, {median:.2g} s); "
                   "--stall_seconds sets it")


class Watchdog:
    """The stall watchdog of one run's round loop (see the module docstring).

    The loop calls `round_started(r)` before a round's computation and
    `round_ended(seconds)` after it returns; `stop` is the stop request to
    raise once the watchdog abandoned a round for it.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        total_rounds: int,
        configured: float | None,
        grace: float,
        stop_requested: Callable[[], BaseException | None],
        calls: Callable[[], list[tuple[str, float]]] = runtime.calls_in_flight,
        abort: Callable[[str], list[str]] = runtime.abort_calls,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.5,
        before_stop_abandon: Callable[[], None] = lambda: None,
    ):
        self._log, self._total, self._configured, self._grace = log, total_rounds, configured, grace
        self._stop_requested, self._calls, self._abort, self._clock, self._tick = (
            stop_requested, calls, abort, clock, tick)
        self._before_stop_abandon = before_stop_abandon
        self._first_done = False
        self._seconds: list[float] = []
        self._round = 1
        self._warned = 0  # quarters of the limit already reported for the call waiting now
        self._waiting_since: float | None = None  # start of the call the warnings are about
        self._stop_seen: float | None = None  # when the watchdog first saw the stop request
        self._stop_request: BaseException | None = None
        self.stop: BaseException | None = None  # the stop request a round was abandoned for
        self.abandoned: str | None = None  # why calls were abandoned (the stall's, or the stop's, message)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="dpfl_tff_watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def round_started(self, r: int) -> None:
        self._round = r

    def round_ended(self, seconds: float) -> None:
        """A round's computation returned after `seconds` (the first one of the process is not counted)."""
        if self._first_done:
            self._seconds = (self._seconds + [seconds])[-_WINDOW:]
        self._first_done = True

    def limit(self) -> tuple[float, str]:
        return stall_limit(self._seconds, self._configured)

    def _run(self) -> None:
        while not self._closed.wait(self._tick):
            if self.abandoned is not None:
                return
            self.check()

    def check(self) -> None:
        """One look at the calls in flight: warn, or abandon them (a stall, or a stop request past its grace)."""
        now = self._clock()
        if self._stop_seen is None:
            request = self._stop_requested()
            if request is not None:
                self._stop_seen, self._stop_request = now, request
        calls = self._calls()
        if not calls:
            self._waiting_since, self._warned = None, 0
            return
        worker, since = min(calls, key=lambda c: c[1])
        silent = now - since
        limit, why = self.limit()
        if since != self._waiting_since:
            self._waiting_since, self._warned = since, 0
        if silent >= limit:
            self._abandon(f"{worker} gave no answer for {silent:.0f} s (stall limit {limit:g} s: {why})")
        elif self._stop_seen is not None and now - self._stop_seen >= self._grace:
            self._before_stop_abandon()  # the last completed round's state, from a worker still answering
            if not self._calls():
                return  # the round ended meanwhile: the loop stops on its own
            stop = self.stop = self._stop_request
            self._log(f"round {self._round}/{self._total} | {stop}, and the round has not ended "
                      f"{self._grace:g} s later (--stop_grace_seconds): abandoning it (no answer for "
                      f"{silent:.0f} s from {worker})")
            self._abandon(f"{worker}: abandoned {silent:.0f} s into the call: {stop}")
        elif silent >= (self._warned + 1) * limit / 4:
            self._warned = int(silent // (limit / 4))
            self._log(f"round {self._round}/{self._total} | no answer for {silent:.0f} s from {worker} | "
                      f"stall limit {limit:g} s")

    def _abandon(self, message: str) -> None:
        self.abandoned = message
        self._abort(message)
