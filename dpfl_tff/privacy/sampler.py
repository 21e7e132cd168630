"""DP noise drawn in float64 with a stated bound (TensorFlow): every mechanism's Gaussian and Laplace draws.

Why not `tf.random.normal`: TensorFlow's normal samplers, float32 and float64
alike, floor their uniform at 1e-7 before the logarithm (`BoxMullerFloat` in
tsl/lib/random/random_distributions_utils.h, `BoxMullerDouble` in
tsl/lib/random/random_distributions.h, both shipped in the wheel's include/
folder), so every draw has |N| <= sqrt(-2 ln 1e-7) = 5.678 standard
deviations. An output that the neighbouring data set cannot produce then
has infinite privacy loss; at small noise that happens often enough to break
the stated delta (`privacy.truncation` counts it).

Here the uniform that feeds the logarithm has 156 random bits:

  v = ((1 - U1) - U2 * 2^-52) - U3 * 2^-104,
  U1, U2, U3 TensorFlow float64 uniforms (k * 2^-52, k uniform in [0, 2^52)),

which is uniform on the grid {j * 2^-156 : j = 1, ..., 2^156} (near 0, where
it matters, every operation is exact; elsewhere a subtraction rounds by a
relative 2^-53, and rounding is monotone, so v is never below 2^-156 and
never 0). Then

* Gaussian (Box-Muller): R = sqrt(-2 ln v), theta = 2 pi U4; (R cos theta,
  R sin theta) is a pair of standard normals conditioned on R <= B with
  `GAUSSIAN_BOUND` B = sqrt(312 ln 2) = 14.706 (R is Rayleigh: P(R > r) =
  exp(-r^2 / 2), and exp(-B^2 / 2) = 2^-156 is the smallest v). Each pair
  fills two consecutive coordinates of a tensor.
* Laplace: E = -ln v is Exp(1) conditioned on E <= `LAPLACE_BOUND`
  = 156 ln 2 = 108.13, with a sign from U4 < 1/2: a standard Laplace
  conditioned on |L| <= 108.13.

Noise is added in float64 to the value cast to float64, and the sum is cast
back (`add_noise`): the float32 rounding is then post-processing of the
float64 release. What remains of floating point (the grid of v and of theta,
rounding inside log, sqrt, sincos and the addition; Mironov 2012) is in
docs/privacy.md#floating-point-noise.

Randomness: TensorFlow's stateful uniform ops, seeded by OS entropy (no op
seed), or by `op_seed` (tests only), or stateless keyed by `seed` (int64[2]).
"""

from __future__ import annotations

import math

import tensorflow as tf

from dpfl_tff.privacy.truncation import GAUSSIAN_BOUND, LAPLACE_BOUND  # noqa: F401  (stated with the samplers)

_TWO_POW_M52 = 2.0**-52
# Op-seed offsets of the four uniforms of one draw, and of the tensors of a structure (seeded tests only).
_UNIFORM_OFFSETS = (0, 1, 2, 3)
TENSOR_SEED_STRIDE = 4


def _uniforms(n: tf.Tensor, seed: tf.Tensor | None, op_seed: int | None) -> list[tf.Tensor]:
    """Four float64 uniform vectors of length n: stateless keyed by `seed`, else stateful (`op_seed` or entropy)."""
    out = []
    for k in _UNIFORM_OFFSETS:
        if seed is not None:
            key = tf.cast(seed, tf.int64) + tf.constant([0, 1], tf.int64) * (k + 1) * 7919
            out.append(tf.random.stateless_uniform([n], seed=key, dtype=tf.float64))
        else:
            s = None if op_seed is None else (op_seed + k) % 2**31
            out.append(tf.random.uniform([n], dtype=tf.float64, seed=s))
    return out


def _v(u1: tf.Tensor, u2: tf.Tensor, u3: tf.Tensor) -> tf.Tensor:
    """Uniform on {j 2^-156 : j = 1..2^156}: never 0 (see the module docstring)."""
    return ((1.0 - u1) - u2 * _TWO_POW_M52) - u3 * (_TWO_POW_M52 * _TWO_POW_M52)


def gaussian_from_uniforms(u1: tf.Tensor, u2: tf.Tensor, u3: tf.Tensor, u4: tf.Tensor) -> tf.Tensor:
    """Box-Muller pairs from four float64 uniform vectors of length P: 2P normals (cosines, then sines)."""
    r = tf.sqrt(-2.0 * tf.math.log(_v(u1, u2, u3)))
    theta = (2.0 * math.pi) * u4
    return tf.concat([r * tf.cos(theta), r * tf.sin(theta)], axis=0)


def laplace_from_uniforms(u1: tf.Tensor, u2: tf.Tensor, u3: tf.Tensor, u4: tf.Tensor) -> tf.Tensor:
    """Standard Laplace draws from four float64 uniform vectors: sign (u4 < 1/2) times -ln v."""
    magnitude = -tf.math.log(_v(u1, u2, u3))
    return tf.where(u4 < 0.5, magnitude, -magnitude)


def normal(shape, seed: tf.Tensor | None = None, op_seed: int | None = None) -> tf.Tensor:
    """Standard normal float64 noise of `shape`, |N| <= `GAUSSIAN_BOUND` (Box-Muller on a 156-bit uniform)."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    flat = gaussian_from_uniforms(*_uniforms((size + 1) // 2, seed, op_seed))[:size]
    return tf.reshape(flat, shape)


def laplace(shape, seed: tf.Tensor | None = None, op_seed: int | None = None) -> tf.Tensor:
    """Standard Laplace float64 noise of `shape`, |L| <= `LAPLACE_BOUND` (sign times -ln of a 156-bit uniform)."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    return tf.reshape(laplace_from_uniforms(*_uniforms(size, seed, op_seed)), shape)


GAUSSIAN, LAPLACE = "gaussian", "laplace"
_DRAW = {GAUSSIAN: normal, LAPLACE: laplace}


def add_noise(value: tf.Tensor, scale, kind: str = GAUSSIAN, seed: tf.Tensor | None = None,
              op_seed: int | None = None) -> tf.Tensor:
    """`value + scale * noise`, computed in float64 and cast back to `value`'s dtype.

    Args:
      value: the tensor to noise (any float dtype).
      scale: the noise's standard deviation (gaussian) or Laplace scale b (a
        Python float or a scalar tensor).
      kind: "gaussian" or "laplace".
      seed: int64[2] for stateless noise (tests only).
      op_seed: an op seed for TensorFlow's stateful uniforms (tests only).
    """
    noise = _DRAW[kind](tf.shape(value), seed=seed, op_seed=op_seed)
    noised = tf.cast(value, tf.float64) + tf.cast(scale, tf.float64) * noise
    return tf.cast(noised, value.dtype)
