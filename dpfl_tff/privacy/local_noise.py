"""The noise of client-level (local) DP, added by each client to its own update (TensorFlow).

`queries.LocalNoiseMeanQuery` calls `clip_and_noise` in `preprocess_record`,
that is inside the client computation (TFF `CLIENTS` placement): nothing
computed from the client's data leaves the client but its noised update (a
non-finite update is zeroed first, `zero_nonfinite`).

Mechanisms (C = clip norm, z = noise multiplier), per client per round:

* `gaussian`: clip to L2 norm C, add N(0, (z C)^2) to every coordinate.
  Replacing the client's whole data moves the clipped update by up to 2C in
  L2, so one release is the Gaussian mechanism with noise multiplier z/2:
  (epsilon, delta)-DP for every delta, computed by the accountant.
* `laplace`: clip to L1 norm C, add Laplace(0, b = z C) to every coordinate.
  L1 sensitivity 2C, so one release of the ideal Laplace is pure (2/z)-DP
  (Dwork et al. 2006); the sampler's Laplace is bounded (|L| <= 108.1 b), so
  what runs is (2/z, delta_sampler)-DP (`privacy.truncation`), not pure.
"""

from __future__ import annotations

import tensorflow as tf

from dpfl_tff.config import LOCAL_MECHANISMS
from dpfl_tff.privacy import sampler

GAUSSIAN, LAPLACE = LOCAL_MECHANISMS
assert (GAUSSIAN, LAPLACE) == (sampler.GAUSSIAN, sampler.LAPLACE)


def _global_norm(tensors, order: int) -> tf.Tensor:
    if order == 2:
        return tf.linalg.global_norm(tensors)
    return tf.add_n([tf.reduce_sum(tf.abs(t)) for t in tensors])


def _content_hash(flat) -> tf.Tensor:
    """A deterministic int64 of the tensors' values (seeded test mode only)."""
    v = tf.concat([tf.reshape(t, [-1]) for t in flat], axis=0)
    w = tf.cast(tf.range(1, tf.size(v) + 1), tf.float32)
    return tf.cast(tf.bitcast(tf.reduce_sum(v * tf.sin(w)), tf.int32), tf.int64)


def clip_and_noise(tensors, mechanism: str, clip: float, noise_multiplier: float, seed: tf.Tensor | None = None):
    """Clips `tensors` jointly (L2 for gaussian, L1 for laplace) to `clip` and adds noise.

    Noise: N(0, (z C)^2) or Laplace(0, z C) per coordinate, drawn in float64
    and added in float64 (`sampler.add_noise`: |N| <= 14.7 std, |L| <= 108.1
    scales), from TF's stateful RNG seeded by OS entropy; if `seed` (int64 scalar, tests only) is given, from
    a stateless RNG keyed by the seed and the update's own values (so clients
    with bit-identical updates then draw identical noise).

    Returns:
      The noised tensors, shaped like `tensors`. Nothing else: the norm and
      whether it was clipped are the client's own and never leave it.
    """
    flat = [tf.cast(t, tf.float32) for t in tf.nest.flatten(tensors)]
    order = 2 if mechanism == GAUSSIAN else 1
    norm = _global_norm(flat, order)
    scale = tf.minimum(1.0, clip / tf.maximum(norm, 1e-12))
    key = None if seed is None else tf.stack([seed, _content_hash(flat)])
    noised = []
    for i, t in enumerate(flat):
        op_key = None if key is None else key + tf.constant([0, 2**20], tf.int64) * i
        noised.append(sampler.add_noise(t * scale, noise_multiplier * clip, mechanism, seed=op_key))
    return tf.nest.pack_sequence_as(tensors, noised)


def zero_nonfinite(tensors):
    """`tensors` unchanged if all finite, else zeros of the same structure (norm 0 <= any clip)."""
    flat = tf.nest.flatten(tensors)
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
    return tf.nest.map_structure(lambda t: tf.where(finite, t, tf.zeros_like(t)), tensors)
