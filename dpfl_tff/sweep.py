"""A sweep: a grid of runs (flag values x seeds), each in its own run folder, run one after another.

`expand(base, axes, seeds)` turns the base configuration and the grid into
runs, each with a stable, filesystem-safe name made of its grid settings and
its seed (`dp_mode=central,noise_multiplier=0.5,seed=1`, keys sorted), whose
folder is `<base.output_dir>/<name>`. Every run's configuration passes the
same checks as a single run (`plan.check`) before anything is trained.

Rules (documented in docs/outputs-and-resume.md "Sweeps"):

* `--seeds=S` runs the seeds `base.train.seed .. base.train.seed + S - 1`
  (`--seed` seeds the client split, data order and model init; cohorts and DP
  noise come from OS entropy in every run anyway).
* A mode with a DP guarantee and `noise_multiplier=0` (and no
  `--target_epsilon`) is refused by the configuration (zero noise gives no
  privacy); in a grid it becomes the run without DP (`dp_mode=none`): the
  no-DP baseline of a noise sweep. Central and local runs at z=0 thus share
  one baseline run per seed.
* A mode without DP ignores every privacy flag but `--dp_mode`: its runs take
  the base configuration's privacy flags with `noise_multiplier=0` and no
  `--target_epsilon`/`--max_epsilon`, and their names leave the privacy keys
  out, so one such run per seed (and other settings) is run, not one per
  noise level.
* Sweeping `--noise_multiplier` while `--target_epsilon` is set or swept is
  refused (calibration would ignore the values); `--output_dir`, `--seed` and
  list flags (`--workers`) cannot be swept.

`run_all` runs the runs in order with `training.run`, which resumes an
unfinished folder and leaves a finished one as it is, so rerunning a sweep
skips what is done and continues what was interrupted. A run folder held by
another process (`folder_lock`) is skipped and reported: two sweeps started on
one --output_dir share its runs, one run in each folder at a time.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from dpfl_tff import config as C
from dpfl_tff import folder_lock, outputs, plan
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import registry

_SECTIONS = (("task", C.TaskConfig), ("train", C.TrainConfig), ("dp", C.DPConfig), (None, C.ExperimentConfig))
# flag name -> (section attribute of ExperimentConfig or None, field name)
FLAG_FIELDS: dict[str, tuple[str | None, dataclasses.Field]] = {
    flag: (section, field) for section, cls in _SECTIONS for flag, field in C.flag_fields(cls)
}
PRIVACY_FLAGS = tuple(flag for flag, _ in C.flag_fields(C.DPConfig))
NO_DP_MODE = next(name for name, m in registry.MECHANISMS.items() if not m.provides_dp)
# Flags that cannot be grid keys, and why.
NOT_SWEPT = {
    "output_dir": "it is the sweep's folder; each run's folder is <output_dir>/<run name>",
    "seed": "use --seeds=S (seeds --seed .. --seed+S-1)",
}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One `--grid` entry: a flag and its values (already parsed to the flag's type)."""

    flag: str
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the sweep: its settings (grid flags after the rules above), seed and configuration."""

    setting: str  # the settings part of the name ("" when the grid is empty)
    settings: tuple[tuple[str, Any], ...]
    seed: int
    cfg: C.ExperimentConfig

    @property
    def name(self) -> str:
        return f"{self.setting},seed={self.seed}" if self.setting else f"seed={self.seed}"


@dataclasses.dataclass
class SweepPlan:
    runs: list[Run]
    keys: list[str]  # the grid's flags, sorted (the tables' setting columns)
    seeds: list[int]
    notes: list[str]

    @property
    def settings(self) -> list[str]:
        """The distinct settings, in run order."""
        return list(dict.fromkeys(r.setting for r in self.runs))


def split_spec(spec: str) -> tuple[str, list[str]]:
    """`flag=v1,v2,...` -> (flag, [v1, v2, ...]); ConfigError (one line) if malformed."""
    name, sep, values = spec.partition("=")
    name = name.strip().removeprefix("--")
    raw = [v.strip() for v in values.split(",")]
    if not sep or not name or not values.strip() or any(not v for v in raw):
        raise ConfigError(f"--grid={spec}: must be flag=value1,value2,... (e.g. --grid=noise_multiplier=0.5,1,2)")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"--grid={spec}: a value is repeated")
    return name, raw


def check_key(name: str, spec: str) -> None:
    """Raises ConfigError unless `name` is a configuration flag that can be swept."""
    if name in NOT_SWEPT:
        raise ConfigError(f"--grid={spec}: --{name} cannot be swept: {NOT_SWEPT[name]}")
    if name not in FLAG_FIELDS:
        close = difflib.get_close_matches(name, FLAG_FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--grid={spec}: unknown flag --{name}{hint}; a grid key is a flag of run_federated")
    if str(FLAG_FIELDS[name][1].type).startswith("tuple"):
        raise ConfigError(f"--grid={spec}: --{name} is a list flag and cannot be swept")


def with_flag(cfg: C.ExperimentConfig, flag: str, value: Any) -> C.ExperimentConfig:
    """`cfg` with the field behind `flag` set to `value`."""
    section, field = FLAG_FIELDS[flag]
    if section is None:
        return dataclasses.replace(cfg, **{field.name: value})
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field.name: value})})


def value_text(value: Any) -> str:
    """A value as it appears in a run name: `0.5`, `1` (for 1.0), `1e-05`, `true`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def safe_name(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._+=,-] replaced by `_` (a folder name anywhere)."""
    return re.sub(r"[^A-Za-z0-9._+=,-]", "_", text)


def _resolve(base: C.ExperimentConfig, settings: dict[str, Any], keys: list[str]
             ) -> tuple[dict[str, Any], C.ExperimentConfig, list[str]]:
    """The settings after the module docstring's rules, their configuration (seed not set yet), notes."""
    cfg, notes = base, []
    for flag, value in settings.items():
        cfg = with_flag(cfg, flag, value)
    if cfg.dp.dp_level == "example":  # record-level DP (its own mechanism, dp_mode none): never the no-DP run
        return settings, cfg, notes
    mechanism = registry.MECHANISMS.get(cfg.dp.mode)
    if mechanism is None:  # an unknown --dp_mode: plan.check names it
        return settings, cfg, notes
    if mechanism.provides_dp and cfg.dp.noise_multiplier == 0 and cfg.dp.target_epsilon is None:
        notes.append(f"noise_multiplier=0 with a DP mode runs as dp_mode={NO_DP_MODE}, the no-DP baseline (zero "
                     "noise gives no DP guarantee, so the DP modes refuse it)")
        mechanism = registry.MECHANISMS[NO_DP_MODE]
    if mechanism.provides_dp:
        return settings, cfg, notes
    settings = {k: v for k, v in settings.items() if k not in PRIVACY_FLAGS}
    if "dp_mode" in keys or base.dp.mode != NO_DP_MODE:
        settings["dp_mode"] = NO_DP_MODE
    dp = dataclasses.replace(base.dp, mode=NO_DP_MODE, noise_multiplier=0.0, target_epsilon=None, max_epsilon=None)
    cfg = dataclasses.replace(cfg, dp=dp)
    return settings, cfg, notes


def expand(base: C.ExperimentConfig, axes: Sequence[Axis], seeds: int) -> SweepPlan:
    """Every run of the grid `axes` x `seeds` seeds around `base`, named, collapsed and checked.

    Raises:
      ConfigError: a bad grid (repeated key, a key that cannot be swept), a
        combination a single run would refuse (the message names the run), or
        two settings whose folder names would clash.
    """
    keys = [a.flag for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: a flag is given twice ({', '.join(sorted(k for k in keys if keys.count(k) > 1))});"
                          " list all its values in one --grid=flag=v1,v2")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds={seeds}: must be an integer >= 1")
    if "noise_multiplier" in keys and (base.dp.target_epsilon is not None or "target_epsilon" in keys):
        raise ConfigError("--grid=noise_multiplier with --target_epsilon: the noise is calibrated to the target, so "
                          "the grid's noise values would be ignored; sweep one of the two")
    resolved: dict[str, tuple[tuple[tuple[str, Any], ...], C.ExperimentConfig]] = {}
    combinations: dict[str, int] = {}
    notes: list[str] = []
    for values in itertools.product(*(a.values for a in axes)):
        settings, cfg, why = _resolve(base, dict(zip(keys, values)), keys)
        notes += [n for n in why if n not in notes]
        items = tuple(sorted(settings.items()))
        setting = safe_name(",".join(f"{k}={value_text(v)}" for k, v in items))
        if setting in resolved and resolved[setting][0] != items:
            raise ConfigError(f"--grid: two settings would share the run folder name {setting!r}; "
                              "give values that differ in letters, digits or . + -")
        resolved.setdefault(setting, (items, cfg))
        combinations[setting] = combinations.get(setting, 0) + 1
    notes += [f"{k} grid combinations are the same run {setting} (dp_mode={NO_DP_MODE} ignores the privacy "
              "flags): it runs once per seed" for setting, k in combinations.items() if k > 1]
    first = base.train.seed
    runs = []
    for setting, (items, cfg) in resolved.items():
        checked_dp = None  # the setting's privacy settings as `plan.check` resolved them (--bands=auto's B)
        for seed in range(first, first + seeds):
            run = Run(setting, items, seed, cfg)
            run = dataclasses.replace(run, cfg=dataclasses.replace(
                with_flag(cfg, "seed", seed), output_dir=os.path.join(base.output_dir, run.name)))
            try:  # the accountant's checks (and what they resolve) do not depend on the seed: once per setting
                if checked_dp is None:
                    run = dataclasses.replace(run, cfg=plan.check(run.cfg))
                    checked_dp = run.cfg.dp
                else:
                    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, dp=checked_dp).validate())
            except ConfigError as e:
                raise ConfigError(f"--grid: run {run.name}: {e}") from e
            runs.append(run)
    return SweepPlan(runs, sorted(keys), list(range(first, first + seeds)), notes)


def planned_epsilon(cfg: C.ExperimentConfig) -> dict[str, Any]:
    """The accountant's figures after `cfg.train.rounds` rounds (calibrating first), without training.

    A run folder that already holds releases is accounted as its resume would be: its verified ledger
    first (`resume.read_history`), then the rounds after its newest checkpoint. `cfg` must have its N
    known (tasks with their own client split: after loading them).

    Raises:
      LedgerError: the run folder's ledger is damaged or does not cover its releases (its run would refuse
        to resume).
    """
    from dpfl_tff import resume
    from dpfl_tff.privacy import accounting, truncation

    from dpfl_tff.privacy import bands_auto

    cfg = accounting.with_calibrated_noise(plan.check(cfg))  # plan.check: --bands=auto resolved
    mechanism = registry.mechanism_for(cfg)
    history = resume.read_history(cfg, mechanism)
    if history.entries and folder_status(cfg) == "finished":  # nothing left to run: the ledger's own figure
        history = dataclasses.replace(history, resume_round=max(history.resume_round, cfg.train.rounds))
    out = dict(mechanism.accounting.projected(list(history.entries), history.resume_round, cfg.train.rounds))
    out.update(noise_multiplier=cfg.dp.noise_multiplier,
               delta=truncation.stated_delta(cfg.target_delta, out["delta_sampler"]),
               neighboring_relation=mechanism.neighboring_relation, accountant=cfg.dp.accountant,
               releases_so_far=history.releases, **bands_auto.summary_fields(cfg))
    return out


def folder_status(cfg: C.ExperimentConfig) -> str:
    """`new`, `finished`, `unfinished (k rounds)` (from the run folder's summary.json) or `in use by ...`.

    The run itself checks the folder (settings, ledger, checkpoint) before it resumes or skips it.
    """
    try:
        with folder_lock.probe(cfg.output_dir):
            pass
    except folder_lock.FolderInUse as e:
        return str(e).split(": ", 1)[-1]  # "in use by another run (pid ... on host ...); ..."
    if not os.path.isdir(cfg.output_dir) or not set(os.listdir(cfg.output_dir)) - {folder_lock.LOCK_FILE}:
        return "new"
    summary = outputs.read_summary(cfg.output_dir) or {}
    rounds = summary.get("rounds", 0)
    if summary.get("status") == "stopped_at_budget" or (
            summary.get("status") == "completed" and isinstance(rounds, int) and rounds >= cfg.train.rounds):
        return "finished"
    return f"unfinished ({rounds} rounds)"


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (Linux /proc), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_all(sweep: SweepPlan, *, overwrite: bool = False, fresh: bool = False,
            log: Callable[[str], None] = print,
            stop_requested: Callable[[], Any] = lambda: None,
            before_run: Callable[[Run], None] = lambda run: None,
            after_run: Callable[[Run, Any], None] = lambda run, result: None,
            skipped: list[str] | None = None) -> list[str]:
    """Runs every run of `sweep` in order with `training.run`; returns the names of those it trained.

    A finished run folder is left as it is, an unfinished one resumed
    (`training.run`). A run whose folder another process holds (another sweep
    on the same --output_dir, or a single run) is skipped with a line saying
    who holds it, and its name appended to `skipped`: two sweeps on one folder
    share its runs. `stop_requested` is polled after every round and before
    each run: the exception it returns (`training.RunInterrupted`) stops the
    current run after its round (checkpointed) and is raised here.
    `before_run(run)` and `after_run(run, result)` are called around each run (trained or skipped).
    Run inside one TFF context (`runtime.local_context()`) to share one worker.
    """
    from dpfl_tff import runtime, training

    trained = []
    for i, run in enumerate(sweep.runs, 1):
        stop = stop_requested()
        if stop is not None:
            raise stop
        log(f"[{i}/{len(sweep.runs)}] {run.name}")
        before_run(run)
        try:
            result = training.run(run.cfg, overwrite=overwrite, log=log, stop_requested=stop_requested, fresh=fresh)
        except folder_lock.FolderInUse as e:
            log(f"[{i}/{len(sweep.runs)}] {run.name}: skipped, {str(e).split(': ', 1)[-1]}")
            if skipped is not None:
                skipped.append(run.name)
            continue
        if not result.already_complete:
            trained.append(run.name)
            workers = runtime.live_worker_pids()
            rss = [rss_bytes(), *(rss_bytes(p) for p in workers)]
            if all(r is not None for r in rss):
                log(f"[{i}/{len(sweep.runs)}] memory after the run: python {rss[0] / 2**20:.0f} MiB"
                    + "".join(f", TFF worker {r / 2**20:.0f} MiB" for r in rss[1:]))
        _forget_run()
        after_run(run, result)
    return trained


def _forget_run() -> None:
    """Drops what this process keeps of a finished run: TFF's compiled computations, Keras' global state.

    TFF caches up to 128 compiled computations for the life of the process
    (`CompilerPipeline.compile`'s `lru_cache`), and Keras keeps its global
    graph and layer-name counters: each run adds to both. (The shared TFF
    worker's values are cleared by `runtime.execution_context` when the run
    leaves it.)

    The collection after the first run also freezes what survives it
    (`gc.freeze`: the modules, TensorFlow's and TFF's own state): a full
    collection then walks only what later runs made, ~0.02 s instead of
    ~0.25 s per run with TensorFlow loaded. Reference counting still frees
    frozen objects; only a cycle among them that became garbage would stay.
    """
    import gc

    import tensorflow as tf
    from tensorflow_federated.python.core.impl.execution_contexts import compiler_pipeline

    compiler_pipeline.CompilerPipeline.compile.cache_clear()
    tf.keras.backend.clear_session()
    gc.collect()
    if not gc.get_freeze_count():
        gc.freeze()
