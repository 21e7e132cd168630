"""The stall watchdog's decisions, on a hand-driven clock and fake calls (no TFF worker), and the watched stub:
a call waiting on a worker is listed, and abandoning it makes it raise WorkerStalled at once."""

from __future__ import annotations

import threading

import pytest

from dpfl_tff import runtime, watchdog


def test_stall_limit_first_round_then_configured_or_derived_from_the_median():
    first, why = watchdog.stall_limit([], None)
    assert first == 600.0 and "first round" in why
    assert watchdog.stall_limit([], 5.0)[0] == 600.0  # tracing and compilation are not a stall
    assert watchdog.stall_limit([], 900.0) == (900.0, "--stall_seconds")
    assert watchdog.stall_limit([0.1, 0.2], 5.0) == (5.0, "--stall_seconds")
    assert watchdog.stall_limit([0.05] * 9, None)[0] == 60.0  # the floor: 20 x 0.05 s = 1 s
    limit, why = watchdog.stall_limit([4.0, 5.0, 100.0], None)  # median 5 s: one slow round does not count
    assert limit == 100.0 and "20x the median round" in why and "--stall_seconds" in why


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _dog(calls, stop=None, configured=8.0, grace=3.0):
    clock, lines, aborted = _Clock(), [], []
    dog = watchdog.Watchdog(lines.append, 50, configured, grace, lambda: stop[0] if stop else None,
                            calls=lambda: list(calls), abort=lambda m: aborted.append(m) or [], clock=clock)
    dog.round_ended(30.0)  # this process' first round: the 600 s minimum no longer applies
    dog.round_ended(0.1)
    dog.round_started(7)
    return dog, clock, lines, aborted


def test_a_call_silent_for_the_limit_is_abandoned_naming_its_worker_after_quarterly_lines():
    w = "local TFF worker localhost:1 (pid 42)"
    calls = [("TFF worker at b:2", 1000.0), (w, 990.0)]  # the one waiting longest is named
    dog, clock, lines, aborted = _dog(calls)
    dog.check()  # waiting 10 s > 8 s already
    assert aborted == [f"{w} gave no answer for 10 s (stall limit 8 s: --stall_seconds)"] == [dog.abandoned]
    assert dog.stop is None

    dog, clock, lines, aborted = _dog([(w, 1000.0)])
    for t in (1.0, 2.5, 4.5, 5.0, 6.5, 7.9):
        clock.now = 1000.0 + t
        dog.check()
    assert aborted == []
    assert lines == [f"round 7/50 | no answer for {s} s from {w} | stall limit 8 s" for s in (2, 4, 6)]
    clock.now = 1008.0
    dog.check()
    assert aborted and aborted[0].startswith(f"{w} gave no answer for 8 s")


def test_calls_that_keep_answering_are_never_abandoned():
    calls = []
    dog, clock, lines, aborted = _dog(calls)
    for i in range(100):  # 100 s of calls of 0.5 s each: the limit is about one call, not the time since the start
        calls[:] = [("w", clock.now)]
        clock.now += 0.5
        dog.check()
        calls[:] = []
        clock.now += 0.5
        dog.check()
    assert aborted == [] and lines == []


def test_a_stop_request_abandons_a_waiting_round_after_the_grace():
    stop = [None]
    calls = [("TFF worker at b:2", 1000.0)]
    dog, clock, lines, aborted = _dog(calls, stop=stop, configured=600.0, grace=3.0)
    dog.check()
    stop[0] = RuntimeError("stopped by SIGTERM")
    clock.now = 1001.0
    dog.check()  # the request is seen now: 3 s from here
    clock.now = 1003.9
    dog.check()
    assert aborted == []
    clock.now = 1004.0
    dog.check()
    assert dog.stop is stop[0] and len(aborted) == 1 and "stopped by SIGTERM" in aborted[0]
    assert lines[-1].startswith("round 7/50 | stopped by SIGTERM, and the round has not ended 3 s later")


def test_a_stop_request_between_calls_abandons_nothing():
    dog, clock, lines, aborted = _dog([], stop=[RuntimeError("stopped by SIGINT")], grace=1.0)
    for _ in range(5):
        clock.now += 1.0
        dog.check()
    assert aborted == [] and dog.stop is None


class _BlockingStub:
    """A worker stub whose compute waits until `release` (as a frozen worker's does), then fails like gRPC."""

    def __init__(self):
        self.release = threading.Event()
        self.is_ready = True

    def compute(self, request):
        self.release.wait(30)  # a hang guard: the test fails below if nothing released it
        raise RuntimeError("channel closed")


def test_a_waiting_call_is_listed_and_abandoning_it_raises_worker_stalled_in_its_caller():
    inner = _BlockingStub()
    stub = runtime.worker_calls._WatchedStub(inner, "TFF worker at far:9", inner.release.set)  # noqa: SLF001
    raised = []
    caller = threading.Thread(target=lambda: _capture(raised, stub.compute, None))
    caller.start()
    for _ in range(200):
        if any(w == "TFF worker at far:9" for w, _ in runtime.calls_in_flight()):
            break
        threading.Event().wait(0.01)
    assert [w for w, _ in runtime.calls_in_flight()].count("TFF worker at far:9") == 1
    assert runtime.abort_calls("far:9 gave no answer for 9 s") == ["TFF worker at far:9"]
    caller.join(10)
    assert len(raised) == 1 and isinstance(raised[0], runtime.WorkerStalled), raised
    assert str(raised[0]) == "far:9 gave no answer for 9 s" and inner.release.is_set()
    assert "TFF worker at far:9" not in [w for w, _ in runtime.calls_in_flight()]
    with pytest.raises(runtime.WorkerStalled):  # later calls fail at once
        stub.compute(None)
    assert stub.dispose(None) is None  # clean-up of its values is a no-op, never an error from a finalizer


def _capture(raised, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        raised.append(e)
