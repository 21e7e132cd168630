"""The float64 noise samplers (privacy.sampler): their bound, their distribution, their seeds."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from dpfl_tff.privacy import sampler, truncation

N = 2**20
# Dvoretzky-Kiefer-Wolfowitz: P(sup |F_n - F| > t) <= 2 exp(-2 n t^2) for n i.i.d. draws (no asymptotics);
# t below makes that 1e-7 per check. The samplers' truncation moves F by less than 2^-100.
DKW = math.sqrt(math.log(2 / 1e-7) / (2 * N))


def _ks(x: np.ndarray, cdf) -> float:
    x = np.sort(x)
    f = cdf(x)
    i = np.arange(1, len(x) + 1) / len(x)
    return float(max(np.max(i - f), np.max(f - (i - 1 / len(x)))))


def test_the_uniform_is_never_zero_and_reaches_the_bound():
    # The extreme inputs: the largest TF float64 uniforms (1 - 2^-52) give v = 2^-156, R = the stated bound;
    # TensorFlow's own Box-Muller would have stopped at sqrt(-2 ln 1e-7) = 5.678.
    top, zero = tf.constant([1 - 2**-52], tf.float64), tf.zeros([1], tf.float64)
    assert sampler._v(top, top, top).numpy()[0] == 2.0**-156
    assert sampler._v(zero, zero, zero).numpy()[0] == 1.0 and sampler._v(top, zero, zero).numpy()[0] == 2.0**-52
    assert sampler._v(top, top, zero).numpy()[0] == 2.0**-104
    pair = sampler.gaussian_from_uniforms(top, top, top, zero).numpy()
    assert pair[0] == pytest.approx(math.sqrt(312 * math.log(2)), rel=1e-14) and pair[0] <= truncation.GAUSSIAN_BOUND
    assert pair[0] > 2 * 5.678 and abs(pair[1]) < 1e-12
    lap = sampler.laplace_from_uniforms(top, top, top, zero).numpy()
    assert lap[0] == pytest.approx(156 * math.log(2), rel=1e-14) and lap[0] <= truncation.LAPLACE_BOUND


def test_normal_draws_are_standard_normal():
    x = sampler.normal([N]).numpy()
    assert x.dtype == np.float64 and np.all(np.abs(x) <= truncation.GAUSSIAN_BOUND)
    assert _ks(x, stats.norm.cdf) < DKW
    # Mean and variance: 6 standard errors, two-sided normal tail 2e-9 each (CLT at n = 2^20).
    assert abs(x.mean()) < 6 / math.sqrt(N)
    assert abs(x.var() - 1) < 6 * math.sqrt(2 / N)
    # The two halves of the Box-Muller pairs (cosines, sines) are uncorrelated: |r| < 6 / sqrt(n).
    pairs = sampler.gaussian_from_uniforms(*[tf.random.uniform([N // 2], dtype=tf.float64) for _ in range(4)]).numpy()
    assert abs(np.corrcoef(pairs[: N // 2], pairs[N // 2:])[0, 1]) < 6 / math.sqrt(N / 2)


def test_laplace_draws_are_standard_laplace():
    x = sampler.laplace([N]).numpy()
    assert x.dtype == np.float64 and np.all(np.abs(x) <= truncation.LAPLACE_BOUND)
    assert _ks(x, stats.laplace.cdf) < DKW
    assert abs(x.mean()) < 6 * math.sqrt(2 / N)


def test_odd_shapes_and_add_noise_in_float64():
    for shape in ([1], [3, 5], [2, 3, 7], [0]):
        assert sampler.normal(shape).shape == shape and sampler.laplace(shape).shape == shape
    value = tf.fill([4, 3], tf.constant(1e4, tf.float32))
    noised = sampler.add_noise(value, 0.0)
    assert noised.dtype == tf.float32 and np.array_equal(noised.numpy(), value.numpy())
    # scale 2: the noise over 2^20 coordinates has std 2 (6 standard errors, as above).
    big = sampler.add_noise(tf.zeros([N], tf.float32), 2.0).numpy()
    assert abs(big.std() - 2) < 2 * 6 * math.sqrt(0.5 / N)
    assert sampler.add_noise(tf.zeros([2], tf.float16), 1.0, sampler.LAPLACE).dtype == tf.float16


def test_seeds_reproduce_and_otherwise_draws_differ():
    key = tf.constant([3, 4], tf.int64)
    a, b = sampler.normal([5], seed=key).numpy(), sampler.normal([5], seed=key).numpy()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sampler.normal([5], seed=key + 1).numpy())
    assert not np.array_equal(sampler.normal([5]).numpy(), sampler.normal([5]).numpy())
    # Stateful with an op seed: the same first draw in two fresh functions, as the seeded queries rely on.
    first = [tf.function(lambda: sampler.normal([4], op_seed=9))().numpy() for _ in range(2)]
    assert np.array_equal(*first)
