"""tensorflow-privacy DP queries of the three privacy modes: every process runs the same three calls.

A federated round is, for any mode (tensorflow-privacy's `DPQuery` protocol):

  params = query.derive_sample_params(global_state)                    # server -> clients
  record = query.preprocess_record(params, client_update)              # at each client
  sample_state = sum over clients of records                           # accumulate / federated_sum
  mean, global_state, event = query.get_noised_result(sample_state, global_state)   # server

The queries here are sums (their sample states add up, so clients can be
grouped and partial sums merged on several workers):

* `central_query`: tensorflow-privacy's Gaussian sum (or adaptive-clip) query,
  clipping in `preprocess_record`, noise N(0, (zC)^2) once on the sum (drawn
  in float64, `Float64GaussianSumQuery`), divided by the *expected* cohort m
  (`NormalizedQuery`).
* `LocalNoiseMeanQuery`: clipping *and noise* in `preprocess_record`, that is
  at the client, before its update leaves it; the server divides the sum by
  the number of clients.
* `MeanQuery`: no clipping, no noise: the plain mean (no DP).

Noise is drawn in float64 by `privacy.sampler` (bounded at 14.7 std, which
`privacy.truncation` puts into the stated delta) from TensorFlow's stateful
RNG with OS-entropy seeds unless a `noise_seed` is given (tests only: a known
seed removes the privacy).
"""

from __future__ import annotations

import collections

import dp_accounting
import tensorflow as tf
import tensorflow_privacy as tfp

from dpfl_tff.config import DPConfig
from dpfl_tff.privacy import sampler
from dpfl_tff.privacy.local_noise import GAUSSIAN, clip_and_noise, zero_nonfinite
from dpfl_tff.privacy.noise import CentralNoise, central_noise

# Offsets that keep the op seeds of different noise sources apart.
_VALUE_SEED_OFFSET = 0
_CLIPPED_COUNT_SEED_OFFSET = 1_000_003


# Tensors of at most this many coordinates share one noise draw (`Float64GaussianSumQuery`).
_JOINT_DRAW_MAX_ELEMENTS = 2**16


class Float64GaussianSumQuery(tfp.GaussianSumQuery):
    """`GaussianSumQuery` whose noise is drawn in float64 by `privacy.sampler` (|N| <= 14.7 std).

    tensorflow-privacy's own draws use `tf.random_normal_initializer` (float32,
    truncated at 5.68 std). Each tensor of the sum gets `sampler.add_noise`
    with the state's stddev, except that the small ones (of known shape, at
    most `_JOINT_DRAW_MAX_ELEMENTS` coordinates), flattened and concatenated in
    float64, share one draw, cast back tensor by tensor: the same independent
    N(0, stddev^2) per coordinate, in one sampler's ops instead of one per
    tensor (the quickstart MLP's server step traced in 0.07 s instead of
    0.125 s). Large tensors keep their own draws: copying them into one vector
    cost more than their few ops save (an EMNIST CNN's noise took 29-30 ms
    with one draw for all, 27 ms with a draw per tensor, on 2 cores). With
    `seed` (tests only) the op seeds are fixed (tensor i's `seed + 4 i`, the
    shared draw's `seed + 4 len`): the stateful kernels continue their streams
    from round to round in the TFF worker, so rounds get different noise and a
    rerun the same sequence; without it they come from OS entropy.
    """

    def __init__(self, l2_norm_clip: float, stddev: float, seed: int | None = None):
        super().__init__(l2_norm_clip, stddev)
        self._seed = seed

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        noised: list = [None] * len(flat)
        small = [i for i, v in enumerate(flat) if v.shape.num_elements() is not None
                 and v.shape.num_elements() <= _JOINT_DRAW_MAX_ELEMENTS]
        if len(small) > 1:  # one draw for the small tensors (an op seed no single tensor's draw uses)
            joint = tf.concat([tf.reshape(tf.cast(flat[i], tf.float64), [-1]) for i in small], 0)
            op_seed = None if self._seed is None else self._seed + sampler.TENSOR_SEED_STRIDE * len(flat)
            pieces = tf.split(sampler.add_noise(joint, global_state.stddev, op_seed=op_seed),
                              [flat[i].shape.num_elements() for i in small])
            for i, p in zip(small, pieces):
                noised[i] = tf.cast(tf.reshape(p, tf.shape(flat[i])), flat[i].dtype)
        for i, v in enumerate(flat):
            if noised[i] is None:
                noised[i] = sampler.add_noise(
                    v, global_state.stddev,
                    op_seed=None if self._seed is None else self._seed + sampler.TENSOR_SEED_STRIDE * i)
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return tf.nest.pack_sequence_as(sample_state, noised), global_state, event


def _seeded(dp: DPConfig, offset: int) -> int | None:
    return None if dp.noise_seed is None else dp.noise_seed + offset


def _adaptive_query(dp: DPConfig, noise: CentralNoise, expected_cohort: float) -> tfp.QuantileAdaptiveClipSumQuery:
    """tensorflow-privacy's adaptive-clip query with both releases noised by `Float64GaussianSumQuery`."""
    query = tfp.QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=dp.clip_norm,
        noise_multiplier=noise.value_noise_multiplier,
        target_unclipped_quantile=dp.target_unclipped_quantile,
        learning_rate=dp.clip_learning_rate,
        clipped_count_stddev=noise.clipped_count_stddev,
        expected_num_records=expected_cohort,
        geometric_update=True,
    )
    # The same structure as tfp builds (its value sum, and its clipped count of +-1/2 records / m),
    # with the float64 sampler in both releases.
    query._sum_query = Float64GaussianSumQuery(  # noqa: SLF001
        dp.clip_norm, noise.value_noise_multiplier * dp.clip_norm, _seeded(dp, _VALUE_SEED_OFFSET))
    query._quantile_estimator_query._below_estimate_query = tfp.NormalizedQuery(  # noqa: SLF001
        Float64GaussianSumQuery(0.5, noise.clipped_count_stddev, _seeded(dp, _CLIPPED_COUNT_SEED_OFFSET)),
        denominator=expected_cohort,
    )
    return query


def central_query(dp: DPConfig, expected_cohort: float) -> tfp.DPQuery:
    """Central DP (McMahan et al. 2018): clip, sum, Gaussian noise once on the sum, / expected m.

    Dividing by the expected cohort, never the realised one, keeps the
    realised size (which changes with a client's presence) out of the scale.
    """
    noise = central_noise(dp, expected_cohort)
    if dp.adaptive_clipping:
        inner = _adaptive_query(dp, noise, expected_cohort)
    else:
        inner = Float64GaussianSumQuery(dp.clip_norm, noise.value_noise_multiplier * dp.clip_norm,
                                        _seeded(dp, _VALUE_SEED_OFFSET))
    return tfp.NormalizedQuery(inner, denominator=float(expected_cohort))


class _CountedMeanQuery(tfp.SumAggregationDPQuery):
    """A sum query whose records are (update, 1.0) and whose result is the sum / max(count, 1).

    The count is the number of clients the server sent work to, which it
    knows anyway; it depends on no client's data.
    """

    def initial_global_state(self):
        return tf.constant(0, tf.int64)  # rounds so far (keys the seeded test noise of the local query)

    def derive_sample_params(self, global_state):
        return global_state

    def initial_sample_state(self, template=None):
        zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), template)
        return collections.OrderedDict(total=zeros, count=tf.constant(0.0))

    def _record(self, params, record):
        return record

    def preprocess_record(self, params, record):
        return collections.OrderedDict(total=self._record(params, record), count=tf.constant(1.0))

    def get_noised_result(self, sample_state, global_state):
        n = tf.maximum(sample_state["count"], 1.0)
        mean = tf.nest.map_structure(lambda t: t / tf.cast(n, t.dtype), sample_state["total"])
        return mean, global_state + 1, self._event()

    def _event(self) -> dp_accounting.DpEvent:
        return dp_accounting.NonPrivateDpEvent()


class MeanQuery(_CountedMeanQuery):
    """No DP: the plain mean of the clients' updates."""


class LocalNoiseMeanQuery(_CountedMeanQuery):
    """Local DP: each record is zeroed if non-finite, clipped and noised in `preprocess_record` (at the client).

    Gaussian: L2 clip C, N(0, (zC)^2) per coordinate; Laplace: L1 clip C,
    Laplace(0, zC) per coordinate (`local_noise.clip_and_noise`). With
    `noise_seed` (tests only) the noise is keyed by (seed, round, the update's
    own values); otherwise it comes from OS entropy.

    Its event is per client and depends on who took part, which the ledger
    tracks (`ledgers.LocalLedger`); the query's own event says only that
    the aggregate is not accounted here.
    """

    def __init__(self, mechanism: str, clip: float, noise_multiplier: float, noise_seed: int | None = None):
        self.mechanism = mechanism
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.noise_seed = noise_seed

    def _record(self, params, record):
        key = None if self.noise_seed is None else tf.constant(self.noise_seed, tf.int64) * 1_000_003 + params
        return clip_and_noise(zero_nonfinite(record), self.mechanism, self.clip, self.noise_multiplier, key)

    def derive_metrics(self, global_state):
        key = "noise_std" if self.mechanism == GAUSSIAN else "laplace_scale"
        return collections.OrderedDict(**{key: tf.constant(self.noise_multiplier * self.clip, tf.float32)})

    def _event(self) -> dp_accounting.DpEvent:
        return dp_accounting.UnsupportedDpEvent()
