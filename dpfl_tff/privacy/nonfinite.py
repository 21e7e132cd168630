"""Zero out client updates that contain NaN or Inf before they are clipped or aggregated.

A diverging client (NaN/Inf in its model delta) would otherwise poison the
sum: clipping cannot fix a NaN (its norm is NaN), and TFF's
`zeroing_factory` compares `norm > threshold`, which is False for NaN.

TFF's FedAvg client work already replaces a non-finite model delta by zeros
(`model_delta_client_work`, without counting it). So a client counts as
non-finite here when its update reaching the aggregator is non-finite or
exactly all zeros: every client of our tasks has data and a learning rate
> 0, so an all-zero delta means TFF zeroed a diverged update.

DP interplay: zeroing happens per client before clipping, so the update that
enters the DP aggregation still has norm <= C (zero); the sensitivity, the
noise and the accounting are unchanged. The number of zeroed clients
(`nonfinite_clients`) is reported in the clear, like TFF's other per-round
counts; it is not covered by the DP guarantee.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff


class ZeroNonFiniteFactory(tff.aggregators.UnweightedAggregationFactory):
    """Wraps an unweighted factory; non-finite client values become zeros first.

    Measurement `nonfinite_clients`: clients whose update was non-finite or had
    already been zeroed by TFF's client work (see the module docstring).
    """

    def __init__(self, inner: tff.aggregators.UnweightedAggregationFactory):
        self._inner = inner

    def create(self, value_type) -> tff.templates.AggregationProcess:
        inner = self._inner.create(value_type)

        @tff.tensorflow.computation(value_type)
        def zero_nonfinite(value):
            flat = tf.nest.flatten(value)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
            all_zero = tf.reduce_all([tf.reduce_all(tf.equal(t, 0)) for t in flat])
            cleaned = tf.nest.map_structure(lambda t: tf.where(finite, t, tf.zeros_like(t)), value)
            return cleaned, tf.cast(tf.logical_or(tf.logical_not(finite), all_zero), tf.int32)

        @tff.federated_computation
        def init_fn():
            return inner.initialize()

        @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
        def next_fn(state, value):
            cleaned, flags = tff.federated_map(zero_nonfinite, value)
            out = inner.next(state, cleaned)
            measurements = tff.federated_zip(
                collections.OrderedDict(inner=out.measurements, nonfinite_clients=tff.federated_sum(flags))
            )
            return tff.templates.MeasuredProcessOutput(state=out.state, result=out.result, measurements=measurements)

        return tff.templates.AggregationProcess(init_fn, next_fn)


