"""observers.Outbox: background evaluation, records delivered complete and in round order."""

from __future__ import annotations

import threading

import pytest

from dpfl_tff.observers import Outbox


class _Gated:
    """An evaluation that finishes only when its gate opens (the test decides when)."""

    def __init__(self):
        self.gates: dict[int, threading.Event] = {}
        self.threads: list[str] = []

    def __call__(self, weights):
        self.threads.append(threading.current_thread().name)
        self.gates.setdefault(weights, threading.Event()).wait(timeout=30)
        return {"test_accuracy": weights / 100}

    def open(self, weights):
        self.gates.setdefault(weights, threading.Event()).set()


def _outbox(evaluate):
    delivered = []
    return Outbox(evaluate, lambda rec, state, last, stopping: delivered.append((dict(rec), state, last))), delivered


def test_training_continues_while_an_evaluation_runs_and_records_stay_in_order():
    evaluate = _Gated()
    box, delivered = _outbox(evaluate)
    box.put({"round": 1}, "s1", False, False)
    box.put({"round": 2}, "s2", False, False, weights=2)  # evaluated in the background
    box.put({"round": 3}, "s3", False, False)  # returns at once: round 2's evaluation is still running
    assert [d[0]["round"] for d in delivered] == [1]
    evaluate.open(2)
    box.put({"round": 4}, "s4", False, False)
    box.flush()
    assert [d[0] for d in delivered] == [{"round": 1}, {"round": 2, "test_accuracy": 0.02}, {"round": 3},
                                         {"round": 4}]
    assert [d[1] for d in delivered] == ["s1", "s2", "s3", "s4"]  # each record with its own round's state
    assert evaluate.threads == ["dpfl_tff_eval_0"]
    box.close()


def test_the_last_round_and_a_stop_deliver_everything_before_put_returns():
    evaluate = _Gated()
    box, delivered = _outbox(evaluate)
    box.put({"round": 1}, None, False, False, weights=1)
    threading.Timer(0.2, evaluate.open, (1,)).start()
    evaluate.open(2)
    box.put({"round": 2}, None, True, False, weights=2)  # last: waits for round 1, evaluates in this thread
    assert [d[0] for d in delivered] == [{"round": 1, "test_accuracy": 0.01}, {"round": 2, "test_accuracy": 0.02}]
    assert evaluate.threads[-1] == threading.current_thread().name
    box.put({"round": 3}, None, False, True)  # a stop request: delivered at once
    assert delivered[-1][0] == {"round": 3}
    box.close()


def test_a_second_evaluation_waits_for_the_first():
    evaluate = _Gated()
    box, delivered = _outbox(evaluate)
    box.put({"round": 1}, None, False, False, weights=1)
    threading.Timer(0.2, evaluate.open, (1,)).start()
    box.put({"round": 2}, None, False, False, weights=2)  # blocks until round 1's evaluation is done
    assert [d[0]["round"] for d in delivered] == [1]
    evaluate.open(2)
    box.close()
    assert [d[0]["round"] for d in delivered] == [1, 2]


def test_a_failed_evaluation_is_raised_once_and_nothing_after_it_is_delivered():
    gate = threading.Event()

    def evaluate(weights):
        gate.wait(timeout=30)
        raise ValueError("bad weights")

    box, delivered = _outbox(evaluate)
    box.put({"round": 1}, None, False, False, weights=1)
    box.put({"round": 2}, None, False, False)  # waits behind round 1
    gate.set()
    with pytest.raises(ValueError, match="bad weights"):
        box.flush()
    box.close()  # nothing left to deliver, no second error
    assert delivered == []
