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
    # The extreme inputs: the largest TF float64 uniforms (1 - 2^-52) give c = 2^-52, refined v = 2^-156, R = the
    # stated bound; TensorFlow's own Box-Muller would have stopped at sqrt(-2 ln 1e-7) = 5.678.
    top, zero = tf.constant([1 - 2**-52], tf.float64), tf.zeros([1], tf.float64)
    low = 1.0 - top
    assert low.numpy()[0] == 2.0**-52
    assert sampler._fine(low, top, top).numpy()[0] == 2.0**-156
    assert sampler._fine(1.0 - zero, zero, zero).numpy()[0] == 1.0 and sampler._fine(low, zero, zero).numpy()[0] == 2.0**-52
    assert sampler._fine(low, top, zero).numpy()[0] == 2.0**-104
    smallest = sampler._fine(low, top, top)
    pair = sampler.gaussian_from_v(smallest, zero).numpy()
    assert pair[0] == pytest.approx(math.sqrt(312 * math.log(2)), rel=1e-14) and pair[0] <= truncation.GAUSSIAN_BOUND
    assert pair[0] > 2 * 5.678 and abs(pair[1]) < 1e-12
    lap = sampler.laplace_from_v(smallest, zero).numpy()
    assert lap[0] == pytest.approx(156 * math.log(2), rel=1e-14) and lap[0] <= truncation.LAPLACE_BOUND
    # Without the refinement the largest radius is that of c = 2^-24: the threshold keeps R < 5.77 unrefined.
    assert math.sqrt(-2 * math.log(sampler._REFINE_BELOW)) < 5.78


def test_only_the_small_uniforms_are_refined_and_each_within_its_interval():
    # The refinement with its threshold raised to 2^-8 (4096 of 2^20 draws refined on average), keyed: the same key
    # gives the same c = 1 - U1, so each v can be checked against its own c. Not refined: v = c exactly. Refined:
    # c - 2^-52 <= v <= c, and the gap (c - v) 2^52 is U2 + U3 2^-52 rounded to a multiple of c's ulp 2^52
    # (<= 2^-9 below 2^-8): uniform on [0, 1] to within 2^-9 plus DKW's bound at 1e-7.
    key = tf.constant([11, 12], tf.int64)
    threshold = 2.0**-8
    c = (1.0 - sampler._uniform(0, tf.constant(N), key, None)).numpy()
    v = sampler._v(tf.constant(N), key, None, refine_below=threshold).numpy()
    small = c < threshold
    assert np.array_equal(v[~small], c[~small])
    gap = (c[small] - v[small]) * 2.0**52
    assert np.all(gap >= 0) and np.all(gap <= 1)
    n = int(small.sum())
    assert n > N * threshold - 12 * math.sqrt(N * threshold)  # a binomial: 12 standard deviations below its mean
    assert _ks(gap, stats.uniform.cdf) < 2.0**-9 + math.sqrt(math.log(2 / 1e-7) / (2 * n))
    # At the default threshold (2^-24: at N = 2^20 draws mostly none refined) every other v is its c.
    v_default = sampler._v(tf.constant(N), key, None).numpy()
    assert np.array_equal(v_default[c >= sampler._REFINE_BELOW], c[c >= sampler._REFINE_BELOW])


@pytest.mark.parametrize("refine_below", [sampler._REFINE_BELOW, 1.0])  # the default; every draw refined
def test_normal_draws_are_standard_normal(refine_below):
    x = sampler.normal([N], refine_below=refine_below).numpy()
    assert x.dtype == np.float64 and np.all(np.abs(x) <= truncation.GAUSSIAN_BOUND)
    assert _ks(x, stats.norm.cdf) < DKW
    # Mean and variance: 6 standard errors, two-sided normal tail 2e-9 each (CLT at n = 2^20).
    assert abs(x.mean()) < 6 / math.sqrt(N)
    assert abs(x.var() - 1) < 6 * math.sqrt(2 / N)
    # The two halves of the Box-Muller pairs (cosines, sines) are uncorrelated: |r| < 6 / sqrt(n).
    pairs = sampler.gaussian_from_v(sampler._v(tf.constant(N // 2), None, None, refine_below),
                                    tf.random.uniform([N // 2], dtype=tf.float64)).numpy()
    assert abs(np.corrcoef(pairs[: N // 2], pairs[N // 2:])[0, 1]) < 6 / math.sqrt(N / 2)


@pytest.mark.parametrize("refine_below", [sampler._REFINE_BELOW, 1.0])
def test_laplace_draws_are_standard_laplace(refine_below):
    x = sampler.laplace([N], refine_below=refine_below).numpy()
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
