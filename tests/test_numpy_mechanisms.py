"""Statistical tests of the NumPy mechanisms; tolerances from sampling theory.

Every test seeds its generator, so each is deterministic: it passes or fails on every run, never
at random (failure probability per run 0 once it passes).
"""

import math

import numpy as np
import pytest

from dpfl_tff.privacy import numpy_mechanisms as M

N = 400_000


def test_laplace_moments_match_scale():
    rng = np.random.default_rng(0)
    out, b = M.laplace_mechanism(np.zeros(N), l1_sensitivity=2.0, epsilon=0.5, rng=rng)
    assert b == 4.0
    # Laplace(0, b): mean 0 (sd of the sample mean sqrt(2/N) b), variance 2 b^2
    # (sd of the sample variance sqrt((mu4 - sigma^4)/N) = sqrt(20/N) b^2), excess kurtosis 3.
    assert abs(out.mean()) < 5 * math.sqrt(2 / N) * b
    assert abs(out.var() - 2 * b**2) < 5 * math.sqrt(20 / N) * b**2
    kurt = np.mean(out**4) / out.var() ** 2 - 3
    assert abs(kurt - 3) < 0.3  # sd of the kurtosis estimate for Laplace at N=4e5 is about 0.05


def _max_log_density_ratio(a, b, bins):
    """Largest |log(p_a/p_b)| over histogram bins, ignoring bins with < 2000 samples in either."""
    ca, _ = np.histogram(a, bins)
    cb, _ = np.histogram(b, bins)
    keep = (ca >= 2000) & (cb >= 2000)
    ratios = np.log(ca[keep] / cb[keep])
    # Per-bin sd of the log ratio is about sqrt(1/ca + 1/cb) <= sqrt(2/2000) = 0.032.
    return np.max(np.abs(ratios)), keep.sum()


def test_laplace_privacy_loss_within_epsilon_on_the_bulk():
    rng = np.random.default_rng(1)
    eps, sens = 1.0, 1.0
    x, x_prime = 0.0, sens  # neighbouring values at the sensitivity bound
    a = M.laplace_mechanism(np.full(N, x), sens, eps, rng)[0]
    b = M.laplace_mechanism(np.full(N, x_prime), sens, eps, rng)[0]
    worst, nbins = _max_log_density_ratio(a, b, np.linspace(-4, 5, 46))
    assert nbins > 20
    assert worst <= eps + 5 * 0.032  # never above e^eps beyond sampling error
    assert worst >= 0.8 * eps  # and calibrated, not over-noised: the bound is nearly attained


def test_gaussian_analytic_sigma_is_the_smallest_meeting_delta():
    for eps, delta in [(0.1, 1e-5), (1.0, 1e-5), (8.0, 1e-6)]:
        sigma = M.gaussian_sigma_analytic(eps, delta, 2.0)
        assert M.gaussian_delta(sigma, eps, 2.0) <= delta
        assert M.gaussian_delta(sigma * 0.999, eps, 2.0) > delta
    # Balle and Wang 2018: analytic beats classic where classic applies.
    assert M.gaussian_sigma_analytic(0.5, 1e-5, 1.0) < M.gaussian_sigma_classic(0.5, 1e-5, 1.0)
    assert M.gaussian_sigma_analytic(1.0, 1e-5, 1.0) == pytest.approx(3.73, abs=0.01)


def test_gaussian_delta_formula_matches_monte_carlo():
    # delta(eps) = P_x[L > eps] - e^eps P_x'[L > eps] with privacy loss L(y) = log p_x(y)/p_x'(y).
    rng = np.random.default_rng(2)
    sigma, sens, eps = 1.0, 1.0, 0.5
    y = rng.normal(0.0, sigma, N)  # M(x), x = 0
    y_prime = rng.normal(sens, sigma, N)  # M(x'), x' = sens

    def loss(v):  # log N(v; 0, sigma) / N(v; sens, sigma)
        return ((v - sens) ** 2 - v**2) / (2 * sigma**2)

    loss_x, loss_xp = loss(y), loss(y_prime)
    mc = np.mean(loss_x > eps) - math.exp(eps) * np.mean(loss_xp > eps)
    # sd of the estimate <= sqrt(p(1-p)/N) (1 + e^eps) < 0.0021 at N=4e5; 5 sd.
    assert mc == pytest.approx(M.gaussian_delta(sigma, eps, sens), abs=0.011)


def test_gaussian_mechanism_noise_and_classic_range():
    rng = np.random.default_rng(3)
    out, sigma = M.gaussian_mechanism(np.zeros(N), 1.0, 0.5, 1e-5, rng, calibration="classic")
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert out.std() == pytest.approx(sigma, rel=5 / math.sqrt(2 * N))
    with pytest.raises(ValueError, match="epsilon must be < 1"):
        M.gaussian_sigma_classic(1.0, 1e-5, 1.0)


def test_exponential_mechanism_frequencies_match_softmax():
    rng = np.random.default_rng(4)
    u = [3.0, 1.0, 0.0, 2.5, -1.0]
    p = M.exponential_mechanism_probabilities(u, epsilon=2.0, sensitivity=1.0)
    np.testing.assert_allclose(p, np.exp(np.array(u)) / np.exp(np.array(u)).sum(), rtol=1e-12)
    n = 100_000
    counts = np.bincount([M.exponential_mechanism(u, 2.0, 1.0, rng) for _ in range(n)], minlength=5)
    # Each count ~ Binomial(n, p_i): 5 sd.
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)) + 1)


def test_exponential_mechanism_is_stable_for_huge_utilities():
    rng = np.random.default_rng(5)
    u = [1e12, 1e12 - 2.0, -1e12]
    p = M.exponential_mechanism_probabilities(u, 1.0, 1.0)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert M.exponential_mechanism(u, 1.0, 1.0, rng) in (0, 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda r: M.laplace_mechanism([1.0], 1.0, 0.0, r), "epsilon must be a finite number > 0"),
        (lambda r: M.laplace_mechanism([1.0], -1.0, 1.0, r), "l1_sensitivity must be"),
        (lambda r: M.laplace_mechanism([np.nan], 1.0, 1.0, r), "finite"),
        (lambda r: M.gaussian_mechanism([1.0], 1.0, -2.0, 1e-5, r), "epsilon must be"),
        (lambda r: M.gaussian_mechanism([1.0], 1.0, 1.0, 1.0, r), "delta must be in the open interval"),
        (lambda r: M.exponential_mechanism([], 1.0, 1.0, r), "non-empty"),
        (lambda r: M.exponential_mechanism([1.0, np.nan], 1.0, 1.0, r), "finite"),
        (lambda r: M.exponential_mechanism([1.0], 1.0, 0.0, r), "sensitivity must be"),
    ],
)
def test_bad_inputs_fail_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.random.default_rng(0))
