"""Runs a grid of experiments (flag values x seeds), one run folder each, and tabulates and plots them.

  uv run python -m experiments.sweep --flagfile=configs/quickstart.cfg \
      --grid=dp_mode=central,local --grid=noise_multiplier=0,0.5,1,2 --seeds=3 --output_dir=runs/sweep

Every combination of the --grid values runs --seeds times (seeds --seed ..
--seed+S-1) as its own run in <output_dir>/<name>, named from its settings
(e.g. dp_mode=central,noise_multiplier=0.5,seed=1), one after another in this
process, sharing one local TFF worker. Flags other than --grid and --seeds are
the base of every run, as for run_federated. --parallel=P trains P runs at
once: P copies of this command, each given every P-th run (through the
environment variable DPFL_SWEEP_SHARD=i/P) and pinned to its own cores, each
with its own local TFF worker (its output in worker-<i>.log); this process
waits for them and writes the tables. A finished run is skipped, an
unfinished one resumed, so rerunning the same command continues a sweep; a
run whose folder another process holds (e.g. the same sweep started twice) is
skipped and reported, so two sweeps on one --output_dir share its runs.
noise_multiplier=0 with a DP mode runs as dp_mode=none (the no-DP baseline),
and dp_mode=none runs once per seed whatever the privacy flags' grid values.

Writes results.csv, results.md (one row per setting: epsilon, delta,
relation, accountant, test accuracy mean +- sample std over seeds, rounds,
wall time) and privacy_utility.png to --output_dir, after every run. --dry_run
lists the runs and their epsilons (accountant only) without training.
--select=private draws candidates from the grid a random number of times, trains each as its own DP run,
scores it privately and releases the best under one epsilon (RepeatAndSelect, RDP): selection.json and
results.md say which run and what the whole procedure spent; --select=public selects on the server's test
set (docs/privacy.md#private-hyperparameter-selection). A plain sweep's selection is not covered by epsilon.
Exit codes: 0 done, 2 bad flags or grid, or a run folder that cannot be used,
1 a round failed, 128+signal when stopped by one (Ctrl-C stops after the
current round of the current run; rerun to continue).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Callable

from absl import app, flags, logging

from dpfl_tff import errors, parallel_sweep, selection_sweep, sweep, sweep_results
from dpfl_tff.config import ConfigError
from dpfl_tff.errors import DataFileError
from experiments import cli
from experiments import flags as dpfl_flags
from experiments import selection_flags
from experiments.run_federated import Signals

GRID = flags.DEFINE_multi_string(
    "grid", [],
    "flag=value1,value2,...: a flag of run_federated and the values to sweep, checked like the flag's own "
    "(e.g. --grid=noise_multiplier=0,0.5,1); every combination of the --grid flags runs",
)
SEEDS = flags.DEFINE_integer(
    "seeds", 1, "Runs per setting (>= 1), with --seed, --seed+1, ..., --seed+S-1.",
)
PARALLEL = flags.DEFINE_integer(
    "parallel", 1,
    "Runs trained at once (from 1 to the number of cores this process may use): each "
    "in its own process with its own local TFF worker, pinned to its own cores. 1: one after another in this "
    "process. Not with --workers or --select=private.",
)
GROUPS = (*dpfl_flags.GROUPS, ("sweep", (GRID, SEEDS, PARALLEL, *selection_flags.register_for(__name__))))


_PREFIX: list[str] = [""]  # "p2: " in copy 2 of a --parallel sweep


def _log(line: str) -> None:
    cli.say(_PREFIX[0] + line)


def _axes(specs: list[str]) -> list[sweep.Axis]:
    """The --grid entries, each value parsed and range-checked as its flag would be."""
    axes = []
    for spec in specs:
        name, raw = sweep.split_spec(spec)
        sweep.check_key(name, spec)
        values = []
        for text in raw:
            try:
                values.append(flags.FLAGS[name].parser.parse(text))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--grid={spec}: {text!r} is not a valid --{name} ({e})") from e
        axes.append(sweep.Axis(name, tuple(values)))
    return axes


def _dry_run(plan: sweep.SweepPlan, base) -> None:
    runs = plan.runs
    if not base.task.n_is_known:  # a task with its own client split: N is its data's
        from dpfl_tff.tasks import load_task

        n = load_task(base.task, base.train.seed).num_clients
        runs = [dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, task=dataclasses.replace(
            r.cfg.task, num_clients=n, num_clients_known=True))) for r in runs]
    figures: dict[str, dict] = {}
    for run in runs:
        if run.setting not in figures:
            figures[run.setting] = sweep.planned_epsilon(run.cfg)
        f = figures[run.setting]
        if math.isinf(f["epsilon"]):
            eps = "epsilon inf (no DP)"
        else:
            local = f" (local epsilon {f['local_epsilon']:.4g})" if "local_epsilon" in f else ""
            history = f" (with the {f['releases_so_far']} release(s) in its ledger)" if f["releases_so_far"] else ""
            eps = (f"epsilon {f['epsilon']:.4g}{local}{history} at delta {f['delta']:.3g} "
                   f"({f['neighboring_relation'].replace('_', '-')}, {f['accountant'].upper()}), "
                   f"z={f['noise_multiplier']:.4g}" + (f", bands auto -> B={f['bands_chosen']}" if "bands_chosen" in f
                                                       else ""))
        _log(f"{run.name}: {eps} after {run.cfg.train.rounds} rounds; {sweep.folder_status(run.cfg)}")
    _log(f"dry run: {len(runs)} runs in {base.output_dir}; nothing is trained, no TFF worker is started, "
         "nothing is written")


def _checked_dry_run(plan: sweep.SweepPlan, base) -> None:
    """`_dry_run`, its usage errors printed as one line with exit 2."""
    try:
        _dry_run(plan, base)
    except (ConfigError, DataFileError, OSError) as e:
        cli.usage_error(str(e))
    except errors.LedgerError as e:
        cli.usage_error(f"cannot plan a resume: {e}")


def _finish(plan: sweep.SweepPlan, folder: str, section: Callable[[], str | None] = lambda: None) -> None:
    """Writes the tables and the plot of what is finished (`section`: the selection's), and prints the table."""
    table, _ = sweep_results.write_all(plan, folder, section())
    if table:
        with open(os.path.join(folder, sweep_results.RESULTS_MD), encoding="utf-8") as f:
            _log(f.read().rstrip())


def _train(plan: sweep.SweepPlan, base, skipped: list[str],
           after_run: Callable[[sweep.Run, object], None] | None = None,
           section: Callable[[], str | None] = lambda: None) -> list[str]:
    """Runs the sweep in one TFF context; exits as run_federated does on a stop or an error.

    Runs whose folder another process holds are skipped and appended to `skipped`. `after_run(run, result)`
    (a private selection's scoring) runs after each run, before the tables are written with `section()`.
    """
    from dpfl_tff import runtime  # TensorFlow: only once the sweep's settings are checked

    copy = parallel_sweep.shard()
    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    current: list[sweep.Run] = []
    where = lambda: f"run {current[-1].name}: " if current else ""  # noqa: E731
    folder = base.output_dir
    try:
        os.makedirs(folder, exist_ok=True)
        # One local worker for every run (a --workers sweep uses the remote workers run by run).
        log_name = "worker.log" if copy is None else f"worker-{copy[0] + 1}.log"
        context = runtime.execution_context((), os.path.join(folder, log_name)) if not base.workers \
            else contextlib.nullcontext()
        with context:
            return sweep.run_all(plan, overwrite=dpfl_flags.OVERWRITE.value, fresh=dpfl_flags.FRESH.value,
                                 log=_log, stop_requested=signals.stop_requested, before_run=current.append,
                                 after_run=lambda run, result: (after_run and after_run(run, result),
                                                                sweep_results.write_tables(plan, folder, section())),
                                 skipped=skipped)
    except errors.RunInterrupted as e:
        _finish(plan, folder, section)
        print(f"{e}: {where()}{e.checkpoint_note}; results of the finished runs written to "
              f"{folder}; rerun the same command to continue", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (ConfigError, DataFileError, FileExistsError, OSError, runtime.WorkersUnreachable) as e:
        cli.usage_error(f"{where()}{e}")
    except errors.LedgerError as e:
        cli.usage_error(f"{where()}cannot resume: {e}. Nothing was changed; restore the ledger, or remove that "
                        "run's folder")
    except (errors.RoundFailed, runtime.WorkerLost) as e:
        _finish(plan, folder, section)
        print(f"error: {where()}{e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _checked_parallel(base, sel) -> int:
    """--parallel, checked against the cores and the flags it cannot go with."""
    p, cores = PARALLEL.value, len(parallel_sweep.usable_cores())
    if parallel_sweep.shard() is not None:  # a copy: pinned to its share of the cores the parent checked
        return 1
    if not 1 <= p <= cores:
        raise ConfigError(f"--parallel={p}: must be between 1 and {cores} (the cores this process may use: one "
                          "or more per run trained at once)")
    if p > 1 and base.workers:
        raise ConfigError(f"--parallel={p}: with --workers every run uses the remote workers; leave --parallel at 1")
    if p > 1 and sel.select == "private":
        raise ConfigError(f"--parallel={p}: --select=private scores each candidate as it finishes, one after "
                          "another; leave --parallel at 1")
    return p


def _given_flags() -> list[str]:
    """The flags this sweep was given (its --flagfile's included, expanded), as a copy of it is given them."""
    given = [flags.FLAGS[name] for name in flags.FLAGS if flags.FLAGS[name].present and name != "flagfile"]
    return [line for flag in dict.fromkeys(given) for line in flag.serialize().splitlines()]


def _train_parallel(plan: sweep.SweepPlan, base, parallel: int, section: Callable[[], str | None]) -> list[str]:
    """Trains the sweep in `parallel` pinned copies of this command (`parallel_sweep`); exits as `_train` does."""
    before = {run.name: sweep.folder_status(run.cfg) for run in plan.runs}
    pending = [run for run in plan.runs if before[run.name] != "finished"]
    parallel = max(1, min(parallel, len(pending)))
    cores = parallel_sweep.usable_cores()
    for i in range(parallel):
        runs = parallel_sweep.share(plan.runs, i, parallel)
        _log(f"p{i + 1}: {len(runs)} runs on core(s) {','.join(map(str, parallel_sweep.cores_of(i, parallel, cores)))}"
             f", its own TFF worker (worker-{i + 1}.log)")
    os.makedirs(base.output_dir, exist_ok=True)
    codes = parallel_sweep.wait(parallel_sweep.spawn(_given_flags(), parallel, cores), _log)
    status = parallel_sweep.exit_code(codes)
    if status:
        _finish(plan, base.output_dir, section)
        what = "stopped" if status > 128 else "failed"
        print(f"sweep {what}: exit codes {codes} of its {parallel} processes; results of the finished runs written "
              f"to {base.output_dir}; rerun the same command to continue", file=sys.stderr, flush=True)
        sys.exit(status)
    return [run.name for run in pending if sweep.folder_status(run.cfg) == "finished"]


def _private(grid: sweep.SweepPlan, base, sel) -> None:
    """--select=private: draw (or read) the candidates, say what the sweep may spend, train and score them."""
    dry = dpfl_flags.DRY_RUN.value
    try:
        private = selection_sweep.PrivateSelection(grid, base, sel, write=not dry)
    except (ConfigError, DataFileError, OSError) as e:
        cli.usage_error(str(e))
    _log(private.draw_line())
    _log(private.privacy_line())
    plan = private.plan
    if dry:
        if private.drawn_now:
            _log(f"dry run: K is drawn when the sweep starts (this dry run's draw is not kept); the grid has "
                 f"{len(grid.settings)} settings in {base.output_dir}; nothing is trained or written")
            return
        _checked_dry_run(plan, base)
        return
    skipped: list[str] = []
    trained = _train(plan, base, skipped, after_run=lambda run, result: private.score(run, result, _log),
                     section=private.section)
    out = private.finish()
    with open(os.path.join(base.output_dir, sweep_results.RESULTS_MD), encoding="utf-8") as f:
        _log(f.read().rstrip())
    chosen = (f"released run {out['selected_run']} (private score {out['selected_score']:.4f})"
              if out["selected_run"] else "no run released yet" if out["count"] else "K = 0: nothing to release")
    _log(f"selection done: {len(plan.runs)} candidate(s) ({len(trained)} trained now); {chosen}; procedure "
         f"epsilon {out['procedure_epsilon']:.4g} at delta {out['delta']:.3g}; selection.json and results.md in "
         f"{base.output_dir}")


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    try:
        base = dpfl_flags.experiment_config()
        sel = selection_flags.selection_config()
        if sel.select == "private" and SEEDS.value != 1:
            raise ConfigError(f"--seeds={SEEDS.value}: with --select=private each candidate is one run with its "
                              "own seed (--seed + its index); leave --seeds at 1")
        plan = sweep.expand(base, _axes(GRID.value), SEEDS.value)
        parallel = _checked_parallel(base, sel)
        copy = parallel_sweep.shard()
    except (ConfigError, ValueError) as e:
        cli.usage_error(str(e))
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFF logs every model build at INFO
    if copy is not None:  # one copy of a --parallel sweep: its share of the runs, the parent says the rest
        _PREFIX[0] = f"p{copy[0] + 1}: "
        plan = dataclasses.replace(plan, runs=parallel_sweep.share(plan.runs, *copy))
        _train(plan, base, [])
        return
    for note in plan.notes:
        _log(f"note: {note}")
    if sel.select == "private":
        _private(plan, base, sel)
        return
    _log(f"sweep: {len(plan.settings)} settings x {len(plan.seeds)} seeds = {len(plan.runs)} runs in {base.output_dir}")
    try:
        composed = selection_sweep.plain_composition(plan, base)
    except ConfigError as e:
        cli.usage_error(str(e))
    if composed is not None and math.isinf(composed):
        _log("privacy: the whole sweep has no epsilon bound: it has runs without DP; each DP run's own epsilon "
             "is on its line")
    elif composed is not None:
        _log(f"privacy: the whole sweep may spend epsilon {composed:.4g} at delta {base.target_delta:.3g} (RDP, "
             f"plain composition of its {len(plan.runs)} runs): what releasing them all, or picking the best by "
             "their results, spends; each run's own epsilon is on its line")
    if dpfl_flags.DRY_RUN.value:
        _checked_dry_run(plan, base)
        return
    public = sel.select == "public"
    section = (lambda: selection_sweep.public_summary(plan, base)[1]) if public else (lambda: None)
    skipped: list[str] = []
    if parallel > 1:
        trained = _train_parallel(plan, base, parallel, section)
    else:
        trained = _train(plan, base, skipped, section=section)
    if public:
        selection_sweep.write_json(base.output_dir, "selection.json", selection_sweep.public_summary(plan, base)[0])
    _finish(plan, base.output_dir, section)
    busy = (f", {len(skipped)} skipped: run by another process now (rerun when it ends to tabulate them)"
            if skipped else "")
    _log(f"sweep done: {len(plan.runs)} runs ({len(trained)} trained now, "
         f"{len(plan.runs) - len(trained) - len(skipped)} already complete{busy}); {sweep_results.RESULTS_MD}, "
         f"{sweep_results.RESULTS_CSV} and {sweep_results.PRIVACY_UTILITY_PNG} in {base.output_dir}")


def run() -> None:
    cli.run(main, __doc__, GROUPS)


if __name__ == "__main__":
    run()
