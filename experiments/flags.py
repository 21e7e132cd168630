"""The drivers' flags, defined from the configuration's fields, and their translation back to configs.

Each flag's name, type, default, help text and --help group live in one place:
the field's metadata in `dpfl_tff.config` (`_field`). This module defines one
absl flag per such field, plus the three flags that are not configuration
(--overwrite, --fresh, --dry_run), and builds the `ExperimentConfig` from the
parsed values. Every range check lives in `dpfl_tff.config` (and the privacy
mode's mechanism), so a bad value fails before training with one line naming
the flag, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from dpfl_tff import config as C
from experiments import cli

class _IntOrAutoParser(flags.ArgumentParser):
    """An integer, or `auto` (--bands): the range is checked by the configuration, as every flag's."""

    syntactic_help = f"an integer or {C.BANDS_AUTO}"

    def parse(self, argument):
        return C.parse_int_or_auto(argument)

    def flag_type(self) -> str:
        return "int or auto"


def _define_int_or_auto(name, default, help_text, module_name=None) -> flags.FlagHolder:
    return flags.DEFINE(_IntOrAutoParser(), name, default, help_text, module_name=module_name)


_DEFINE = {
    "int | str": _define_int_or_auto,
    "str": flags.DEFINE_string,
    "int": flags.DEFINE_integer,
    "int | None": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "float | None": flags.DEFINE_float,
    "bool": flags.DEFINE_bool,
    "tuple[str, ...]": flags.DEFINE_list,
}
_SECTIONS = ((C.TaskConfig, "task"), (C.TrainConfig, "train"), (C.DPConfig, "dp"), (C.ExperimentConfig, None))


def _define(name: str, field: dataclasses.Field) -> flags.FlagHolder:
    default = list(field.default) if isinstance(field.default, tuple) else field.default
    return cli.define_once(_DEFINE[str(field.type)], name, default, field.metadata["help"], __name__)


# name -> holder, for every configuration field with a flag, in the fields' order.
HOLDERS: dict[str, flags.FlagHolder] = {
    name: _define(name, field) for cls, _ in _SECTIONS for name, field in C.flag_fields(cls)
}
_GROUP_OF = {name: field.metadata["group"] for cls, _ in _SECTIONS for name, field in C.flag_fields(cls)}

OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an earlier run in --output_dir and start afresh.")
FRESH = flags.DEFINE_bool(
    "fresh", False, "Never resume: refuse a non-empty --output_dir unless --overwrite is also given."
)
DRY_RUN = flags.DEFINE_bool(
    "dry_run", False,
    "Check everything (flags, data files, model, accounting, calibration, the output folder), print the plan "
    "(task, N, model parameters, privacy, epsilon after --rounds) and exit 0 (or 2) without training or "
    "starting a TFF worker.",
)
_DRIVER_ONLY = {C.OUTPUTS: (OVERWRITE, FRESH, DRY_RUN)}

# --help lists the flags in these groups, in this order (experiments/cli.py, docs/flags.md).
GROUPS = tuple(
    (group, tuple(h for n, h in HOLDERS.items() if _GROUP_OF[n] == group) + _DRIVER_ONLY.get(group, ()))
    for group in C.FLAG_GROUPS
)
PRIVACY_FLAGS = dict(GROUPS)[C.PRIVACY]
NUM_CLIENTS, ROUNDS = HOLDERS["num_clients"], HOLDERS["rounds"]
CLIENTS_PER_ROUND, CLIENT_SAMPLING = HOLDERS["clients_per_round"], HOLDERS["client_sampling"]


def _section(cls: type) -> dict:
    out = {}
    for name, field in C.flag_fields(cls):
        value = HOLDERS[name].value
        out[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    return out


def _train_section() -> dict:
    """The training fields; --client_sampling, when not given, is the privacy mode's default if it has one;
    --model, when not given, a text task's paper model."""
    from dpfl_tff.privacy.registry import MECHANISMS

    train = _section(C.TrainConfig)
    mechanism = MECHANISMS.get(HOLDERS["dp_mode"].value)
    if not CLIENT_SAMPLING.present and mechanism is not None and mechanism.default_client_sampling:
        train["client_sampling"] = mechanism.default_client_sampling
    if not HOLDERS["model"].present and HOLDERS["task"].value in C.TEXT_TASK_MODELS:  # the text task's paper model
        train["model"] = C.TEXT_TASK_MODELS[HOLDERS["task"].value]
    return train


def _dp_section() -> dict:
    """The privacy fields; with --dp_level=example and no --dp_mode given, --dp_mode is none (the only one it takes)."""
    dp = _section(C.DPConfig)
    if dp["dp_level"] == "example" and not HOLDERS["dp_mode"].present:
        dp["mode"] = "none"
    return dp


def experiment_config() -> C.ExperimentConfig:
    """Builds the (unvalidated) configuration from the parsed flags."""
    return C.ExperimentConfig(
        task=C.TaskConfig(**_section(C.TaskConfig)),
        train=C.TrainConfig(**_train_section()),
        dp=C.DPConfig(**_dp_section()),
        **_section(C.ExperimentConfig),
    )
