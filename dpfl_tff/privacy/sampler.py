"""DP noise drawn in float64 with a stated bound (TensorFlow): every mechanism's Gaussian and Laplace draws.

Why not `tf.random.normal`: TensorFlow's normal samplers, float32 and float64
alike, floor their uniform at 1e-7 before the logarithm (`BoxMullerFloat` in
tsl/lib/random/random_distributions_utils.h, `BoxMullerDouble` in
tsl/lib/random/random_distributions.h, both shipped in the wheel's include/
folder), so every draw has |N| <= sqrt(-2 ln 1e-7) = 5.678 standard
deviations. An output that the neighbouring data set cannot produce then
has infinite privacy loss; at small noise that happens often enough to break
the stated delta (`privacy.truncation` counts it).

Here the uniform that feeds the logarithm has 156 random bits where it
matters:

  c = 1 - U1, and where c < 2^-24 (one draw in 2^24) c is refined to
  v = (c - U2 * 2^-52) - U3 * 2^-104; elsewhere v = c,
  U1, U2, U3 TensorFlow float64 uniforms (k * 2^-52, k uniform in [0, 2^52)).

So v falls in each interval ((k - 1) 2^-52, k 2^-52] with probability 2^-52:
at its top for k >= 2^28 (as a float64 uniform does) and uniformly on the
grid {j * 2^-156} of it below (near 0, where it matters, every operation is
exact; elsewhere a subtraction rounds by a relative 2^-53, and rounding is
monotone, so v is never below 2^-156 and never 0). Each coordinate's v
depends on its own uniforms only; U2 and U3 are drawn only for the
coordinates refined (`_REFINE_BELOW`), which halves the random bits of a
draw. Then

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
# 1 - U1 below this is refined with 104 more bits (U2, U3); above it R = sqrt(-2 ln v) < 5.77.
_REFINE_BELOW = 2.0**-24
# Op-seed offsets of a draw's uniforms (U1, U2, U3, U4), and of the tensors of a structure (seeded tests only).
_UNIFORM_OFFSETS = (0, 1, 2, 3)
TENSOR_SEED_STRIDE = 4


def _uniform(k: int, n: tf.Tensor, seed: tf.Tensor | None, op_seed: int | None) -> tf.Tensor:
    """The float64 uniform vector U_k of length n: stateless keyed by `seed`, else stateful (`op_seed` or entropy)."""
    if seed is not None:
        key = tf.cast(seed, tf.int64) + tf.constant([0, 1], tf.int64) * (k + 1) * 7919
        return tf.random.stateless_uniform(tf.reshape(n, [1]), seed=key, dtype=tf.float64)
    s = None if op_seed is None else (op_seed + k) % 2**31
    return tf.random.uniform(tf.reshape(n, [1]), dtype=tf.float64, seed=s)


def _fine(c: tf.Tensor, u2: tf.Tensor, u3: tf.Tensor) -> tf.Tensor:
    """c = 1 - U1 refined to the grid {j 2^-156 : j = 1..2^156} of its 2^-52 interval: never 0 (module docstring)."""
    return (c - u2 * _TWO_POW_M52) - u3 * (_TWO_POW_M52 * _TWO_POW_M52)


def _v(n: tf.Tensor, seed: tf.Tensor | None, op_seed: int | None,
       refine_below: float = _REFINE_BELOW) -> tf.Tensor:
    """n independent v's (module docstring): 1 - U1, refined where it is below `refine_below`."""
    c = 1.0 - _uniform(_UNIFORM_OFFSETS[0], n, seed, op_seed)

    def refined():
        where = tf.where(c < refine_below)
        m = tf.shape(where, out_type=tf.int32)[0]
        fine = _fine(tf.gather_nd(c, where), _uniform(_UNIFORM_OFFSETS[1], m, seed, op_seed),
                     _uniform(_UNIFORM_OFFSETS[2], m, seed, op_seed))
        return tf.tensor_scatter_nd_update(c, where, fine)

    return tf.cond(tf.reduce_any(c < refine_below), refined, lambda: c)


def gaussian_from_v(v: tf.Tensor, u4: tf.Tensor, scale=1.0) -> tf.Tensor:
    """Box-Muller pairs from P v's and P angle uniforms: 2P normals times `scale` (cosines, then sines)."""
    r = tf.cast(scale, tf.float64) * tf.sqrt(-2.0 * tf.math.log(v))
    theta = (2.0 * math.pi) * u4
    return tf.concat([r * tf.cos(theta), r * tf.sin(theta)], axis=0)


def laplace_from_v(v: tf.Tensor, u4: tf.Tensor, scale=1.0) -> tf.Tensor:
    """Laplace draws times `scale` from v's and sign uniforms: sign (u4 < 1/2) times -ln v."""
    magnitude = tf.cast(scale, tf.float64) * -tf.math.log(v)
    return tf.where(u4 < 0.5, magnitude, -magnitude)


def normal(shape, seed: tf.Tensor | None = None, op_seed: int | None = None, scale=1.0,
           refine_below: float = _REFINE_BELOW) -> tf.Tensor:
    """Normal float64 noise of `shape` and std `scale`, |N| <= `GAUSSIAN_BOUND` scale (Box-Muller, 156-bit tail)."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    pairs = (size + 1) // 2
    v = _v(pairs, seed, op_seed, refine_below)
    flat = gaussian_from_v(v, _uniform(_UNIFORM_OFFSETS[3], pairs, seed, op_seed), scale)[:size]
    return tf.reshape(flat, shape)


def laplace(shape, seed: tf.Tensor | None = None, op_seed: int | None = None, scale=1.0,
            refine_below: float = _REFINE_BELOW) -> tf.Tensor:
    """Laplace float64 noise of `shape` and scale b = `scale`, |L| <= `LAPLACE_BOUND` b (sign times -ln v)."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    v = _v(size, seed, op_seed, refine_below)
    return tf.reshape(laplace_from_v(v, _uniform(_UNIFORM_OFFSETS[3], size, seed, op_seed), scale), shape)


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
    noise = _DRAW[kind](tf.shape(value), seed=seed, op_seed=op_seed, scale=scale)
    noised = tf.cast(value, tf.float64) + noise
    return tf.cast(noised, value.dtype)
