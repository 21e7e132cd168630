"""The banded-MF query (TensorFlow): clip, sum, add z C (C^-1 xi)_t generated online, / m.

`bandmf_query` is `NormalizedQuery(BandedNoiseSumQuery)`:

* `preprocess_record` clips every client's update to L2 norm C (at the client);
  the sample state is the sum.
* `get_noised_result` of the stream's round t (0-based) draws xi_t, standard
  normal per coordinate in float64 (`privacy.sampler.normal`, |N| <= 14.7),
  and solves the banded lower-triangular Toeplitz system C x = xi one row at a
  time: x_t = (xi_t - sum_{j=1}^{B-1} c_j x_{t-j}) / c_0. It adds z C x_t to
  the sum (cast to the update's dtype) and keeps x_t, ..., x_{t-B+2} (B - 1
  model-sized float64 vectors, in the query's state, which the checkpoints
  hold: keep checkpoints/ as private as the server).
* A stream restarts when the state says so (`with_new_stream`, set from
  Python between rounds at a stream's first round, `privacy.bandmf`): the
  buffers are zeroed and the count restarts at 0, so a resumed run never
  reuses the noise of the stream its checkpoint holds.

Noise: unseeded, TensorFlow's stateful uniforms (fresh OS entropy, as the
central query's); with --noise_seed (tests only), stateless and keyed by
(seed, stream, round of the stream, tensor), so the streamed x equals
C^-1 xi computed densely from the same xi (`stream_normals`).
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

_KEY_STRIDE = 65536  # > the sampler's own offsets of one draw's four uniforms (privacy.sampler._uniform)


def stream_key(noise_seed: int, stream, step, tensor_index: int, num_tensors: int) -> tf.Tensor:
    """The stateless key of xi for (stream, round of the stream, tensor) under --noise_seed (tests only)."""
    first = tf.cast(noise_seed, tf.int64) * 1_000_003 + tf.cast(stream, tf.int64)
    second = (tf.cast(step, tf.int64) * num_tensors + tensor_index) * _KEY_STRIDE
    return tf.stack([first, second])


def stream_normals(noise_seed: int, stream: int, rounds: int, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """xi of rounds 0..rounds-1 of a seeded stream, per tensor: arrays (rounds, *shape) (tests' dense check)."""
    out = []
    for i, shape in enumerate(shapes):
        out.append(np.stack([sampler.normal(tuple(shape), seed=stream_key(noise_seed, stream, t, i, len(shapes))).numpy()
                             for t in range(rounds)]))
    return out


class BandedNoiseSumQuery(tfp.SumAggregationDPQuery):
    """Clipped sum plus banded-MF noise z C (C^-1 xi)_t (see the module docstring)."""

    State = collections.namedtuple("State", ["buffers", "step", "new_stream", "stream"])

    def __init__(self, clip_norm: float, noise_multiplier: float, coefficients: Sequence[float],
                 record_specs: Any, noise_seed: int | None = None):
        self._clip = float(clip_norm)
        self._std = float(noise_multiplier) * float(clip_norm)
        self._c = [float(c) for c in coefficients]
        self._specs = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), record_specs)
        self._noise_seed = noise_seed

    @property
    def bands(self) -> int:
        return len(self._c)

    def initial_global_state(self):
        buffers = [tf.zeros([self.bands - 1, *s.shape], tf.float64) for s in tf.nest.flatten(self._specs)]
        return self.State(buffers, tf.constant(0, tf.int32), tf.constant(1, tf.int32), tf.constant(0, tf.int64))

    def derive_sample_params(self, global_state):
        del global_state
        return tf.constant(self._clip, tf.float32)

    def initial_sample_state(self, template=None):
        if template is not None:
            return tf.nest.map_structure(tf.zeros_like, template)
        return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), self._specs)

    def preprocess_record(self, params, record):
        clipped, _ = tf.clip_by_global_norm(tf.nest.flatten(record), params)
        return tf.nest.pack_sequence_as(record, clipped)

    def _normal(self, shape, global_state, step, i: int, n: int) -> tf.Tensor:
        if self._noise_seed is None:
            return sampler.normal(shape)
        return sampler.normal(shape, seed=stream_key(self._noise_seed, global_state.stream, step, i, n))

    def get_noised_result(self, sample_state, global_state):
        restart = global_state.new_stream > 0
        step = tf.where(restart, 0, global_state.step)
        flat = tf.nest.flatten(sample_state)
        noised, buffers = [], []
        for i, (value, buf) in enumerate(zip(flat, global_state.buffers)):
            buf = tf.where(restart, tf.zeros_like(buf), buf)
            x = self._normal(tf.shape(value), global_state, step, i, len(flat))
            for j in range(1, self.bands):  # buf[j - 1] = x_{t-j}; zeros before the stream's start
                x = x - self._c[j] * buf[j - 1]
            x = x / self._c[0]
            noised.append(value + tf.cast(self._std * x, value.dtype))
            buffers.append(tf.concat([x[tf.newaxis], buf[: self.bands - 2]], 0) if self.bands > 1 else buf)
        state = self.State(buffers, step + 1, tf.constant(0, tf.int32), global_state.stream)
        return tf.nest.pack_sequence_as(sample_state, noised), state, dp_accounting.UnsupportedDpEvent()

    def derive_metrics(self, global_state):
        del global_state
        return collections.OrderedDict()


def bandmf_query(clip_norm: float, noise_multiplier: float, coefficients: Sequence[float], expected_cohort: float,
                 record_specs: Any, noise_seed: int | None = None) -> tfp.NormalizedQuery:
    """The banded-MF query: clip to C, sum, banded noise of multiplier z, divided by the expected cohort m."""
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"clip_norm={clip_norm} must be > 0 and noise_multiplier={noise_multiplier} >= 0")
    inner = BandedNoiseSumQuery(clip_norm, noise_multiplier, coefficients, record_specs, noise_seed)
    return tfp.NormalizedQuery(inner, denominator=float(expected_cohort))


def with_new_stream(aggregator_state: Any, stream: int) -> Any:
    """`bandmf_query`'s state (numpy, as the process returns it; or a `BandedNoiseSumQuery.State`) set to start
    noise stream `stream` at the next round."""
    if isinstance(aggregator_state, BandedNoiseSumQuery.State):
        s = aggregator_state
        return type(s)(s.buffers, s.step, np.int32(1), np.int64(stream))
    inner = with_new_stream(BandedNoiseSumQuery.State(*aggregator_state.numerator_state), stream)
    return type(aggregator_state)(type(aggregator_state.numerator_state)(*inner), aggregator_state.denominator)
