"""From a validated configuration to what a run needs, resolved once.

`check(cfg)` adds to `cfg.validate()` the settings its privacy mode refuses
(the mechanism's `check`) and the checks that need the accountant (is the
round's DP event accountable as configured, is the adaptive-clipping noise
split possible): pure Python and dp-accounting, no TensorFlow, so that
`compute_epsilon` and flag errors stay fast. `prepare(cfg)` then loads the
task's data (after fetching its files if `--download`; fixing N for tasks
with their own client split, custom tasks included), imports and
builds the model once to check it, and calibrates the noise multiplier to
`--target_epsilon`: it returns one frozen `RunPlan`, built once, that `run`,
`dry_run`, the sweep and the audit read (the resolved configuration its
accounting and hparams.json use, the data, the one mechanism, the model's
size and initial weights, the fields epsilon does not cover, the predicted
epsilon of a run folder's history). Nothing downstream rebuilds a mechanism
or re-derives these from the configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from typing import Any

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import accounting, coverage, registry
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.sampling import SamplingScheme

if TYPE_CHECKING:
    import numpy as np

    from dpfl_tff.resume import History
    from dpfl_tff.tasks import FederatedData


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run is, resolved once by `prepare` (see the module docstring)."""

    cfg: ExperimentConfig  # validated, N fixed, the noise calibrated
    data: FederatedData
    mechanism: PrivacyMechanism  # the one mechanism of the run, built from `cfg`
    notes: tuple[str, ...]  # lines to print before the run starts (model checks, calibration)
    model_parameters: int
    initial_weights: tuple[np.ndarray, ...]  # the model's weights as built (trainable, then non-trainable)
    state_not_aggregated: tuple[str, ...]  # non-trainable state a training step updates (`models.updated_state`)
    not_covered: tuple[str, ...]  # released fields the epsilon does not cover (`privacy.coverage`)
    weight_names: tuple[str, ...] = ()  # `initial_weights`' names (`models.weight_names`): checkpoints' array names

    @property
    def scheme(self) -> SamplingScheme:
        return self.mechanism.scheme

    def projected(self, history: History) -> dict[str, Any]:
        """The ledger's figures at the end of the run, composing the folder's `history` first (empty: a new run)."""
        return self.mechanism.projected(list(history.entries), history.resume_round, self.cfg.train.rounds)


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg.validate()` and the accountant's checks (when N is known); returns `cfg`.

    Raises:
      ConfigError: one line naming the flag, the value and the allowed range.
    """
    _checked_mechanism(cfg)
    return cfg


def _checked_mechanism(cfg: ExperimentConfig) -> PrivacyMechanism:
    """`check(cfg)`, returning the mechanism it built (N known: its accounting checked too)."""
    cfg.validate()
    registry.mechanism_class(cfg).check(cfg)
    mechanism = registry.mechanism_for(cfg)
    if cfg.task.n_is_known:
        mechanism.check_accountable()
        if cfg.dp.target_epsilon is None:  # a calibrated z is checked once calibrated
            accounting.check_sampler_delta(cfg, mechanism)
    return mechanism


def calibrated(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[str]]:
    """`cfg` with the noise multiplier calibrated to `--target_epsilon` (if set), and a note saying so."""
    out = accounting.with_calibrated_noise(cfg)
    if out is cfg:
        return cfg, []
    if cfg.dp.dp_level == "example":
        return out, [
            f"calibrated --example_noise_multiplier={out.dp.example_noise_multiplier:.6g}: record_epsilon (max over "
            f"clients) <= {cfg.dp.target_epsilon:g} if every client takes part in all {cfg.train.rounds} rounds "
            "(the smallest z_ex to 1e-4 by RDP at its integer orders; the reported epsilon is at most that)"
        ]
    return out, [
        f"calibrated --noise_multiplier={out.dp.noise_multiplier:.6g}: smallest z with epsilon "
        f"<= {cfg.dp.target_epsilon:g} after {cfg.train.rounds} rounds"
    ]


def prepare(cfg: ExperimentConfig, log: Callable[[str], None]) -> RunPlan:
    """Checks `cfg`, loads its data, checks its model and calibrates its noise (see the module docstring).

    Returns:
      The run's plan (its `notes`: lines to print before the run starts).

    Raises:
      ConfigError, DataMissingError, DataFileError: before anything is trained or written.
    """
    from dpfl_tff import models  # TensorFlow: imported only when a run is prepared
    from dpfl_tff.process import keras_model
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
    if cfg.dp.dp_level == "example":  # each client's record count: its sampling rate, steps and accounting
        cfg = check(dataclasses.replace(cfg, dp=dataclasses.replace(
            cfg.dp, record_counts=tuple(data.client_size(c) for c in range(data.num_clients)))))
    notes = models.validate_model(cfg.train.model, data.input_shape, data.num_classes, data.label_shape)
    cfg, calibration = calibrated(cfg)
    mechanism = registry.mechanism_for(cfg)  # the run's one mechanism (`cfg` is checked, calibrated)
    model = keras_model(cfg, data)
    state_not_aggregated = tuple(models.updated_state(model, data.input_shape))
    if cfg.dp.dp_level == "example" and state_not_aggregated:
        raise ConfigError(
            f"--model={cfg.train.model} with --dp_level=example: its training step updates non-trainable state "
            f"({', '.join(state_not_aggregated)}, e.g. BatchNormalization), which per-example gradients cannot "
            "compute and DP-SGD does not make private; use a model without it (e.g. GroupNormalization)")
    return RunPlan(
        cfg=cfg, data=data, mechanism=mechanism, notes=tuple(notes + calibration),
        model_parameters=int(model.count_params()),
        initial_weights=tuple(w.numpy() for w in model.trainable_weights + model.non_trainable_weights),
        state_not_aggregated=state_not_aggregated,
        not_covered=tuple(coverage.not_covered(cfg, mechanism)),
        weight_names=tuple(models.weight_names(cfg.train.model, data.input_shape, data.num_classes)),
    )
