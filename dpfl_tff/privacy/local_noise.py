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
  L1 sensitivity 2C, so one release is pure (2/z)-DP (Dwork et al. 2006).
"""

from __future__ import annotations

import tensorflow as tf

from dpfl_tff.config import LOCAL_MECHANISMS

GAUSSIAN, LAPLACE = LOCAL_MECHANISMS


def _global_norm(tensors, order: int) -> tf.Tensor:
    if order == 2:
        return tf.linalg.global_norm(tensors)
    return tf.add_n([tf.reduce_sum(tf.abs(t)) for t in tensors])


def _draw(kind: str, shape, seed: tf.Tensor | None) -> tf.Tensor:
    """Standard normal or standard Laplace noise; stateless when `seed` (int64[2]) is given."""
    if kind == GAUSSIAN:
        if seed is None:
            return tf.random.normal(shape)
        return tf.random.stateless_normal(shape, seed=seed)
    # Laplace(0, 1) as the difference of two Exp(1) draws; 1 - U lies in (0, 1], so logs are finite.
    if seed is None:
        u1, u2 = tf.random.uniform(shape), tf.random.uniform(shape)
    else:
        u1 = tf.random.stateless_uniform(shape, seed=seed)
        u2 = tf.random.stateless_uniform(shape, seed=seed + tf.constant([0, 1], tf.int64))
    return tf.math.log(1.0 - u2) - tf.math.log(1.0 - u1)


def _content_hash(flat) -> tf.Tensor:
    """A deterministic int64 of the tensors' values (seeded test mode only)."""
    v = tf.concat([tf.reshape(t, [-1]) for t in flat], axis=0)
    w = tf.cast(tf.range(1, tf.size(v) + 1), tf.float32)
    return tf.cast(tf.bitcast(tf.reduce_sum(v * tf.sin(w)), tf.int32), tf.int64)


def clip_and_noise(tensors, mechanism: str, clip: float, noise_multiplier: float, seed: tf.Tensor | None = None):
    """Clips `tensors` jointly (L2 for gaussian, L1 for laplace) to `clip` and adds noise.

    Noise: N(0, (z C)^2) or Laplace(0, z C) per coordinate, from TF's stateful
    RNG seeded by OS entropy; if `seed` (int64 scalar, tests only) is given, from
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
        noised.append(t * scale + noise_multiplier * clip * _draw(mechanism, tf.shape(t), op_key))
    return tf.nest.pack_sequence_as(tensors, noised)


def zero_nonfinite(tensors):
    """`tensors` unchanged if all finite, else zeros of the same structure (norm 0 <= any clip)."""
    flat = tf.nest.flatten(tensors)
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
    return tf.nest.map_structure(lambda t: tf.where(finite, t, tf.zeros_like(t)), tensors)
