"""What the round loop tells the outside world, one observer per output.

After each completed round the loop hands the round's record (its metrics
line) to every observer in order; at the end it hands them the summary. The
order is part of the privacy ledger's write-ahead rule: the ledger line is
written before the loop builds the record, the checkpoint before the metrics
line (`Checkpointer` first), so whatever is on disk the ledger covers.

  Checkpointer    checkpoints/ every --checkpoint_every rounds, at the end and when stopped
  MetricsFile     metrics.jsonl, one flushed line per round
  TensorBoardLog  tensorboard/ scalars
  SummaryKeeper   the running summary.json fields (written at the end, also when stopped)
  ProgressLine    one line per round on stdout, with an ETA

`Outbox` hands the records over in round order; the test metrics of an
evaluation round (`--eval_every`) are computed in a background thread while
the next rounds train, and that round's record (and the ones after it) wait
until they are in.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
from collections.abc import Callable
from typing import Any

from dpfl_tff import checkpoints, outputs, release_log, round_record
from dpfl_tff.privacy.events import ADD_OR_REMOVE_ONE, REPLACE_ONE, REPLACE_SPECIAL

_RELATION_TEXT = {ADD_OR_REMOVE_ONE: "add-or-remove-one", REPLACE_ONE: "replace-one",
                  REPLACE_SPECIAL: "replace-special"}
# Ledger fields a summary copies from the last record when present (local DP's, Laplace's, DP-FTRL's).
_LEDGER_SUMMARY_FIELDS = round_record.SUMMARY_COPIES


class Observer:
    """Receives each completed round's record and, at the end, the summary.

    The loop calls, in this order: `on_resume` (a resumed run, once its state
    is restored), `on_round` for every completed round, `on_end` when the
    rounds are over (completed, or stopped at a budget), `close` always (also
    on a failure), and `write_plots` after a run that completed rounds.
    """

    def on_resume(self, done: int, trainable: Any) -> None:
        """A resumed run restored round `done`; `trainable`: the model's trainable weights then."""

    def on_round(self, record: dict[str, Any], state: Any, last: bool, stopping: bool) -> None:
        """`state` is the process state after the round; `last`: the final round; `stopping`: a stop request."""

    def on_end(self, summary: dict[str, Any], out: outputs.ExperimentDir) -> None:
        """The rounds are over: fields for `summary`, files for the run folder `out`."""

    def close(self) -> None:
        pass

    def write_plots(self, out: outputs.ExperimentDir) -> list[str]:
        """Writes this observer's plots into `out` (after the run); returns their file names."""
        del out
        return []


class Outbox:
    """Delivers each round's record to `deliver` in round order, evaluating in the background.

    `put(record, state, last, stopping, weights)`: with `weights`, the record
    gets `evaluate(weights)`'s fields first. That runs in a background thread
    (at most one at a time: a second evaluation round waits for the first)
    unless the round is the last or a stop was requested, when everything
    pending is delivered before `put` returns. So an evaluation never stalls
    training by more than the wait for the previous one, and every observer
    still sees complete records in round order. `flush()` delivers all
    pending records (waiting for their evaluation); the loop calls it before
    it checkpoints on an error or a stop, and at the end.
    """

    def __init__(self, evaluate: Callable[[Any], dict[str, Any]],
                 deliver: Callable[[dict[str, Any], Any, bool, bool], None]):
        self._evaluate, self._deliver = evaluate, deliver
        self._pending: collections.deque = collections.deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: concurrent.futures.Future | None = None

    def put(self, record: dict[str, Any], state: Any, last: bool, stopping: bool, weights: Any = None) -> None:
        future = None
        if weights is not None:
            if last or stopping:
                self.flush()
                record.update(self._evaluate(weights))
            else:
                if self._running is not None:
                    self._running.result()  # one evaluation at a time
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dpfl_tff_eval")
                future = self._running = self._pool.submit(self._evaluate, weights)
        self._pending.append((record, state, last, stopping, future))
        self._deliver_ready(wait=last or stopping)

    def _deliver_ready(self, wait: bool) -> None:
        while self._pending:
            record, state, last, stopping, future = self._pending[0]
            if future is not None and not (wait or future.done()):
                return
            self._pending.popleft()
            if future is not None:
                try:
                    record.update(future.result())
                except BaseException:
                    self._pending.clear()  # a failed evaluation ends the run: nothing after it is delivered
                    raise
            self._deliver(record, state, last, stopping)

    def flush(self) -> None:
        """Delivers every pending record (waits for their evaluations)."""
        self._deliver_ready(wait=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


class Checkpointer(Observer):
    """Saves the full state (with the ledger's length and hash) when due; must run before MetricsFile."""

    def __init__(self, ckpts: checkpoints.CheckpointManager, ledger_log: release_log.LedgerLog, every: int):
        self.ckpts, self.ledger_log, self.every = ckpts, ledger_log, every

    def due(self, r: int, last: bool, stopping: bool) -> bool:
        """Whether round `r` is checkpointed (`on_round` then needs the whole state)."""
        return last or stopping or bool(self.every and r % self.every == 0)

    def on_round(self, record, state, last, stopping):
        r = record["round"]
        if self.due(r, last, stopping):
            self.ckpts.save(r, state, record, self.ledger_log)

    def save_if_missing(self, round_num: int, state: Any, record: dict[str, Any] | None) -> bool:
        """Checkpoints round `round_num` unless it is; False if no round was completed."""
        if round_num <= 0 or record is None:
            return False
        if round_num not in self.ckpts.rounds():
            self.ckpts.save(round_num, state, record, self.ledger_log)
        return True


class MetricsFile(Observer):
    def __init__(self, out: outputs.ExperimentDir):
        self.out = out

    def on_round(self, record, state, last, stopping):
        self.out.append_metrics(record)


class TensorBoardLog(Observer):
    """tensorboard/ scalars; on a resume from round k (`keep_through`), the points after k are dropped first."""

    def __init__(self, path: str, keep_through: int | None = None):
        self.tb = outputs.TensorBoard(path, keep_through)

    def on_round(self, record, state, last, stopping):
        self.tb.write(record)

    def close(self):
        self.tb.close()


class SummaryKeeper(Observer):
    """Keeps summary.json's running fields: rounds, epsilon, the last test metrics."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary

    def on_round(self, record, state, last, stopping):
        summarize(self.summary, record)


def summarize(summary: dict[str, Any], record: dict[str, Any]) -> None:
    """Copies a round's figures that summary.json reports into `summary`."""
    summary.update(rounds=record["round"], epsilon=record["epsilon"], rounds_accounted=record["rounds_accounted"],
                   delta=record.get("delta", summary["delta"]),  # a record written before delta_sampler existed
                   delta_sampler=record.get("delta_sampler", summary.get("delta_sampler")))
    for key in _LEDGER_SUMMARY_FIELDS:
        if key in record:
            summary[key] = record[key]
    if "test_accuracy" in record:
        summary.update(final_test_accuracy=record["test_accuracy"], final_test_loss=record["test_loss"])


class ProgressLine(Observer):
    """`round 12/100 | clients 73 | loss .. | acc .. | eps 1.9 (delta .., relation) | 0.03s | ETA 3s`."""

    def __init__(self, log: Callable[[str], None], total: int, relation: str | None):
        self.log, self.total, self.relation = log, total, relation
        self.seconds: list[float] = []

    def on_round(self, record, state, last, stopping):
        if "round_seconds" in record:
            self.seconds = (self.seconds + [record["round_seconds"]])[-20:]
        r = record["round"]
        eta = sum(self.seconds) / len(self.seconds) * (self.total - r) if self.seconds else None
        self.log(progress_line(r, self.total, record, self.relation, eta))


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def progress_line(r: int, total: int, rec: dict[str, Any], relation: str | None, eta: float | None = 0.0) -> str:
    """The progress line of round `r` (fields the record lacks are left out)."""
    parts = [f"round {r}/{total}"]
    if "clients_this_round" in rec:
        parts.append(f"clients {rec['clients_this_round']}")
    if "train_loss" in rec:
        parts += [f"loss {_fmt(rec['train_loss'])}", f"acc {_fmt(rec['train_accuracy'])}"]
    if "test_accuracy" in rec:
        parts.append(f"test acc {rec['test_accuracy']:.4f}")
    if "record_epsilon" in rec:  # --dp_level=example: no client-level guarantee
        parts.append(f"record eps {rec['record_epsilon']:.4g} (delta {rec['delta']:.3g}, add-or-remove-one record, "
                     "max over clients)")
    elif relation is None:
        parts.append("eps inf (no DP)")
    else:
        if "local_epsilon" in rec:
            parts.append(f"local eps {rec['local_epsilon']:.4g}")
        parts.append(f"eps {rec['epsilon']:.4g} (delta {rec['delta']:.3g}, {_RELATION_TEXT[relation]})")
    if "round_seconds" in rec:
        parts.append(f"{rec['round_seconds']:.2f}s")
    if r < total and eta is not None:
        parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
