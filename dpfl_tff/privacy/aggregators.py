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


import dp_accounting
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from dpfl_tff import runtime  # noqa: F401  (replaces TFF's worker-starting default context)
from dpfl_tff.config import DPConfig
from dpfl_tff.privacy.local import LocalDPFactory
from dpfl_tff.privacy.noise import CentralNoise, central_noise

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
