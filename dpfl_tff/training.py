"""Builds the TFF FedAvg learning process and runs the round loop."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff import checkpoints, grouped_fedavg, models, outputs, plan, plots, runtime
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy import accounting, coverage
from dpfl_tff.privacy.aggregators import build_aggregator, central_query
from dpfl_tff.privacy.nonfinite import ZeroNonFiniteFactory
from dpfl_tff.sampling import CohortSampler
from dpfl_tff.tasks import FederatedData, load_task

_RELATION_TEXT = {accounting.ADD_OR_REMOVE_ONE: "add-or-remove-one", accounting.REPLACE_ONE: "replace-one"}


def build_optimizer(name: str, learning_rate: float) -> tff.learning.optimizers.Optimizer:
    """`sgd`, `sgdm` (momentum 0.9) or `adam` from `tff.learning.optimizers`."""
    if name == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
    if name == "sgdm":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=0.9)
    if name == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}: must be one of sgd, sgdm, adam")


def keras_model(cfg: ExperimentConfig, data: FederatedData) -> tf.keras.Model:
    return models.build_model(cfg.train.model, data.input_shape, data.num_classes)


def model_fn_for(cfg: ExperimentConfig, data: FederatedData) -> Callable[[], tff.learning.models.VariableModel]:
    """A no-argument TFF model constructor for the task's input spec."""

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_model(cfg, data),
            input_spec=data.element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    return model_fn


def build_learning_process(
    cfg: ExperimentConfig, data: FederatedData, files: grouped_fedavg.ClientFiles | None = None
) -> tff.learning.templates.LearningProcess:
    """Unweighted DP-FedAvg with the DP aggregation of `cfg`.

    Unweighted: every client's update counts equally, as client-level DP
    needs (a weight would let one client's influence exceed the clip).
    `cfg.train.fedavg_impl` picks `grouped_fedavg` (several clients per TFF
    client call; the worker reads client data from `files`, or, with None,
    the round's request carries it) or TFF's `build_unweighted_fed_avg` with
    our aggregator. Feed `next` with `round_input`.
    """
    client_opt = build_optimizer(cfg.train.client_optimizer, cfg.train.client_learning_rate)
    server_opt = build_optimizer(cfg.train.server_optimizer, cfg.train.server_learning_rate)
    if cfg.train.fedavg_impl == "grouped":
        return grouped_fedavg.build_grouped_fed_avg(
            lambda: keras_model(cfg, data),
            data.input_shape,
            client_optimizer=client_opt,
            server_optimizer=server_opt,
            batch_size=cfg.train.client_batch_size,
            mode=cfg.dp.mode,
            query=central_query(cfg.dp, cfg.train.clients_per_round) if cfg.dp.mode == "central" else None,
            local_mechanism=cfg.dp.local_mechanism,
            clip_norm=cfg.dp.clip_norm,
            noise_multiplier=cfg.dp.noise_multiplier,
            noise_seed=cfg.dp.noise_seed,
            files_root=None if files is None else files.root,
        )
    aggregator = build_aggregator(cfg.dp, cfg.train.clients_per_round)
    if cfg.dp.mode == "local":  # zeroes non-finite updates itself, at the clients, and counts nothing
        return tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn_for(cfg, data),
            client_optimizer_fn=client_opt,
            server_optimizer_fn=server_opt,
            model_aggregator=aggregator,
            metrics_aggregator=_discard_client_metrics,
            loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
        )
    return tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn_for(cfg, data),
        client_optimizer_fn=client_opt,
        server_optimizer_fn=server_opt,
        model_aggregator=ZeroNonFiniteFactory(aggregator),
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )


def _discard_client_metrics(metric_finalizers, local_unfinalized_metrics_type=None):
    """A TFF metrics aggregator for local DP: the clients' training metrics stay at the clients."""
    del metric_finalizers, local_unfinalized_metrics_type

    def aggregate(client_metrics):
        del client_metrics
        return tff.federated_value(collections.OrderedDict(), tff.SERVER)

    return aggregate


def round_input(
    cfg: ExperimentConfig,
    data: FederatedData,
    cohort: Sequence[int],
    round_num: int,
    files: grouped_fedavg.ClientFiles | None = None,
) -> list:
    """The CLIENTS value of round `round_num` for `build_learning_process(cfg, data, files)`.

    Every client's examples are visited in `data.client_order` order, seeded by
    (seed, round, client): the same batches whichever `fedavg_impl` runs.
    """
    t = cfg.train

    def seed_of(c: int) -> int:
        return _shuffle_seed(t.seed, round_num, c)

    if t.fedavg_impl != "grouped":
        return [
            data.client_dataset(c, t.client_epochs, t.client_batch_size, seed_of(c), t.client_shuffle_buffer,
                                t.client_max_examples)
            for c in cohort
        ]
    orders = [
        data.client_order(c, t.client_epochs, seed_of(c), t.client_shuffle_buffer, t.client_max_examples)
        for c in cohort
    ]
    calls = grouped_fedavg.CALLS_PER_WORKER * max(1, len(cfg.workers))
    groups = grouped_fedavg.split_groups(len(cohort), t.clients_per_call, calls)
    return grouped_fedavg.make_groups(data, list(cohort), orders, groups, files)


@contextlib.contextmanager
def client_files(cfg: ExperimentConfig, data: FederatedData) -> Iterator[grouped_fedavg.ClientFiles | None]:
    """A private folder of client data files for a local worker; None when not used.

    Used by `fedavg_impl=grouped` without `--workers` (remote workers get the
    data in each round's request). Deleted on exit.
    """
    if cfg.train.fedavg_impl != "grouped" or cfg.workers:
        yield None
        return
    root = tempfile.mkdtemp(prefix="dpfl_tff_clients_")
    try:
        yield grouped_fedavg.ClientFiles(data, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def initial_state(process, cfg: ExperimentConfig, data: FederatedData) -> Any:
    """Process state whose model weights are seeded by `cfg.train.seed`."""
    state = process.initialize()
    tf.keras.utils.set_random_seed(cfg.train.seed)
    weights = tff.learning.models.ModelWeights.from_model(keras_model(cfg, data))
    return process.set_model_weights(state, weights)


class Evaluator:
    """Central evaluation of the server model on the task's test split."""

    def __init__(self, cfg: ExperimentConfig, data: FederatedData):
        self._model = keras_model(cfg, data)
        self._model.compile(
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        self._test = data.test

    def __call__(self, weights: tff.learning.models.ModelWeights) -> dict[str, float]:
        weights.assign_weights_to(self._model)
        loss, acc = self._model.evaluate(self._test.x, self._test.y, batch_size=512, verbose=0)
        return {"test_loss": float(loss), "test_accuracy": float(acc)}


def _shuffle_seed(seed: int, round_num: int, client_id: int) -> int:
    return int(np.random.default_rng([seed, 11, round_num, int(client_id)]).integers(2**31 - 1))


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


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _privacy_line(cfg: ExperimentConfig, planned: dict[str, Any]) -> str:
    delta_text = f"delta={cfg.target_delta:.3g}{'' if cfg.dp.target_delta else ' (default 1/num_clients^1.1)'}"
    if cfg.dp.mode == "none":
        return "privacy: none (--dp_mode=none): no DP guarantee, epsilon is infinite"
    if cfg.dp.mode == "central":
        line = (
            f"privacy: central DP, {planned['analysis']}; accountant {cfg.dp.accountant.upper()}, {delta_text}; "
            f"epsilon after {cfg.train.rounds} rounds: {planned['epsilon']:.4g}"
        )
    else:
        line = (
            f"privacy: local DP ({cfg.dp.local_mechanism}) at each client, replace-one; accountant "
            f"{cfg.dp.accountant.upper()}, {delta_text}; if a client took part in all {cfg.train.rounds} rounds: "
            f"local epsilon {planned['local_epsilon']:.4g}, central view {planned['epsilon']:.4g} "
            f"({planned['epsilon_analysis']})"
        )
    return f"{line}; {_sampling_text(cfg)}"


def _sampling_text(cfg: ExperimentConfig) -> str:
    """How secret the cohorts are: what amplification by sampling rests on."""
    if cfg.train.sampling_seed is None:
        text = "cohorts drawn from OS entropy (secret)"
    else:
        text = (
            "cohorts seeded by --sampling_seed: amplification by sampling holds only against readers who do "
            "not know that seed"
        )
    if cfg.log_cohorts:
        text += "; --log_cohorts: ledger.jsonl lists every cohort, so its readers know who took part"
    elif cfg.records_cohorts:
        text += "; ledger.jsonl lists every cohort (local DP's participation counts need them)"
    return text


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
    fresh noise, and counted again. A folder holding this run finished is left
    as it is (`RunResult.already_complete`).

    Args:
      cfg: validated configuration.
      overwrite: delete an earlier run in `cfg.output_dir` and start afresh.
      log: receives the human-readable progress lines.
      stop_requested: polled after every round; when it returns an exception,
        the run checkpoints, writes its summary, shuts the worker down and
        raises it.
      fresh: never resume; refuse a non-empty folder unless `overwrite`.

    Raises:
      checkpoints.LedgerError: the folder's ledger does not cover its releases.
    """
    start = time.time()
    cfg, data, notes = plan.prepare(cfg, log)
    out = outputs.ExperimentDir(cfg.output_dir, cfg.to_dict(), overwrite=overwrite, fresh=fresh)  # checks only
    ckpts = checkpoints.CheckpointManager(cfg.output_dir, warn=log)
    ledger_log = checkpoints.LedgerLog(cfg.output_dir)
    if out.resuming:
        ledger_log.load(needs_cohorts=cfg.dp.mode == "local")
        checkpoints.check_ledger_covers(ledger_log, cfg.output_dir, ckpts.dir)
        model = keras_model(cfg, data)
        ckpts.check_fits(model.trainable_weights + model.non_trainable_weights, cfg.train.model)
        finished = _finished_summary(out, cfg)
        if finished is not None:
            eps = "inf (no DP)" if finished.get("neighboring_relation") is None else f"{finished['epsilon']:.4g}"
            log(f"already complete: {finished['rounds']} rounds, epsilon {eps}; outputs in {cfg.output_dir}")
            return RunResult(finished, outputs.read_metrics(cfg.output_dir), already_complete=True)
    ledger = accounting.make_ledger(cfg)
    planned = ledger.planned(cfg.train.rounds)
    relation = ledger.neighboring_relation
    delta = cfg.target_delta
    noise_seeded = cfg.dp.mode != "none" and cfg.dp.noise_seed is not None
    sampler = CohortSampler(
        cfg.train.client_sampling, data.num_clients, cfg.train.clients_per_round, cfg.train.sampling_seed
    )
    not_covered = coverage.not_covered(cfg)
    out.open()
    for note in notes:
        log(note)
    log(f"task: {data.description}")
    log(_privacy_line(cfg, planned))
    if not_covered:
        log(f"released but not covered by epsilon: {', '.join(not_covered)} (--client_metrics=false leaves them out)")
    if noise_seeded:
        log(f"WARNING: DP noise is seeded (--noise_seed={cfg.dp.noise_seed}): for tests only, it gives no privacy")

    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "status": "running",
        "rounds_planned": cfg.train.rounds,
        "rounds": 0,
        "rounds_accounted": 0,
        "dp_mode": cfg.dp.mode,
        "epsilon": 0.0 if relation else math.inf,
        "delta": delta,
        "accountant": cfg.dp.accountant,
        "neighboring_relation": relation,
        "client_sampling": cfg.train.client_sampling,
        "noise_multiplier": cfg.dp.noise_multiplier,
        "local_mechanism": cfg.dp.local_mechanism if cfg.dp.mode == "local" else None,
        "noise_seeded": noise_seeded,
        "sampling_seeded": sampler.seeded,
        "cohorts_logged": cfg.records_cohorts,
        "client_metrics": cfg.client_metrics,
        "outputs_not_covered_by_epsilon": not_covered,
        "final_test_accuracy": None,
        "final_test_loss": None,
        "stop_reason": None,
        "resumed_from_round": None,
    }
    state = None
    done = 0
    try:
        if cfg.workers:
            log(f"workers: {', '.join(cfg.workers)} (clients split over them, merged before the server step)")
        with runtime.execution_context(cfg.workers, out.file(outputs.WORKER_LOG), cfg.worker_timeout), \
                client_files(cfg, data) as files:
            process = build_learning_process(cfg, data, files)
            state = initial_state(process, cfg, data)
            evaluate = Evaluator(cfg, data)
            clip = cfg.dp.clip_norm if cfg.dp.mode != "none" else None

            if out.resuming:
                done, state, clip, records = _resume(out, ckpts, ledger_log, ledger, state, clip, log)
                summary["resumed_from_round"] = done
                if done:
                    log(f"resuming {cfg.output_dir} from round {done} (checkpoint); "
                        f"ledger: {ledger.released} released round(s) so far")
                if records:
                    _summarize(summary, records[-1])

            cohort: np.ndarray | None = None  # of round done + 1, drawn once (also when previewed)

            def next_cohort() -> np.ndarray:
                nonlocal cohort
                if cohort is None:
                    cohort = sampler.cohort(done + 1, ledger_log.executions(done + 1) + 1)
                return cohort

            def over_budget() -> str | None:
                r = done + 1
                if cfg.dp.max_epsilon is None or r > cfg.train.rounds:
                    return None
                eps = ledger.preview(next_cohort())
                if eps <= cfg.dp.max_epsilon:
                    return None
                return f"privacy budget: round {r} would bring epsilon to {eps:.4g} > --max_epsilon={cfg.dp.max_epsilon:g}"

            tb = outputs.TensorBoard(out.file(outputs.TENSORBOARD))
            summary["stop_reason"] = over_budget()
            try:  # outside the deferred blocks below, `state` is always that of round `done`
                while summary["stop_reason"] is None and done < cfg.train.rounds:
                    r = done + 1
                    t0 = time.time()
                    this_cohort = next_cohort()
                    client_data = round_input(cfg, data, this_cohort, r, files)
                    ledger.prefetch()  # PLD: overlaps the accountant with the round
                    try:
                        result = process.next(state, client_data)
                    except RunInterrupted:  # a second stop request cut the round short
                        raise
                    except Exception as e:
                        with signals_deferred():
                            raise _round_failed(r, done, state, records, ckpts, ledger_log, e) from e
                    with signals_deferred():  # the round's bookkeeping and writes are never cut short
                        # Write-ahead: the ledger holds round r before anything computed from it is written.
                        ledger_log.append(r, this_cohort if cfg.records_cohorts else None)
                        state = result.state
                        record, clip = _round_record(cfg, r, this_cohort, result.metrics, clip)
                        record["round_seconds"] = time.time() - t0
                        t_acc = time.time()
                        record.update(ledger.commit(this_cohort))
                        record["accounting_seconds"] = time.time() - t_acc
                        record.update(
                            delta=delta, accountant=cfg.dp.accountant, neighboring_relation=relation,
                            client_sampling=cfg.train.client_sampling,
                        )
                        done, cohort = r, None
                        summary["stop_reason"] = over_budget()
                        last = summary["stop_reason"] is not None or r == cfg.train.rounds
                        if last or (cfg.train.eval_every and r % cfg.train.eval_every == 0):
                            record.update(evaluate(process.get_model_weights(state)))
                        _drop_unreleased(cfg, record)
                        interrupted = stop_requested()
                        if last or interrupted is not None or (
                                cfg.train.checkpoint_every and r % cfg.train.checkpoint_every == 0):
                            ckpts.save(r, state, record, ledger_log)
                        out.append_metrics(record)
                        tb.write(record)
                        records.append(record)
                        _summarize(summary, record)
                        seconds = [x["round_seconds"] for x in records[-20:] if "round_seconds" in x]
                        eta = sum(seconds) / len(seconds) * (cfg.train.rounds - r) if seconds else None
                        log(_progress_line(r, cfg.train.rounds, record, relation, eta=eta))
                    # A signal that waited above is handled here; a second one raises RunInterrupted.
                    interrupted = interrupted or stop_requested()
                    if interrupted is not None:
                        raise interrupted
            except RunInterrupted:
                with signals_deferred():
                    _checkpoint_last_round(done, state, records, ckpts, ledger_log)
                raise
            if summary["stop_reason"]:
                log(f"stopped: {summary['stop_reason']}")
            tb.close()
        summary["status"] = "completed" if summary["stop_reason"] is None else "stopped_at_budget"
    except BaseException as e:  # record why the run stopped, then re-raise
        summary["status"] = f"stopped: {type(e).__name__}: {e}".strip().rstrip(":")
        raise
    finally:
        with signals_deferred():
            ledger.close()
            if cfg.client_metrics:
                summary["wall_seconds"] = time.time() - start
            out.write_json(outputs.SUMMARY, summary)
            out.close()
    if records:
        try:
            plots.plot_run(cfg.output_dir)
        except Exception as e:  # noqa: BLE001  (a plot must never fail a finished run)
            log(f"WARNING: could not write {plots.RUN_PNG}: {e}")
    return RunResult(summary, records)


def dry_run(cfg: ExperimentConfig, overwrite: bool = False, fresh: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Checks everything `run` would check, prints the plan, trains nothing and starts no TFF worker.

    Loads the data, builds and checks the model, calibrates the noise, computes
    the epsilon after `cfg.train.rounds` rounds and checks the output folder as
    a resume would (settings, ledger), without writing anything.

    Returns:
      The plan's figures (also printed through `log`).

    Raises:
      ConfigError, OSError, checkpoints.LedgerError: as `run` would, before training.
    """
    cfg, data, notes = plan.prepare(cfg, log)
    model = keras_model(cfg, data)
    ledger = accounting.make_ledger(cfg)
    try:
        planned = ledger.planned(cfg.train.rounds)
    finally:
        ledger.close()
    folder = _folder_plan(cfg, overwrite, fresh, model)
    for note in notes:
        log(note)
    log("dry run: nothing is trained, no TFF worker is started, nothing is written")
    log(f"task: {data.description}")
    log(f"clients: N = {data.num_clients}, {cfg.train.clients_per_round} per round ({cfg.train.client_sampling})")
    log(f"model: {cfg.train.model}, {model.count_params():,} parameters")
    log(_privacy_line(cfg, planned))
    not_covered = coverage.not_covered(cfg)
    if not_covered:
        log(f"released but not covered by epsilon: {', '.join(not_covered)} (--client_metrics=false leaves them out)")
    log(f"output: {folder}")
    return {
        "num_clients": data.num_clients,
        "model_parameters": int(model.count_params()),
        "epsilon": planned["epsilon"],
        "noise_multiplier": cfg.dp.noise_multiplier,
        "output": folder,
    }


def _folder_plan(cfg: ExperimentConfig, overwrite: bool, fresh: bool, model: tf.keras.Model) -> str:
    """What `run` would do with `cfg.output_dir`, checked as it would be, without writing."""
    path = cfg.output_dir
    if not os.path.exists(path):
        return f"new run in {path}"
    if not os.path.isdir(path):
        raise OSError(f"--output_dir={path}: is a file, not a folder; give a folder path")
    if overwrite:
        return f"{path}: an earlier run there would be deleted (--overwrite), then a new run"
    out = outputs.ExperimentDir(path, cfg.to_dict(), fresh=fresh, create=False)
    if not out.resuming:
        return f"new run in {path}"
    ledger_log = checkpoints.LedgerLog(path)
    ledger_log.load(needs_cohorts=cfg.dp.mode == "local")
    ckpts = checkpoints.CheckpointManager(path)
    checkpoints.check_ledger_covers(ledger_log, path, ckpts.dir)
    ckpts.check_fits(model.trainable_weights + model.non_trainable_weights, cfg.train.model)
    finished = _finished_summary(out, cfg)
    if finished is not None:
        return f"{path} holds this run, already complete ({finished['rounds']} rounds): nothing would be done"
    done = max(ckpts.rounds(), default=0)
    return (f"resumes {path} from its newest checkpoint (round {done}); its ledger holds {ledger_log.count} "
            f"release(s)")


def _finished_summary(out: outputs.ExperimentDir, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The folder's summary if its run has nothing left to do under `cfg`, else None.

    Finished: completed with at least `cfg.train.rounds` rounds, or stopped at
    the budget guard with a `--max_epsilon` that is not larger now.
    """
    summary = out.read_summary()
    if summary is None or not isinstance(summary.get("rounds"), int):
        return None
    if summary.get("status") == "completed" and summary["rounds"] >= cfg.train.rounds:
        return summary
    old = (out.previous_hparams or {}).get("dp", {}).get("max_epsilon")
    new = cfg.dp.max_epsilon
    if summary.get("status") == "stopped_at_budget" and new is not None and old is not None and new <= old:
        return summary
    return None


class RoundFailed(RuntimeError):
    """A round's TFF computation failed; the last completed round is checkpointed."""


def _checkpoint_last_round(done, state, records, ckpts, ledger_log) -> bool:
    """Checkpoints round `done` (state `state`) unless it is; False if no round was completed."""
    if done <= 0 or not records:
        return False
    if done not in ckpts.rounds():
        ckpts.save(done, state, records[-1], ledger_log)
    return True


def _round_failed(r, done, state, records, ckpts, ledger_log, error: Exception) -> RoundFailed:
    """Checkpoints round `done` (if not yet) so that a rerun resumes there; returns the error to raise."""
    saved = ""
    if _checkpoint_last_round(done, state, records, ckpts, ledger_log):
        saved = f"; round {done} is checkpointed: rerun the same command to resume from it"
    cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return RoundFailed(f"round {r} failed: {type(error).__name__}: {cause}{saved}")


def _resume(out, ckpts, ledger_log, ledger, state, clip, log):
    """Restores model state, accountant and metrics of an interrupted run. Returns (round, state, clip, records).

    The ledger was verified before (`checkpoints.check_ledger_covers`); every
    release it holds is replayed into the accountant, also those after the
    checkpoint, which are about to be re-run.
    """
    done, record = 0, None
    loaded = ckpts.load_latest(state)
    if loaded is not None:
        done, state, record = loaded
        if record.get("next_clip_norm") is not None:
            clip = record["next_clip_norm"]
    elif ckpts.rounds():
        log(f"WARNING: no checkpoint in {ckpts.dir} is readable: the run restarts from round 1 "
            f"(the ledger keeps its {ledger_log.count} release(s): epsilon counts them)")
    elif ledger_log.count:
        log(f"no checkpoint was written: the run restarts from round 1 "
            f"(the ledger keeps its {ledger_log.count} release(s): epsilon counts them)")
    for entry in ledger_log.entries:
        ledger.replay(entry.get("cohort"))
    records = out.truncate_metrics(done, record)
    return done, state, clip, records


def _summarize(summary: dict[str, Any], record: dict[str, Any]) -> None:
    summary.update(rounds=record["round"], epsilon=record["epsilon"], rounds_accounted=record["rounds_accounted"])
    for key in ("local_epsilon", "epsilon_analysis", "max_participations", "local_epsilon_pure"):
        if key in record:
            summary[key] = record[key]
    if "test_accuracy" in record:
        summary.update(final_test_accuracy=record["test_accuracy"], final_test_loss=record["test_loss"])


def _round_record(cfg: ExperimentConfig, r: int, cohort, metrics, clip):
    """The round's metrics line (before accounting), and the clip of the next round.

    Under local DP the process returns no client statistic, and none is
    recorded; `_drop_unreleased` then removes what `cfg` does not release.
    """
    record: dict[str, Any] = {"round": r, "clients_this_round": len(cohort), "clip_norm": clip}
    aggregator = metrics["aggregator"]
    if cfg.dp.mode != "local":
        train = metrics["client_work"]["train"]
        record.update(
            train_loss=float(train["loss"]) if len(cohort) else None,
            train_accuracy=float(train["accuracy"]) if len(cohort) else None,
            nonfinite_clients=int(aggregator["nonfinite_clients"]),
        )
    inner = aggregator.get("inner", aggregator)
    if cfg.dp.mode == "central":
        query_metrics = inner.get("dp_query_metrics", {})
        if "clip" in query_metrics:
            clip = float(query_metrics["clip"])
        record["next_clip_norm"] = clip
    elif cfg.dp.mode == "local":
        record["next_clip_norm"] = clip
        key = "noise_std" if cfg.dp.local_mechanism == "gaussian" else "laplace_scale"
        record[key] = float(inner[key])
    return record, clip


def _drop_unreleased(cfg: ExperimentConfig, record: dict[str, Any]) -> None:
    """Removes from `record` every field `cfg` does not release (`privacy.coverage`)."""
    if not cfg.client_metrics:
        for key in (*coverage.CLIENT_TRAINING_FIELDS, *coverage.TIMING_FIELDS):
            record.pop(key, None)
    if not coverage.cohort_size_released(cfg):
        record.pop(coverage.COHORT_SIZE_FIELD, None)


def _progress_line(r: int, total: int, rec: dict[str, Any], relation: str | None, eta: float | None = 0.0) -> str:
    parts = [f"round {r}/{total}"]
    if "clients_this_round" in rec:
        parts.append(f"clients {rec['clients_this_round']}")
    if "train_loss" in rec:
        parts += [f"loss {_fmt(rec['train_loss'])}", f"acc {_fmt(rec['train_accuracy'])}"]
    if "test_accuracy" in rec:
        parts.append(f"test acc {rec['test_accuracy']:.4f}")
    if relation is None:
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
