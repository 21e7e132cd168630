"""The DP-FTRL query (TensorFlow): tensorflow-privacy's residual tree sum, restartable from Python, / m.

`ftrl_query` is `NormalizedQuery(RestartableTreeQuery(TreeResidualSumQuery))`:

* `TreeResidualSumQuery.build_l2_gaussian_query(C, z, specs, use_efficient=True)`
  clips every client's update to L2 norm C (`preprocess_record`, at the
  client) and, in `get_noised_result`, returns the round's sum plus
  (tree noise of the prefix [1, t]) - (tree noise of the prefix [1, t-1]):
  summed over the rounds 1..t of a tree, the outputs are the prefix sum plus
  the tree's noise for [1, t]. Every tree node gets fresh N(0, (zC)^2) noise.
  `use_efficient=True` is Honaker's (2015) estimator, which tensorflow-privacy
  and TFF's `DifferentiallyPrivateFactory.tree_aggregation` default to: the
  prefix [1, t] is still covered by the nodes of t's binary expansion (one per
  set bit), but the node of height h (2^h leaves) contributes noise of
  variance (zC)^2 / (2 - 2^-h) instead of (zC)^2 (`prefix_noise_variance`).
  It is post-processing of the same node releases (each node's noised sum
  with std zC), so the privacy analysis is the plain tree's.
* `RestartableTreeQuery` keeps the tree's state at a fixed shape (the level
  buffer padded to `max_levels` rows), so that it is a fixed TFF type and a
  checkpoint restores into the initial state's shapes, and starts a new tree
  when the state says so: `with_new_tree(state, seeds)` (Python, between
  rounds) sets a flag and a fresh noise seed; the next `get_noised_result`
  resets the tree (tensorflow-privacy's `reset_state`, which draws the first
  leaf's noise from the new seed) before it adds noise.
* `NormalizedQuery(..., m)` divides by the cohort size m: the server optimizer
  receives the noised residual mean. With plain SGD on it the model after t
  rounds of a tree is the FTRL iterate of Kairouz et al. 2021.

Noise: `privacy.sampler.normal` (float64, |N| <= 14.7 std), stateless, keyed
by the tree's seed and a counter as tensorflow-privacy's `GaussianNoiseGenerator`
keys its `tf.random.stateless_normal` (`Float64GaussianNoiseGenerator`). Its own default seed is the
clock; here every tree's seed comes from the caller (`privacy.ftrl`: OS
entropy, or --noise_seed in tests).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp
from tensorflow_privacy.privacy.dp_query import tree_aggregation

from dpfl_tff.privacy import sampler

USE_EFFICIENT = True


def max_levels(rounds_per_tree: int) -> int:
    """Rows of the padded level buffer: the tree state after t <= rounds_per_tree steps holds bits of t + 1."""
    return int(rounds_per_tree + 1).bit_length() + 1


def prefix_noise_variance(t: int, noise_std: float, efficient: bool = USE_EFFICIENT) -> float:
    """Variance per coordinate of the tree noise in the sum of the first t outputs of a tree.

    The prefix [1, t] is covered by one node per set bit of t (height h: 2^h
    leaves). Plain tree: each node adds variance s^2, so popcount(t) s^2.
    Efficient (Honaker) tree: the node of height h adds s^2 / (2 - 2^-h).
    """
    heights = [h for h in range(t.bit_length()) if t >> h & 1]
    if not efficient:
        return len(heights) * noise_std**2
    return sum(noise_std**2 / (2 - 2.0**-h) for h in heights)


class RestartableTreeQuery(tfp.SumAggregationDPQuery):
    """A `TreeResidualSumQuery` with a fixed-shape state and a restart flag (see the module docstring)."""

    State = collections.namedtuple("State", ["tree", "levels", "new_tree", "tree_seed"])

    def __init__(self, tree_query: tfp.TreeResidualSumQuery, levels: int, initial_seed: Sequence[int]):
        self._query = tree_query
        self._levels = int(levels)
        self._initial_seed = [int(s) for s in initial_seed]

    def _pad(self, inner) -> Any:
        ts = inner.tree_state
        n = tf.shape(ts.level_buffer_idx)[0]
        with tf.control_dependencies([tf.debugging.assert_less_equal(
                n, self._levels, message="tree deeper than its padded buffer")]):
            n = tf.identity(n)

        def pad(x):
            rows = tf.concat([x, tf.zeros(tf.concat([[self._levels - n], tf.shape(x)[1:]], 0), x.dtype)], 0)
            return tf.reshape(rows, [self._levels, *x.shape[1:]])

        tree_state = tree_aggregation.TreeState(
            level_buffer=tf.nest.map_structure(pad, ts.level_buffer),
            level_buffer_idx=pad(ts.level_buffer_idx),
            value_generator_state=ts.value_generator_state,
        )
        return inner._replace(tree_state=tree_state), n

    def _unpad(self, state) -> Any:
        ts = state.tree.tree_state
        tree_state = tree_aggregation.TreeState(
            level_buffer=tf.nest.map_structure(lambda x: x[: state.levels], ts.level_buffer),
            level_buffer_idx=ts.level_buffer_idx[: state.levels],
            value_generator_state=ts.value_generator_state,
        )
        return state.tree._replace(tree_state=tree_state)

    def _state(self, inner, new_tree, seed) -> Any:
        padded, n = self._pad(inner)
        return self.State(padded, tf.cast(n, tf.int32), tf.cast(new_tree, tf.int32), tf.cast(seed, tf.int64))

    def initial_global_state(self):
        return self._state(self._query.initial_global_state(), 1, tf.constant(self._initial_seed, tf.int64))

    def derive_sample_params(self, global_state):
        return global_state.tree.clip_value

    def initial_sample_state(self, template):
        return self._query.initial_sample_state(template)

    def preprocess_record(self, params, record):
        return self._query.preprocess_record(params, record)

    def _restarted(self, inner, seed):
        generator = inner.tree_state.value_generator_state
        tree_state = inner.tree_state._replace(value_generator_state=generator._replace(seeds=seed))
        return self._query.reset_state(None, inner._replace(tree_state=tree_state))

    @tf.function
    def get_noised_result(self, sample_state, global_state):
        inner = self._unpad(global_state)
        if global_state.new_tree > 0:
            inner = self._restarted(inner, global_state.tree_seed)
        noised, inner, event = self._query.get_noised_result(sample_state, inner)
        return noised, self._state(inner, 0, global_state.tree_seed), event

    def derive_metrics(self, global_state):
        return self._query.derive_metrics(global_state.tree)


class Float64GaussianNoiseGenerator(tree_aggregation.GaussianNoiseGenerator):
    """tensorflow-privacy's tree-node noise generator, its draws made in float64 by `privacy.sampler`.

    The same state (a counter of seeds and the std) and the same stateless
    keying as `GaussianNoiseGenerator.next` (tensor i of a node: the seeds + i),
    but each node's noise is `sampler.normal` (|N| <= 14.7 std) times the std
    in float64, then cast to the spec's dtype (the tree's buffers are float32).
    """

    def next(self, state):
        flat_specs = tf.nest.flatten(self._specs)
        flat_seeds = [state.seeds + i for i in range(len(flat_specs))]
        std = tf.cast(state.stddev, tf.float64)
        noise = [tf.cast(std * sampler.normal(spec.shape, seed=seed), spec.dtype)
                 for spec, seed in zip(flat_specs, flat_seeds)]
        return tf.nest.pack_sequence_as(self._specs, noise), self._GlobalState(flat_seeds[-1] + 1, state.stddev)


def _l2_clip(record_as_list, clip_norm):
    clipped, _ = tf.clip_by_global_norm(record_as_list, clip_norm)
    return clipped


def ftrl_query(clip_norm: float, noise_multiplier: float, expected_cohort: float, record_specs: Any,
               rounds_per_tree: int, initial_seed: Sequence[int]) -> tfp.NormalizedQuery:
    """The DP-FTRL query: clip to `clip_norm`, residual tree noise of std z*C per node, / m.

    `TreeResidualSumQuery.build_l2_gaussian_query` with its noise generator
    replaced by `Float64GaussianNoiseGenerator`.
    """
    if clip_norm < 0 or noise_multiplier < 0:
        raise ValueError(f"clip_norm={clip_norm} and noise_multiplier={noise_multiplier} must be >= 0")
    generator = Float64GaussianNoiseGenerator(
        noise_std=clip_norm * noise_multiplier, specs=record_specs, seed=int(initial_seed[0]))
    tree = tfp.TreeResidualSumQuery(clip_fn=_l2_clip, clip_value=clip_norm, record_specs=record_specs,
                                    noise_generator=generator, use_efficient=USE_EFFICIENT)
    restartable = RestartableTreeQuery(tree, max_levels(rounds_per_tree), initial_seed)
    return tfp.NormalizedQuery(restartable, denominator=float(expected_cohort))


def with_new_tree(aggregator_state: Any, seeds: Sequence[int]) -> Any:
    """`ftrl_query`'s state (numpy, as the process returns it) set to start a new tree seeded by `seeds`."""
    inner = aggregator_state.numerator_state
    restart = type(inner)(inner.tree, inner.levels, np.int32(1), np.asarray(seeds, np.int64))
    return type(aggregator_state)(restart, aggregator_state.denominator)
