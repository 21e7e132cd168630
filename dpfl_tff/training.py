"""The round loop of a run: a thin loop over rounds whose outputs are observers.

`run(cfg)` resolves the run (`plan.prepare`), opens its folder (`resume`:
a new run, a checked resume, or a finished run left as it is), then loops:

  draw the round's cohort (secret, `sampling.CohortSampler`); the ledger begins the round
  budget guard: stop before a round that would exceed --max_epsilon or --target_epsilon
  process.next(mechanism.prepare_state(state), the cohort's data)   # the mechanism's query inside
  -- from here nothing is cut short (signals wait) --
  ledger.jsonl += the round (write-ahead)
  the record: the mechanism's fields, epsilon from the ledger, test metrics
  observers: checkpoint, metrics.jsonl, TensorBoard, summary, progress line

`dry_run(cfg)` does every check `run` does and prints the plan instead.
The learning process and its inputs are in `dpfl_tff.process` (re-exported
here: `build_learning_process`, `round_input`, `client_files`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dpfl_tff import observers, outputs, plan, plots, resume, runtime
from dpfl_tff.audit import auditor as canary_audit
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy import coverage
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.privacy.registry import mechanism_for
from dpfl_tff.process import (  # noqa: F401  (the process API, as the README's example uses it)
    Evaluator,
    build_learning_process,
    build_optimizer,
    client_files,
    initial_state,
    keras_model,
    model_fn_for,
    round_input,
)
from dpfl_tff.sampling import sampler_for
from dpfl_tff.tasks import FederatedData


class RunInterrupted(Exception):
    """The run was asked to stop (e.g. SIGTERM); the last completed round is checkpointed.

    Returned by `stop_requested` (the run stops after the current round), or
    raised by a signal handler to cut the current round short: `run` then
    checkpoints the last completed round before it re-raises.
    """

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait (pending) until the block ends: a handler cannot cut it short.

    Wraps everything `run` writes, so that a signal handler that raises never
    lands between the ledger and a checkpoint, or inside a file being written.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclasses.dataclass
class RunResult:
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    already_complete: bool = False  # the folder held this run, finished: nothing was run or written


class RoundFailed(RuntimeError):
    """A round's TFF computation failed; the last completed round is checkpointed."""


def run(
    cfg: ExperimentConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    stop_requested: Callable[[], RunInterrupted | None] = lambda: None,
    fresh: bool = False,
) -> RunResult:
    """Trains `cfg` end to end and writes its experiment folder; resumes it if it holds a run.

    Every round appends one line to `metrics.jsonl` with the epsilon spent so
    far; `summary.json` is written at the end, also when the run is stopped by
    an exception or a signal (then with `status` saying why). The privacy
    ledger (`ledger.jsonl`) gets each executed round before anything of it is
    written; the full state is checkpointed every
    `cfg.train.checkpoint_every` rounds, at the end and when stopped.
    Rerunning the same configuration on the same folder resumes from the newest
    checkpoint once the ledger is verified against the folder (a damaged,
    shortened or missing ledger refuses the resume: `LedgerError`, nothing
    written). Rounds after the checkpoint are re-run with fresh cohorts and
    fresh noise (`--client_sampling=shuffle`: the same clients; DP-FTRL: in a
    fresh noise tree), and counted again. A folder holding this run finished is left
    as it is (`RunResult.already_complete`).

    Args:
      cfg: the configuration (validated here).
      overwrite: delete an earlier run in `cfg.output_dir` and start afresh.
      log: receives the human-readable progress lines.
      stop_requested: polled after every round; when it returns an exception,
        the run checkpoints, writes its summary, shuts the worker down and
        raises it.
      fresh: never resume; refuse a non-empty folder unless `overwrite`.

    Raises:
      LedgerError: the folder's ledger does not cover its releases.
    """
    start = time.time()
    cfg, data, notes = plan.prepare(cfg, log)
    mechanism = mechanism_for(cfg)
    model = keras_model(cfg, data)
    folder = resume.open_folder(cfg, mechanism, model.trainable_weights + model.non_trainable_weights,
                                overwrite, fresh, warn=log)
    if folder.finished is not None:
        done = folder.finished
        eps = "inf (no DP)" if done.get("neighboring_relation") is None else f"{done['epsilon']:.4g}"
        log(f"already complete: {done['rounds']} rounds, epsilon {eps}; outputs in {cfg.output_dir}")
        return RunResult(done, outputs.read_metrics(cfg.output_dir), already_complete=True)
    loop = _Loop(cfg, data, mechanism, folder, log, stop_requested)
    loop.announce(notes + _calibration_history_notes(cfg, loop.planned, loop.history))
    try:
        with runtime.execution_context(cfg.workers, folder.out.file(outputs.WORKER_LOG), cfg.worker_timeout), \
                client_files(cfg, data) as files:
            loop.train(files)
        loop.summary["status"] = "completed" if loop.summary["stop_reason"] is None else "stopped_at_budget"
    except BaseException as e:  # record why the run stopped, then re-raise
        loop.summary["status"] = f"stopped: {type(e).__name__}: {e}".strip().rstrip(":")
        raise
    finally:
        with signals_deferred():
            loop.close(time.time() - start)
    if loop.records:
        try:
            plots.plot_run(cfg.output_dir)
            if loop.auditor is not None and (loop.auditor.results or {}).get("final_model") is not None:
                canary_audit.plot(loop.auditor.results, folder.out.file(canary_audit.AUDIT_PNG))
        except Exception as e:  # noqa: BLE001  (a plot must never fail a finished run)
            log(f"WARNING: could not write {plots.RUN_PNG} or {canary_audit.AUDIT_PNG}: {e}")
    return RunResult(loop.summary, loop.records)


class _Loop:
    """One run's rounds: the state between them, the cohort drawn for the next, the observers."""

    def __init__(self, cfg: ExperimentConfig, data: FederatedData, mechanism: PrivacyMechanism,
                 folder: resume.RunFolder, log: Callable[[str], None],
                 stop_requested: Callable[[], RunInterrupted | None]):
        self.cfg, self.data, self.mechanism, self.folder = cfg, data, mechanism, folder
        self.log, self.stop_requested = log, stop_requested
        self.ledger = mechanism.ledger()
        # Every prediction composes the folder's history (its verified ledger) first.
        self.history = resume.history_of(folder)
        self.planned = mechanism.projected(list(self.history.entries), self.history.resume_round, cfg.train.rounds)
        t = cfg.train
        # Canary clients (--canary_clients) are ids N..N+K-1 of the population the cohorts are drawn from.
        self.sampler = sampler_for(t.client_sampling, data.num_clients + cfg.canary_clients, t.clients_per_round,
                                   t.sampling_seed)
        self.auditor: canary_audit.CanaryAuditor | None = None
        self.records: list[dict[str, Any]] = []
        self.summary = _initial_summary(cfg, mechanism, self.ledger.neighboring_relation, self.sampler.seeded)
        self.summary.update(_amplification_fields(self.ledger, mechanism, self.history))
        self.checkpointer = observers.Checkpointer(folder.ckpts, folder.ledger_log, t.checkpoint_every)
        self.done, self.state, self.clip, self.cohort = 0, None, mechanism.initial_clip(), None
        self.round_fields: dict[str, Any] = {}  # the ledger's fields of the next round (begin_round)
        self.observers: list[observers.Observer] = []
        self.outbox: observers.Outbox | None = None  # set when training starts
        self.unreleased = _unreleased_fields(cfg)  # per run, not per round

    def announce(self, notes: list[str]) -> None:
        """Opens the folder for writing and prints the run's opening lines."""
        self.folder.out.open()
        for line in [*notes, f"task: {self.data.description}", self._privacy_line()]:
            self.log(line)
        if self.summary["outputs_not_covered_by_epsilon"]:
            self.log(f"released but not covered by epsilon: {', '.join(self.summary['outputs_not_covered_by_epsilon'])}"
                     " (--client_metrics=false leaves them out)")
        if self.mechanism.noise_seeded:
            self.log(f"WARNING: DP noise is seeded (--noise_seed={self.cfg.dp.noise_seed}): for tests only, it gives "
                     "no privacy")
        if self.cfg.workers:
            self.log(f"workers: {', '.join(self.cfg.workers)} (clients split over them, merged before the server step)")
        if self.cfg.canary_clients:
            k = self.cfg.canary_clients
            self.log(f"audit: {k} canary clients in the population (N' = {self.data.num_clients} + {k}), {k} held-out "
                     "directions; empirical epsilon after the last round")

    def _privacy_line(self) -> str:
        return _privacy_line(self.cfg, self.mechanism, self.planned, self.history)

    def train(self, files) -> None:
        cfg = self.cfg
        seed, lost_seed = canary_audit.run_seed(cfg, self.folder.ckpts.dir, self.folder.ledger_log.count, self.log)
        self.process = build_learning_process(cfg, self.data, files, canary_seed=seed)
        self.state = initial_state(self.process, cfg, self.data)
        if seed is not None:
            self.auditor = canary_audit.CanaryAuditor.for_run(
                cfg, seed, self.process.get_model_weights(self.state).trainable, self.folder.ckpts.dir, lost_seed)
        self.outbox = observers.Outbox(Evaluator(cfg, self.data), self._deliver)
        if self.folder.out.resuming:
            self._restore()
            if self.auditor is not None:
                self.auditor.resume(self.done, self.process.get_model_weights(self.state).trainable)
        self.observers = [
            self.checkpointer, *([self.auditor] if self.auditor else []), observers.MetricsFile(self.folder.out),
            observers.TensorBoardLog(self.folder.out.file(outputs.TENSORBOARD)),
            observers.SummaryKeeper(self.summary),
            observers.ProgressLine(self.log, cfg.train.rounds, self.ledger.neighboring_relation),
        ]
        try:  # outside the deferred blocks, `state` is always that of round `done`
            self.summary["stop_reason"] = self._over_budget()
            while self.summary["stop_reason"] is None and self.done < cfg.train.rounds:
                self._round(files)
        except RunInterrupted:  # raised by the loop, or by a second signal's handler mid-round
            with signals_deferred():
                self._save_last_completed()
            raise
        if self.summary["stop_reason"]:
            self.log(f"stopped: {self.summary['stop_reason']}")
        if self.auditor is not None and self.auditor.results is not None:
            self.summary.update(self.auditor.summary_fields())
            self.folder.out.write_json(canary_audit.AUDIT_JSON, self.auditor.results)

    def _save_last_completed(self) -> None:
        """Delivers every pending record and checkpoints round `done` unless it is (a stop or an error)."""
        self.outbox.flush()
        self.checkpointer.save_if_missing(self.done, self.state, self.records[-1] if self.records else None)

    def _restore(self) -> None:
        self.done, self.state, self.clip, self.records = resume.restore(
            self.folder, self.ledger, self.state, self.clip, self.log)
        self.summary["resumed_from_round"] = self.done
        self.sampler.restore(self.folder.ledger_log.entries)
        if self.done:
            self.log(f"resuming {self.cfg.output_dir} from round {self.done} (checkpoint); "
                     f"ledger: {self.ledger.released} released round(s) so far")
        if self.done != self.history.resume_round:  # the newest checkpoint was unreadable: more rounds re-run
            self.history = dataclasses.replace(self.history, resume_round=self.done)
            self.planned = self.mechanism.projected(list(self.history.entries), self.done, self.cfg.train.rounds)
            self.log(f"{self._privacy_line()} (restored from round {self.done}, not the newest checkpoint)")
        if self.records:
            observers.summarize(self.summary, self.records[-1])
        if self.ledger.released:  # the checkpoint's record may predate releases the ledger holds: count them all
            spent = self.ledger.projected(self.done, self.done)
            self.summary.update({k: v for k, v in spent.items() if k in _SPENT_FIELDS})
        self.summary.update(_amplification_fields(self.ledger, self.mechanism, self.history))

    def _next_cohort(self) -> np.ndarray:
        """The cohort of round done + 1, drawn once (also when the budget guard previews it).

        The ledger learns then that the round is next (`Ledger.begin_round`).
        """
        if self.cohort is None:
            r = self.done + 1
            self.round_fields = self.ledger.begin_round(r)
            self.cohort = self.sampler.cohort(r, self.folder.ledger_log.executions(r) + 1)
        return self.cohort

    def _guards(self) -> list[tuple[str, float, str]]:
        """(flag, budget, view) of each budget guard: --max_epsilon, and --target_epsilon (never end above it)."""
        dp = self.cfg.dp
        guards = []
        if dp.max_epsilon is not None:
            guards.append(("max_epsilon", dp.max_epsilon, dp.max_epsilon_view))
        if dp.target_epsilon is not None:  # calibrated on `epsilon` (central and ftrl)
            guards.append(("target_epsilon", dp.target_epsilon, "central"))
        return guards

    def _over_budget(self) -> str | None:
        """Why round done + 1 must not run (a budget guard), or None; records the guard in the summary."""
        r, guards = self.done + 1, self._guards()
        if not guards or r > self.cfg.train.rounds:
            return None
        for flag, budget, view in guards:
            eps, name = self.ledger.preview_of(self._next_cohort(), view)
            if eps > budget:
                self.summary["stop_guard"] = flag
                return f"privacy budget: round {r} would bring {name} to {eps:.4g} > --{flag}={budget:g}"
        return None

    def _round(self, files) -> None:
        r, t0 = self.done + 1, time.time()
        cohort = self._next_cohort()
        client_data = round_input(self.cfg, self.data, cohort, r, files)
        self.ledger.prefetch()  # PLD: overlaps the accountant with the round
        try:
            result = self.process.next(self.mechanism.prepare_state(self.state, self.round_fields), client_data)
        except RunInterrupted:  # a second stop request cut the round short
            raise
        except Exception as e:
            with signals_deferred():
                raise self._failed(r, e) from e
        with signals_deferred():  # the round's bookkeeping and writes are never cut short
            interrupted = self._complete(r, cohort, result, t0)
        # A signal that waited above is handled here; a second one raises RunInterrupted.
        interrupted = interrupted or self.stop_requested()
        if interrupted is not None:
            # Checkpoint before raising: a second signal (uv forwarding the first) that lands while the
            # exception travels to `train`'s handler would otherwise skip the checkpoint.
            with signals_deferred():
                self._save_last_completed()
            raise interrupted

    def _complete(self, r: int, cohort: np.ndarray, result, t0: float) -> RunInterrupted | None:
        """Ledger first (write-ahead), then the record, then the observers. Returns a pending stop request."""
        cfg = self.cfg
        self.folder.ledger_log.append(r, cohort if self.mechanism.records_cohorts else None, self.round_fields)
        self.state = result.state
        record = self._record(r, cohort, result.metrics)
        record.update(self.round_fields)
        record["round_seconds"] = time.time() - t0
        t_acc = time.time()
        record.update(self.ledger.commit(cohort))
        record["accounting_seconds"] = time.time() - t_acc
        record.update(delta=cfg.target_delta, accountant=cfg.dp.accountant,
                      neighboring_relation=self.ledger.neighboring_relation, client_sampling=cfg.train.client_sampling)
        self.done, self.cohort = r, None
        self.summary["stop_reason"] = self._over_budget()
        last = self.summary["stop_reason"] is not None or r == cfg.train.rounds
        evaluate = last or (cfg.train.eval_every and r % cfg.train.eval_every == 0)
        weights = self.process.get_model_weights(self.state) if evaluate else None
        interrupted = self.stop_requested()
        self.outbox.put(record, self.state, last, interrupted is not None, weights)
        return interrupted

    def _deliver(self, record: dict[str, Any], state: Any, last: bool, stopping: bool) -> None:
        """A round's complete record (test metrics in, if evaluated) to the observers, in round order."""
        for key in self.unreleased:
            record.pop(key, None)
        for observer in self.observers:
            observer.on_round(record, state, last, stopping)
        self.records.append(record)

    def _record(self, r: int, cohort, metrics) -> dict[str, Any]:
        """The round's metrics line before accounting; advances the clip (adaptive clipping)."""
        record: dict[str, Any] = {"round": r, "clients_this_round": len(cohort), "clip_norm": self.clip}
        aggregator = metrics["aggregator"]
        if self.mechanism.releases_client_statistics:
            train = metrics["client_work"]["train"]
            record.update(
                train_loss=float(train["loss"]) if len(cohort) else None,
                train_accuracy=float(train["accuracy"]) if len(cohort) else None,
                nonfinite_clients=int(aggregator["nonfinite_clients"]),
            )
        fields, self.clip = self.mechanism.record_fields(aggregator.get("inner", aggregator), self.clip)
        record.update(fields)
        return record

    def _failed(self, r: int, error: Exception) -> RoundFailed:
        """Checkpoints round `done` (if not yet) so that a rerun resumes there; returns the error to raise."""
        saved = ""
        self.outbox.flush()
        last = self.records[-1] if self.records else None
        if self.checkpointer.save_if_missing(self.done, self.state, last):
            saved = f"; round {self.done} is checkpointed: rerun the same command to resume from it"
        cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return RoundFailed(f"round {r} failed: {type(error).__name__}: {cause}{saved}")

    def close(self, wall_seconds: float) -> None:
        """Closes the accountant and the observers and writes summary.json (also when the run failed)."""
        if self.outbox is not None:
            self.outbox.close()
        self.ledger.close()
        for observer in self.observers:
            observer.close()
        if self.cfg.client_metrics:
            self.summary["wall_seconds"] = wall_seconds
        self.folder.out.write_json(outputs.SUMMARY, self.summary)
        self.folder.out.close()


# The summary's figures of what the ledger has spent so far (also before a resumed run's first round).
_SPENT_FIELDS = ("epsilon", "rounds_accounted", "local_epsilon", "epsilon_analysis", "max_participations",
                 "local_epsilon_pure", "trees", "epsilon_if_cohorts_secret")


def _initial_summary(cfg: ExperimentConfig, mechanism: PrivacyMechanism, relation: str | None,
                     sampling_seeded: bool) -> dict[str, Any]:
    return {
        "status": "running",
        "rounds_planned": cfg.train.rounds,
        "rounds": 0,
        "rounds_accounted": 0,
        "dp_mode": mechanism.name,
        "epsilon": 0.0 if relation else math.inf,
        "delta": cfg.target_delta,
        "accountant": cfg.dp.accountant,
        "neighboring_relation": relation,
        "client_sampling": cfg.train.client_sampling,
        "noise_multiplier": cfg.dp.noise_multiplier,
        "local_mechanism": None,
        **mechanism.summary_fields(),
        "noise_seeded": mechanism.noise_seeded,
        "sampling_seeded": sampling_seeded,
        "cohorts_logged": mechanism.records_cohorts,
        "client_metrics": cfg.client_metrics,
        "outputs_not_covered_by_epsilon": coverage.not_covered(cfg),
        "final_test_accuracy": None,
        "final_test_loss": None,
        "canary_clients": cfg.canary_clients,
        "empirical_epsilon": None,
        "empirical_epsilon_all_rounds": None,
        "empirical_epsilon_no_signal_level": None,
        "stop_reason": None,
        "stop_guard": None,  # the flag whose budget stopped the run (max_epsilon or target_epsilon)
        "guarded_epsilon": _guarded_field(cfg, mechanism),
        "resumed_from_round": None,
    }


def _amplification_fields(ledger, mechanism: PrivacyMechanism, history: resume.History) -> dict[str, Any]:
    """Whether the cohorts are in the folder and whether `epsilon` rests on their secrecy, and why not."""
    return {
        "cohorts_in_folder": mechanism.records_cohorts or any("cohort" in e for e in history.entries),
        "epsilon_amplified_by_sampling": ledger.amplified_by_sampling,
        "epsilon_not_amplified_because": ledger.unamplified_reason,
    }


def _guarded_field(cfg: ExperimentConfig, mechanism: PrivacyMechanism) -> str | None:
    """The field --max_epsilon caps (None without the flag): `local_epsilon` under local DP unless the central view."""
    if cfg.dp.max_epsilon is None:
        return None
    ledger = mechanism.ledger()
    try:
        return ledger.guarded_field(cfg.dp.max_epsilon_view)
    finally:
        ledger.close()


def _privacy_line(cfg: ExperimentConfig, mechanism: PrivacyMechanism, planned: dict[str, Any],
                  history: resume.History) -> str:
    """The run's privacy line: the mechanism's, how it composes the folder's history, the cohorts' secrecy."""
    composed = f"; {history.text()}" if history.entries else ""
    return f"{mechanism.privacy_line(planned)}{composed}; {_sampling_text(cfg, mechanism)}"


def _calibration_history_notes(cfg: ExperimentConfig, planned: dict[str, Any], history: resume.History) -> list[str]:
    """On a resume of a calibrated run: its epsilon at the end, with the history, against --target_epsilon."""
    target = cfg.dp.target_epsilon
    if target is None or not history.entries:
        return []
    eps = planned["epsilon"]
    where = (f"with the ledger's {history.releases} release(s) and rounds {history.resume_round + 1}.."
             f"{cfg.train.rounds} re-run from the checkpoint, epsilon would end at {eps:.4g}")
    if eps <= target:
        return [f"calibration: {where} <= --target_epsilon={target:g}"]
    return [f"calibration: {where} > --target_epsilon={target:g} (the noise cannot change within a run): the "
            "--target_epsilon guard stops the run before the round that would go above it"]


def _sampling_text(cfg: ExperimentConfig, mechanism: PrivacyMechanism) -> str:
    """How secret the cohorts are: what amplification by sampling rests on."""
    if cfg.train.sampling_seed is None:
        text = "cohorts drawn from OS entropy" + ("" if mechanism.records_cohorts else " (secret)")
    else:
        text = (
            "cohorts seeded by --sampling_seed: amplification by sampling holds only against readers who do "
            "not know that seed"
        )
    if cfg.log_cohorts:
        text += "; --log_cohorts: ledger.jsonl lists every cohort, so its readers know who took part"
    elif mechanism.records_cohorts:
        text += "; ledger.jsonl lists every cohort (this privacy mode's accounting or the epoch shuffle needs them)"
    return text


def _unreleased_fields(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The metrics fields `cfg` does not release (`privacy.coverage`): dropped from every record."""
    fields: tuple[str, ...] = ()
    if not cfg.client_metrics:
        fields += (*coverage.CLIENT_TRAINING_FIELDS, *coverage.TIMING_FIELDS)
    if not coverage.cohort_size_released(cfg):
        fields += (coverage.COHORT_SIZE_FIELD,)
    return fields


def dry_run(cfg: ExperimentConfig, overwrite: bool = False, fresh: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Checks everything `run` would check, prints the plan, trains nothing and starts no TFF worker.

    Loads the data, builds and checks the model, calibrates the noise, computes
    the epsilon after `cfg.train.rounds` rounds and checks the output folder as
    a resume would (settings, ledger, checkpoint), without writing anything.

    Returns:
      The plan's figures (also printed through `log`).

    Raises:
      ConfigError, OSError, LedgerError: as `run` would, before training.
    """
    cfg, data, notes = plan.prepare(cfg, log)
    mechanism = mechanism_for(cfg)
    model = keras_model(cfg, data)
    folder, history = resume.describe(cfg, mechanism, model.trainable_weights + model.non_trainable_weights,
                                      overwrite, fresh)
    planned = mechanism.projected(list(history.entries), history.resume_round, cfg.train.rounds)
    for note in [*notes, *_calibration_history_notes(cfg, planned, history)]:
        log(note)
    log("dry run: nothing is trained, no TFF worker is started, nothing is written")
    log(f"task: {data.description}")
    canary = f" + {cfg.canary_clients} canary clients" if cfg.canary_clients else ""
    log(f"clients: N = {data.num_clients}{canary}, {cfg.train.clients_per_round} per round ({cfg.train.client_sampling})")
    log(f"model: {cfg.train.model}, {model.count_params():,} parameters")
    log(_privacy_line(cfg, mechanism, planned, history))
    not_covered = coverage.not_covered(cfg)
    if not_covered:
        log(f"released but not covered by epsilon: {', '.join(not_covered)} (--client_metrics=false leaves them out)")
    log(f"output: {folder}")
    return {"num_clients": data.num_clients, "model_parameters": int(model.count_params()),
            "epsilon": planned["epsilon"], "noise_multiplier": cfg.dp.noise_multiplier, "output": folder}
