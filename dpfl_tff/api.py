"""The Python API: a configuration from flag names, a run with the driver's guarantees, epsilon without TensorFlow.

  import dpfl_tff
  cfg = dpfl_tff.make_config(flagfile="configs/quickstart.cfg", rounds=20, output_dir="runs/py")
  result = dpfl_tff.run(cfg)                  # what `experiments.run_federated` does, in this process
  result.records[-1]["test_accuracy"], result.epsilon, result.model()
  dpfl_tff.epsilon(num_clients=3383, clients_per_round=120, noise_multiplier=1.2, rounds=100, target_delta=1e-5)

Keyword arguments are the drivers' flag names and take their values
(docs/flags.md); a flagfile is read as the drivers read it (later keywords win
over it), and the same defaults apply (the privacy mode's client sampling when
--client_sampling is set nowhere, a text task's paper model). `run` is
`training.run`: one run per folder (its lock), the write-ahead ledger,
checkpoints, resume of a folder holding the same run, the TFF worker started
and shut down (or an enclosing `runtime.local_context()` reused), and
final_model.keras. TensorFlow's and TFF's INFO logs are silenced unless the
caller set TF_CPP_MIN_LOG_LEVEL or absl's verbosity. `make_config` and `epsilon`
import no TensorFlow (dp-accounting only).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from dpfl_tff import config as C
from dpfl_tff.errors import ConfigError

_SECTIONS = ((C.TaskConfig, "task"), (C.TrainConfig, "train"), (C.DPConfig, "dp"), (C.ExperimentConfig, None))


def _flag_values(flagfile: str | None, given: dict[str, Any]):
    """absl FlagValues of every configuration flag, read from `flagfile`, then set from `given`."""
    from absl import flags

    class IntOrAuto(flags.ArgumentParser):  # --bands: an integer or auto
        def parse(self, argument):
            return C.parse_int_or_auto(argument)

    define = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer, "int | None": flags.DEFINE_integer,
              "float": flags.DEFINE_float, "float | None": flags.DEFINE_float, "bool": flags.DEFINE_bool,
              "tuple[str, ...]": flags.DEFINE_list,
              "int | str": lambda name, default, help_text, flag_values: flags.DEFINE(
                  IntOrAuto(), name, default, help_text, flag_values=flag_values)}
    fv = flags.FlagValues()
    for cls, _ in _SECTIONS:
        for name, field in C.flag_fields(cls):
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            define[str(field.type)](name, default, field.metadata["help"], flag_values=fv)
    argv = ["dpfl_tff"] + ([f"--flagfile={flagfile}"] if flagfile is not None else [])
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError(" ".join(str(e).split())) from e
    for name, value in given.items():
        if name not in fv:
            import difflib

            close = difflib.get_close_matches(name, list(fv), n=1)
            raise ConfigError(f"{name}={value!r}: no such flag" + (f" (did you mean {close[0]}?)" if close else "")
                              + "; the flags are listed in docs/flags.md")
        try:
            fv[name].value = list(value) if isinstance(value, tuple) else value
        except (flags.IllegalFlagValueError, ValueError, TypeError) as e:
            raise ConfigError(f"--{name}={value!r}: {' '.join(str(e).split())}") from e
        fv[name].present = 1
    return fv


def make_config(flagfile: str | None = None, **flag_values: Any) -> C.ExperimentConfig:
    """The run's configuration from a flagfile and/or flag names, as the drivers build it (checked by `plan.check`).

    Args:
      flagfile: a drivers' flagfile (e.g. "configs/quickstart.cfg"), relative to the current folder.
      **flag_values: flags by name (`rounds=20`, `dp_mode="local"`, `workers=["host:8000"]`); they win over
        the flagfile.

    Raises:
      ConfigError: an unknown flag, or a value out of its range (one line naming the flag and the range).
    """
    from dpfl_tff import plan
    from dpfl_tff.privacy.registry import MECHANISMS

    fv = _flag_values(flagfile, flag_values)

    def section(cls: type) -> dict[str, Any]:
        out = {}
        for name, field in C.flag_fields(cls):
            value = fv[name].value
            out[field.name] = tuple(value) if isinstance(field.default, tuple) else value
        return out

    train = section(C.TrainConfig)
    mechanism = MECHANISMS.get(fv["dp_mode"].value)
    if not fv["client_sampling"].present and mechanism is not None and mechanism.default_client_sampling:
        train["client_sampling"] = mechanism.default_client_sampling
    if not fv["model"].present and fv["task"].value in C.TEXT_TASK_MODELS:
        train["model"] = C.TEXT_TASK_MODELS[fv["task"].value]
    dp = section(C.DPConfig)
    if dp["dp_level"] == "example" and not fv["dp_mode"].present:  # record level: the server adds no noise
        dp["mode"] = "none"
    cfg = C.ExperimentConfig(task=C.TaskConfig(**section(C.TaskConfig)), train=C.TrainConfig(**train),
                             dp=C.DPConfig(**dp), **section(C.ExperimentConfig))
    return plan.check(cfg)


def epsilon(cfg: C.ExperimentConfig | None = None, flagfile: str | None = None, participations: int | None = None,
            **flag_values: Any) -> dict[str, Any]:
    """The epsilon of a planned run without training: `experiments.compute_epsilon`'s JSON object, as a dict.

    No data is loaded: N is `num_clients` (also for tasks with their own client split). With
    `target_epsilon`, the calibrated `noise_multiplier` is in the result. Imports no TensorFlow, except with
    `dp_level="example"`, whose clients' record counts are counted from the task's data (`with_record_counts`).

    Returns:
      `epsilon`, `delta` (the stated delta: `target_delta` plus the noise sampler's term), `accountant`,
      `neighboring_relation` (None: no DP), `noise_multiplier`, and under local DP `local_epsilon`.

    Raises:
      ConfigError: as `make_config`.
    """
    from dpfl_tff import plan

    if cfg is None:
        cfg = make_config(flagfile, **flag_values)
    elif flagfile is not None or flag_values:
        raise ConfigError("give either cfg or flags (flagfile=..., name=value), not both")
    return planned_epsilon(with_record_counts(plan.check(dataclasses.replace(
        cfg, task=dataclasses.replace(cfg.task, num_clients_known=True)))), participations)


def with_record_counts(cfg: C.ExperimentConfig, records_per_client: list[str] | tuple = ()) -> C.ExperimentConfig:
    """`cfg` (--dp_level=example) with each client's record count: given (one value for all, or one per client),
    or counted from the task's data (loaded: imports TensorFlow).

    Raises:
      ConfigError: counts that are not integers >= 1, or not one per client.
    """
    if cfg.dp.dp_level != "example" or cfg.dp.record_counts:
        return cfg
    given = ",".join(map(str, records_per_client))
    if records_per_client:
        try:
            counts = [int(v) for v in records_per_client]
        except ValueError:
            counts = [0]
        if min(counts) < 1:
            raise ConfigError(f"--records_per_client={given}: must be integers >= 1")
        if len(counts) == 1:
            counts = counts * cfg.task.num_clients
        if len(counts) != cfg.task.num_clients:
            raise ConfigError(f"--records_per_client={given}: give one value, or --num_clients="
                              f"{cfg.task.num_clients} values (one per client)")
        n = len(counts)
    else:
        quiet_tensorflow()
        from dpfl_tff.tasks import load_task

        data = load_task(cfg.task, cfg.train.seed)
        counts, n = [data.client_size(c) for c in range(data.num_clients)], data.num_clients
    from dpfl_tff import plan

    return plan.check(dataclasses.replace(
        cfg, task=dataclasses.replace(cfg.task, num_clients=n, num_clients_known=True),
        dp=dataclasses.replace(cfg.dp, record_counts=tuple(counts))))


def planned_epsilon(cfg: C.ExperimentConfig, participations: int | None = None) -> dict[str, Any]:
    """`epsilon`'s figures for a checked configuration (`plan.check`, N known); `experiments.compute_epsilon`'s too."""
    from dpfl_tff.privacy import accounting
    from dpfl_tff.privacy.registry import mechanism_for
    from dpfl_tff.privacy.truncation import stated_delta

    if participations is not None and not 1 <= participations <= cfg.train.rounds:
        raise ConfigError(f"--participations={participations}: must be in [1, --rounds={cfg.train.rounds}]")
    cfg = accounting.with_calibrated_noise(cfg)
    mechanism = mechanism_for(cfg)
    ledger = mechanism.accounting.ledger()
    result = {
        "dp_mode": cfg.dp.mode, "num_clients": cfg.task.num_clients, "clients_per_round": cfg.train.clients_per_round,
        "client_sampling": cfg.train.client_sampling, "rounds": cfg.train.rounds,
        "noise_multiplier": cfg.dp.noise_multiplier, "delta": cfg.target_delta, "accountant": cfg.dp.accountant,
        "neighboring_relation": ledger.neighboring_relation, "target_epsilon": cfg.dp.target_epsilon,
    }
    result.update(mechanism.summary_fields())
    try:
        result.update(ledger.planned(cfg.train.rounds, participations))
    finally:
        ledger.close()
    # The stated delta: --target_delta (the accountant's) plus the noise sampler's term (privacy.truncation).
    result.update(delta_accountant=cfg.target_delta, delta=stated_delta(cfg.target_delta, result["delta_sampler"]))
    return result


def quiet_tensorflow() -> None:
    """TensorFlow's C++ and TFF's (absl) INFO logs off, unless the caller chose a level (TF_CPP_MIN_LOG_LEVEL, absl)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read when TensorFlow's C++ library loads
    from absl import flags, logging

    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
        logging.set_verbosity(logging.WARNING)  # TFF logs every model build at INFO


def run(cfg: C.ExperimentConfig | None = None, *, overwrite: bool = False, fresh: bool = False,
        log: Callable[[str], None] = print, flagfile: str | None = None, **flag_values: Any):
    """Trains a run as `experiments.run_federated` does, in this process: returns its `training.RunResult`.

    `cfg` (from `make_config`), or a flagfile and flags as `make_config` takes them. The result holds `summary`
    (summary.json's fields), `records` (metrics.jsonl's, one per round), `epsilon`, `output_dir` and
    `model()` (final_model.keras, loaded). A folder holding this run finished is left as it is
    (`already_complete`); one holding it unfinished is resumed.

    Raises:
      ConfigError, DataMissingError, DataFileError, LedgerError, FolderInUse: before training, nothing written.
      RoundFailed: a round failed (its last completed round is checkpointed: run again to resume).
    """
    quiet_tensorflow()
    if cfg is None:
        cfg = make_config(flagfile, **flag_values)
    elif flagfile is not None or flag_values:
        raise ConfigError("give either cfg or flags (flagfile=..., name=value), not both")
    from dpfl_tff import training

    return training.run(cfg, overwrite=overwrite, log=log, fresh=fresh)
