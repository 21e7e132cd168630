"""From a validated configuration to what a run needs, resolved once.

`check(cfg)` adds to `cfg.validate()` the settings its privacy mode refuses
(the mechanism's `check`) and the checks that need the accountant (is the
round's DP event accountable as configured, is the adaptive-clipping noise
split possible): pure Python and dp-accounting, no TensorFlow, so that
`compute_epsilon` and flag errors stay fast. `prepare(cfg)` then loads the
task's data (after fetching its files if `--download`; fixing N for tasks
with their own client split, custom tasks included), imports and
builds the model once to check it, and calibrates the noise multiplier to
`--target_epsilon`: the configuration it returns is the one the run, its
accounting and its hparams.json use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy import accounting, registry

if TYPE_CHECKING:
    from dpfl_tff.tasks import FederatedData


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg.validate()` and the accountant's checks (when N is known); returns `cfg`.

    Raises:
      ConfigError: one line naming the flag, the value and the allowed range.
    """
    cfg.validate()
    registry.mechanism_class(cfg).check(cfg)
    if cfg.task.n_is_known:
        accounting.check_accountable(cfg)
        if cfg.dp.target_epsilon is None:  # a calibrated z is checked once calibrated
            accounting.check_sampler_delta(cfg)
    return cfg


def calibrated(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[str]]:
    """`cfg` with the noise multiplier calibrated to `--target_epsilon` (if set), and a note saying so."""
    out = accounting.with_calibrated_noise(cfg)
    if out is cfg:
        return cfg, []
    return out, [
        f"calibrated --noise_multiplier={out.dp.noise_multiplier:.6g}: smallest z with epsilon "
        f"<= {cfg.dp.target_epsilon:g} after {cfg.train.rounds} rounds"
    ]


def prepare(cfg: ExperimentConfig, log: Callable[[str], None]) -> tuple[ExperimentConfig, FederatedData, list[str]]:
    """Checks `cfg`, loads its data, checks its model and calibrates its noise (see the module docstring).

    Returns:
      (the resolved configuration, the task's data, notes to print before the run starts).

    Raises:
      ConfigError, DataMissingError, DataFileError: before anything is trained or written.
    """
    from dpfl_tff import models  # TensorFlow: imported only when a run is prepared
    from dpfl_tff.tasks import load_task

    check(cfg)
    models.resolve_builder(cfg.train.model)  # a custom model's import fails before the data is loaded
    if cfg.task.download:  # the only place anything is fetched
        from dpfl_tff.tasks import download

        download.ensure_task_files(cfg.task.task, cfg.task.data_dir, log)
    data = load_task(cfg.task, cfg.train.seed)
    if cfg.task.natural_split:
        if data.num_clients != cfg.task.num_clients:
            log(f"--task={cfg.task.task} has its own client split: N = {data.num_clients} clients (not --num_clients)")
        cfg = check(dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, num_clients=data.num_clients, num_clients_known=True)))
    notes = models.validate_model(cfg.train.model, data.input_shape, data.num_classes, data.label_shape)
    cfg, calibration = calibrated(cfg)
    return cfg, data, notes + calibration
