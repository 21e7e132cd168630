"""The flags of private hyperparameter selection (`dpfl_tff.selection`), shared by sweep and compute_epsilon."""

from __future__ import annotations

from absl import flags

from dpfl_tff.selection import SelectionConfig
from experiments import cli

_D = SelectionConfig()


def _define(define, name: str, default, help_text: str) -> flags.FlagHolder:
    return cli.define_once(define, name, default, help_text, __name__)


SELECT = _define(
    flags.DEFINE_string, "select", _D.select,
    "plain, private or public. plain: every grid run, the selection not covered by epsilon; private: candidates "
    "drawn from the grid a random number of times, each a DP run with a private score, the best released under "
    "one epsilon (RepeatAndSelect, RDP; docs/privacy.md#private-hyperparameter-selection); public: the best "
    "setting by the server's test accuracy (outside the clients' privacy), covered by the composition of all runs.",
)
REPETITIONS = _define(
    flags.DEFINE_string, "repetitions", _D.repetitions,
    "--select=private: the law of the number of candidates K: poisson or negative_binomial (truncated, shape "
    "--repetitions_shape).",
)
REPETITIONS_MEAN = _define(
    flags.DEFINE_float, "repetitions_mean", _D.repetitions_mean,
    "--select=private: the mean number of candidates E[K], in [1, 10000].",
)
REPETITIONS_SHAPE = _define(
    flags.DEFINE_float, "repetitions_shape", _D.repetitions_shape,
    "--select=private, --repetitions=negative_binomial: the shape eta in [0, 1000] (0 logarithmic, 1 geometric).",
)
SCORE_NOISE_MULTIPLIER = _define(
    flags.DEFINE_float, "score_noise_multiplier", _D.score_noise_multiplier,
    "--select=private: std of the Gaussian noise on a candidate's score, a sum of per-client accuracies "
    "(sensitivity 1), > 0; the released score's std is this over the expected number of clients scored.",
)
SCORE_SAMPLING_RATE = _define(
    flags.DEFINE_float, "score_sampling_rate", _D.score_sampling_rate,
    "--select=private: the probability, in (0, 1], that a client is in a score's Poisson sample (< 1 needs "
    "add-or-remove-one runs).",
)
FLAGS = (SELECT, REPETITIONS, REPETITIONS_MEAN, REPETITIONS_SHAPE, SCORE_NOISE_MULTIPLIER, SCORE_SAMPLING_RATE)


def selection_config() -> SelectionConfig:
    """The parsed flags, validated (ConfigError names the flag and its range)."""
    return SelectionConfig(SELECT.value, REPETITIONS.value, REPETITIONS_MEAN.value, REPETITIONS_SHAPE.value,
                           SCORE_NOISE_MULTIPLIER.value, SCORE_SAMPLING_RATE.value).validate()


def register_for(module_name: str) -> tuple[flags.FlagHolder, ...]:
    """Makes the selection flags key flags of the driver `module_name` (its --help and docs); returns them."""
    for holder in FLAGS:
        flags.FLAGS.register_key_flag_for_module(module_name, flags.FLAGS[holder.name])
    return FLAGS
