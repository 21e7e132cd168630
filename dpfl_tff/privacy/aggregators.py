"""DP configuration -> TFF aggregation factory for the model update.

Central DP (McMahan et al. 2018, arXiv:1710.06963): the server clips every
client's update to L2 norm C, sums, adds N(0, (z C)^2 I) to the sum and divides
by the *expected* cohort size m (never by the realised one, whose size would
otherwise leak through the scale of the result). Built on tensorflow-privacy's
`GaussianSumQuery` / `QuantileAdaptiveClipSumQuery` inside
`tff.aggregators.DifferentiallyPrivateFactory`.

Noise comes from TensorFlow's stateful RNG with OS-entropy seeds unless
`DPConfig.noise_seed` is set (tests only).
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators.differential_privacy import adaptive_clip_noise_params

from dpfl_tff import runtime  # noqa: F401  (replaces TFF's worker-starting default context)
from dpfl_tff.config import ConfigError, DPConfig
from dpfl_tff.privacy.local import LocalDPFactory

# Offsets that keep the op seeds of different noise sources apart.
_VALUE_SEED_OFFSET = 0
_CLIPPED_COUNT_SEED_OFFSET = 1_000_003


class SeededGaussianSumQuery(tfp.GaussianSumQuery):
    """`GaussianSumQuery` whose noise has fixed TF op seeds (tests only).

    Each tensor of the record gets its own op seed (`seed + index`), so
    tensors of equal shape get independent noise. The stateful RNG kernels
    continue their streams from round to round in the TFF worker, so rounds get
    different noise, and a rerun gets the same sequence.
    """

    def __init__(self, l2_norm_clip: float, stddev: float, seed: int):
        super().__init__(l2_norm_clip, stddev)
        self._seed = seed

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        noised = [
            v
            + tf.cast(
                tf.random.normal(tf.shape(v), stddev=global_state.stddev, seed=(self._seed + i) % 2**31),
                v.dtype,
            )
            for i, v in enumerate(flat)
        ]
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return tf.nest.pack_sequence_as(sample_state, noised), global_state, event


@dataclasses.dataclass(frozen=True)
class CentralNoise:
    """What the central Gaussian aggregator adds per round, in clip units.

    Attributes:
      value_noise_multiplier: std of the noise on the sum of clipped updates,
        divided by the (current) clip norm.
      clipped_count_stddev: std of the noise on the clipped-count release of
        adaptive clipping (0 when clipping is fixed).
      effective_noise_multiplier: the single Gaussian noise multiplier
        equivalent to both releases together (what is accounted):
        (value_z**-2 + (2 * clipped_count_stddev)**-2)**-0.5; the clipped
        count has sensitivity 1/2 per client.
    """

    value_noise_multiplier: float
    clipped_count_stddev: float
    effective_noise_multiplier: float


def central_noise(dp: DPConfig, expected_cohort: float) -> CentralNoise:
    """Splits `dp.noise_multiplier` between the value and clipped-count queries.

    With fixed clipping the value query gets all of it. With adaptive clipping
    TFF's rule applies: `dp.noise_multiplier` is the effective total, and the
    value query's noise is raised so that both releases together are exactly as
    private as one Gaussian release with that multiplier.

    Raises:
      ConfigError: when the clipped-count noise is too small for z (TFF needs
        clipped_count_stddev > z / 2); names the flags to change.
    """
    z = dp.noise_multiplier
    if not dp.adaptive_clipping:
        return CentralNoise(z, 0.0, z)
    try:
        value_z, cc_std = adaptive_clip_noise_params(z, float(expected_cohort), dp.clipped_count_stddev)
    except ValueError as e:
        raise ConfigError(_adaptive_noise_error(z, expected_cohort, dp.clipped_count_stddev)) from e
    if z == 0:
        return CentralNoise(0.0, cc_std, 0.0)
    return CentralNoise(value_z, cc_std, (value_z**-2 + (2 * cc_std) ** -2) ** -0.5)


def _adaptive_noise_error(z: float, m: float, clipped_count_stddev: float | None) -> str:
    if clipped_count_stddev is None:
        smallest_m = math.floor(10 * z) + 1  # default stddev 0.05 m must exceed z / 2
        return (
            f"--adaptive_clipping with --noise_multiplier={z} and --clients_per_round={m:g}: the clipped-count "
            f"noise (default --clipped_count_stddev = 0.05*clients_per_round = {0.05 * m:g}) must exceed "
            f"noise_multiplier/2 = {z / 2:g}; use --clients_per_round >= {smallest_m}, or set "
            f"--clipped_count_stddev > {z / 2:g}, or lower --noise_multiplier"
        )
    return (
        f"--clipped_count_stddev={clipped_count_stddev} with --adaptive_clipping and --noise_multiplier={z}: "
        f"must be > noise_multiplier/2 = {z / 2:g}; raise --clipped_count_stddev or lower --noise_multiplier"
    )


def _seeded_adaptive_query(
    dp: DPConfig, noise: CentralNoise, expected_cohort: float
) -> tfp.QuantileAdaptiveClipSumQuery:
    query = tfp.QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=dp.clip_norm,
        noise_multiplier=noise.value_noise_multiplier,
        target_unclipped_quantile=dp.target_unclipped_quantile,
        learning_rate=dp.clip_learning_rate,
        clipped_count_stddev=noise.clipped_count_stddev,
        expected_num_records=expected_cohort,
        geometric_update=True,
    )
    if dp.noise_seed is not None:
        # Same structure as tfp builds, with seeded noise in both releases.
        query._sum_query = SeededGaussianSumQuery(  # noqa: SLF001
            dp.clip_norm, noise.value_noise_multiplier * dp.clip_norm, dp.noise_seed + _VALUE_SEED_OFFSET
        )
        query._quantile_estimator_query._below_estimate_query = tfp.NormalizedQuery(  # noqa: SLF001
            SeededGaussianSumQuery(0.5, noise.clipped_count_stddev, dp.noise_seed + _CLIPPED_COUNT_SEED_OFFSET),
            denominator=expected_cohort,
        )
    return query


def central_query(dp: DPConfig, expected_cohort: float) -> tfp.DPQuery:
    """The tensorflow-privacy query of central DP: clip, sum, noise, / m."""
    noise = central_noise(dp, expected_cohort)
    if dp.adaptive_clipping:
        inner = _seeded_adaptive_query(dp, noise, expected_cohort)
    elif dp.noise_seed is not None:
        inner = SeededGaussianSumQuery(dp.clip_norm, noise.value_noise_multiplier * dp.clip_norm, dp.noise_seed)
    else:
        inner = tfp.GaussianSumQuery(dp.clip_norm, noise.value_noise_multiplier * dp.clip_norm)
    return tfp.NormalizedQuery(inner, denominator=float(expected_cohort))


def build_aggregator(dp: DPConfig, expected_cohort: float) -> tff.aggregators.UnweightedAggregationFactory:
    """Aggregation factory for the model update.

    Args:
      dp: validated DP configuration.
      expected_cohort: m, the expected number of clients per round; the noised
        sum is divided by it.

    Returns:
      `UnweightedMeanFactory` for `dp.mode == 'none'`, a
      `DifferentiallyPrivateFactory` around `central_query(dp, m)` for
      `central`, and `local.LocalDPFactory` (noise at CLIENTS) for `local`.
    """
    if dp.mode == "none":
        return tff.aggregators.UnweightedMeanFactory()
    if dp.mode == "central":
        return tff.aggregators.DifferentiallyPrivateFactory(central_query(dp, expected_cohort))
    if dp.mode == "local":
        return LocalDPFactory(dp.local_mechanism, dp.clip_norm, dp.noise_multiplier, dp.noise_seed)
    raise ValueError(f"--dp_mode={dp.mode}: not supported by build_aggregator")
