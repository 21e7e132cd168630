"""The BLT-DP-FTRL query (TensorFlow): clip, sum, add z C (C^-1 xi)_t streamed from d float64 buffers, / m.

`blt_query` is `NormalizedQuery(BLTNoiseSumQuery)`. `BLTNoiseSumQuery`
clips every client's update to L2 norm C (`preprocess_record`, at the
client), and in `get_noised_result` returns the round's sum plus z C x_t,
where x = C^-1 xi for the BLT strategy C of `privacy.blt_strategy` (decays
theta, output scales omega) and xi_t ~ N(0, I) fresh every round. x_t is
computed online from d model-sized float64 buffers s_i kept in the query's
state (so checkpointed with it):

    x_t = xi_t - sum_i omega_i s_i,      s_i <- theta_i s_i + x_t.

Summed over rounds 1..t the outputs are the prefix sum plus z C (A C^-1 xi)_t:
post-processing of C G + z C xi, the Gaussian release the accounting covers
(`privacy.blt`). The server optimizer applies the noised mean.

A stream restarts (buffers zeroed, a new seed, its step back to 0) when the
state says so: `with_new_stream(state, seed)` (Python, between rounds) sets
a flag and the seed; the next `get_noised_result` restarts before it adds
noise. xi_t is `privacy.sampler.normal` (float64, |N| <= 14.7 std), stateless,
keyed by the stream's seed, the stream step and the tensor's index.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp

from dpfl_tff.privacy import sampler


def noise_key(seed: tf.Tensor, step: tf.Tensor, index: int) -> tf.Tensor:
    """The stateless int64[2] key of xi's tensor `index` at stream step `step` of the stream seeded `seed`."""
    seed = tf.cast(seed, tf.int64)
    return tf.stack([seed[0] + tf.cast(step, tf.int64) * 1_000_003 + index, seed[1]])


class BLTNoiseSumQuery(tfp.SumAggregationDPQuery):
    """Clipped sum plus streamed BLT noise (see the module docstring)."""

    State = collections.namedtuple("State", ["buffers", "step", "new_stream", "stream_seed"])

    def __init__(self, clip_norm: float, noise_multiplier: float, theta: Sequence[float], omega: Sequence[float],
                 record_specs: Any, initial_seed: Sequence[int]):
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError(f"clip_norm={clip_norm} must be > 0 and noise_multiplier={noise_multiplier} >= 0")
        if len(theta) != len(omega) or not theta:
            raise ValueError("theta and omega must have the same length >= 1")
        self._clip = float(clip_norm)
        self._std = float(clip_norm) * float(noise_multiplier)
        self._theta = np.asarray(theta, np.float64)
        self._omega = np.asarray(omega, np.float64)
        self._specs = record_specs
        self._initial_seed = [int(s) for s in initial_seed]

    def initial_global_state(self):
        d = len(self._theta)
        buffers = tf.nest.map_structure(lambda s: tf.zeros([d, *s.shape], tf.float64), self._specs)
        return self.State(buffers, tf.constant(0, tf.int32), tf.constant(1, tf.int32),
                          tf.constant(self._initial_seed, tf.int64))

    def derive_sample_params(self, global_state):
        return tf.constant(self._clip, tf.float32)

    def initial_sample_state(self, template=None):
        return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), self._specs)

    def preprocess_record(self, params, record):
        flat = tf.nest.flatten(record)
        clipped, _ = tf.clip_by_global_norm(flat, tf.cast(params, flat[0].dtype))
        return tf.nest.pack_sequence_as(record, clipped)

    def next_noise(self, buffers, step, seed):
        """(x_t per tensor, in float64; the buffers after it): one step of the recurrence."""
        theta = tf.constant(self._theta, tf.float64)
        omega = tf.constant(self._omega, tf.float64)
        flat_buffers, flat_specs = tf.nest.flatten(buffers), tf.nest.flatten(self._specs)
        xs, new = [], []
        for i, (buf, spec) in enumerate(zip(flat_buffers, flat_specs)):
            xi = sampler.normal(spec.shape, seed=noise_key(seed, step, i))
            x = xi - tf.tensordot(omega, buf, axes=1)
            shape = [-1] + [1] * len(spec.shape)
            new.append(tf.reshape(theta, shape) * buf + x[tf.newaxis])
            xs.append(x)
        return (tf.nest.pack_sequence_as(self._specs, xs), tf.nest.pack_sequence_as(buffers, new))

    @tf.function
    def get_noised_result(self, sample_state, global_state):
        restart = global_state.new_stream > 0
        buffers = tf.nest.map_structure(lambda b: tf.where(restart, tf.zeros_like(b), b), global_state.buffers)
        step = tf.where(restart, tf.constant(0, tf.int32), global_state.step)
        x, buffers = self.next_noise(buffers, step, global_state.stream_seed)
        noised = tf.nest.map_structure(
            lambda s, n: tf.cast(tf.cast(s, tf.float64) + self._std * n, s.dtype), sample_state, x)
        state = self.State(buffers, step + 1, tf.constant(0, tf.int32), global_state.stream_seed)
        return noised, state, dp_accounting.UnsupportedDpEvent()  # accounted by privacy.blt's ledger, not here

    def derive_metrics(self, global_state):
        return collections.OrderedDict(blt_stream_step=global_state.step)


def blt_query(clip_norm: float, noise_multiplier: float, expected_cohort: float, theta: Sequence[float],
              omega: Sequence[float], record_specs: Any, initial_seed: Sequence[int]) -> tfp.NormalizedQuery:
    """The BLT query: clip to `clip_norm`, BLT noise z C (C^-1 xi)_t, / m."""
    inner = BLTNoiseSumQuery(clip_norm, noise_multiplier, theta, omega, record_specs, initial_seed)
    return tfp.NormalizedQuery(inner, denominator=float(expected_cohort))


def with_new_stream(aggregator_state: Any, seeds: Sequence[int]) -> Any:
    """`blt_query`'s state (numpy, as the process returns it) set to start a new stream seeded by `seeds`."""
    inner = aggregator_state.numerator_state
    restart = type(inner)(inner.buffers, inner.step, np.int32(1), np.asarray(seeds, np.int64))
    return type(aggregator_state)(restart, aggregator_state.denominator)
