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

from dpfl_tff.config import BANDS_AUTO, ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import accounting, coverage, registry
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.sampling import SamplingScheme

import numpy as np

if TYPE_CHECKING:
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
        return self.mechanism.accounting.projected(list(history.entries), history.resume_round, self.cfg.train.rounds)


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg.validate()` and the accountant's checks (when N is known); returns `cfg`, resolved.

    Resolved: what the mode chooses itself once N is known (`PrivacyMechanism.resolved`: --bands=auto's
    B, without the model's size, which `prepare` adds), else `cfg` itself. N unknown: `cfg` unresolved.

    Raises:
      ConfigError: one line naming the flag, the value and the allowed range.
    """
    return _checked_mechanism(cfg)[0]


def _checked_mechanism(cfg: ExperimentConfig) -> tuple[ExperimentConfig, PrivacyMechanism | None]:
    """`check(cfg)`: the resolved `cfg` and the mechanism it built (N known: its accounting checked too).

    The mechanism is None when `cfg` cannot be resolved yet (--bands=auto with N unknown).
    """
    cfg.validate()
    cls = registry.mechanism_class(cfg)
    cls.check(cfg)
    resolved = cls.resolved(cfg)
    if resolved is not cfg:
        cfg = resolved.validate()
        cls.check(cfg)
    elif cfg.dp.bands == BANDS_AUTO and not cfg.task.n_is_known:
        return cfg, None  # banded MF's B: resolved by `prepare`, once the data fixes N
    mechanism = registry.mechanism_for(cfg)
    if cfg.task.n_is_known:
        mechanism.accounting.check_accountable()
        if cfg.dp.target_epsilon is None:  # a calibrated z is checked once calibrated
            accounting.check_sampler_delta(cfg, mechanism)
    return cfg, mechanism


def resolved(cfg: ExperimentConfig, model_parameters: int | None = None) -> ExperimentConfig:
    """`cfg` (checked, N known) with what its mode chooses itself resolved, knowing the model's size; checked."""
    out = registry.mechanism_class(cfg).resolved(cfg, model_parameters)
    return out if out is cfg else check(out)


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


def prepare(cfg: ExperimentConfig, log: Callable[[str], None], stored_model_spec: bool = False) -> RunPlan:
    """Checks `cfg`, loads its data, checks its model and calibrates its noise (see the module docstring).

    `stored_model_spec` (a dry run): a registered model whose facts `model_specs` stores for the task's
    shapes is not built (no TensorFlow); `initial_weights` then holds zeros of the weights' shapes.

    Returns:
      The run's plan (its `notes`: lines to print before the run starts).

    Raises:
      ConfigError, DataMissingError, DataFileError: before anything is trained or written.
    """
    from dpfl_tff import model_specs
    from dpfl_tff.tasks import load_task

    check(cfg)  # `cfg` stays as given: what the mode resolves is resolved below, with the model's size
    if not stored_model_spec or ":" in cfg.train.model:
        from dpfl_tff import models  # TensorFlow

        models.resolve_builder(cfg.train.model)  # a custom model's import fails before the data is loaded
    if cfg.task.download:  # the only place anything is fetched
        from dpfl_tff.tasks import download

        download.ensure_task_files(cfg.task.task, cfg.task.data_dir, log)
    data = load_task(cfg.task, cfg.train.seed)
    if cfg.task.natural_split:
        if data.num_clients != cfg.task.num_clients:
            log(f"--task={cfg.task.task} has its own client split: N = {data.num_clients} clients (not --num_clients)")
        cfg = dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, num_clients=data.num_clients, num_clients_known=True))
        check(cfg)
    if cfg.dp.dp_level == "example":  # each client's record count: its sampling rate, steps and accounting
        cfg = dataclasses.replace(cfg, dp=dataclasses.replace(
            cfg.dp, record_counts=tuple(data.client_size(c) for c in range(data.num_clients))))
        check(cfg)
    spec = model_specs.lookup(cfg.train.model, data.input_shape, data.num_classes, data.label_shape) \
        if stored_model_spec and ":" not in cfg.train.model else None
    if spec is None:
        spec = _built_model_spec(cfg, data)
    state_not_aggregated = tuple(spec["state_not_aggregated"])
    if cfg.dp.dp_level == "example" and state_not_aggregated:
        raise ConfigError(
            f"--model={cfg.train.model} with --dp_level=example: its training step updates non-trainable state "
            f"({', '.join(state_not_aggregated)}, e.g. BatchNormalization), which per-example gradients cannot "
            "compute and DP-SGD does not make private; use a model without it (e.g. GroupNormalization)")
    cfg = resolved(cfg, spec["parameters"])
    cfg, calibration = calibrated(cfg)
    mechanism = registry.mechanism_for(cfg)  # the run's one mechanism (`cfg` is checked, resolved, calibrated)
    return RunPlan(
        cfg=cfg, data=data, mechanism=mechanism, notes=tuple(spec["notes"] + calibration),
        model_parameters=spec["parameters"],
        initial_weights=tuple(spec["initial_weights"]) if "initial_weights" in spec else tuple(
            np.zeros(shape, dtype) for shape, dtype in spec["weights"]),
        state_not_aggregated=state_not_aggregated,
        not_covered=tuple(coverage.not_covered(cfg, mechanism)),
        weight_names=tuple(spec["weight_names"]),
    )


def _built_model_spec(cfg: ExperimentConfig, data: FederatedData) -> dict[str, Any]:
    """The model's facts for the plan, from the Keras model (TensorFlow): checked, built once, its weights."""
    from dpfl_tff import models
    from dpfl_tff.process import keras_model

    notes, names = _model_checks(cfg.train.model, tuple(data.input_shape), data.num_classes, tuple(data.label_shape))
    model = keras_model(cfg, data)
    return {
        "notes": list(notes), "parameters": int(model.count_params()),
        "initial_weights": [w.numpy() for w in model.trainable_weights + model.non_trainable_weights],
        "state_not_aggregated": models.updated_state(model, data.input_shape),
        "weight_names": list(names),
    }


_MODEL_CHECKS: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _model_checks(name: str, input_shape: tuple, num_classes: int, label_shape: tuple
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`models.validate_model`'s notes and `models.weight_names` of a model for the task's shapes.

    Neither depends on the seed: a registered model's are kept for the process (a sweep's later runs skip
    two model builds); a custom model (`module:function`) is checked every time, its code may change.
    """
    from dpfl_tff import models

    key = (name, input_shape, num_classes, label_shape)
    if key in _MODEL_CHECKS:
        return _MODEL_CHECKS[key]
    facts = (tuple(models.validate_model(name, input_shape, num_classes, label_shape)),
             tuple(models.weight_names(name, input_shape, num_classes)))
    if ":" not in name:
        _MODEL_CHECKS[key] = facts
    return facts
