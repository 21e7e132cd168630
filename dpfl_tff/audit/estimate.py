"""Empirical epsilon from two fitted Gaussians: the estimator of Andrew et al. (ICLR 2024), pure NumPy/SciPy.

An attack statistic (the cosine between a canary's direction and the model
delta) is observed for canaries that were in the population ("inserted") and
for canaries that were not (the null: held-out canaries, or the analytic
distribution of the cosine with a random direction, N(0, 1/d) for d >= 1000).
Both are fitted with Gaussians, N(mu0, s0^2) (null) and N(mu1, s1^2), and the
estimate is the epsilon at which the pair of Gaussians is (epsilon, delta)-DP:
the smallest eps >= 0 with

    max(H_eps(P1 || P0), H_eps(P0 || P1)) <= delta,
    H_eps(P || Q) = integral of max(0, p(x) - e^eps q(x)) dx  (hockey-stick divergence)

computed exactly: the region where p > e^eps q is the set where a quadratic
in x is positive (one or two intervals), whose masses are normal CDFs.

What it is: the epsilon a test between the two fitted Gaussians would need,
i.e. the privacy loss that this attack (cosine statistic) exhibits on this
run. It is an estimate, not a bound: a Gaussian fit to finite samples has
sampling error and ignores the tails, and a stronger attack could show more.
It can show that a theoretical bound is loose, or that noise is missing (a
large estimate on a noise-free run); it cannot prove that a run is private.
With few canaries the fits' sampling error alone gives a positive estimate
(`no_signal_level`: at delta 5.6e-4, 95% of no-signal estimates are below
about 1.0 with 200 canaries against the analytic null, 2.6 with 50).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.special

_log_cdf = scipy.special.log_ndtr  # log Phi(x), accurate far into both tails


def _log_sf(x: float) -> float:
    return float(_log_cdf(-x))


# Epsilons beyond this are reported as inf (the two fits are, for any practical delta, told apart surely).
MAX_EPSILON = 1e4


@dataclasses.dataclass(frozen=True)
class Gaussian:
    mean: float
    std: float

    def __post_init__(self):
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"a Gaussian needs a finite mean and a std > 0, got {self.mean}, {self.std}")


def fit(samples: Sequence[float]) -> Gaussian:
    """The Gaussian with the samples' mean and standard deviation (ddof=1); needs >= 2 distinct samples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"fitting a Gaussian needs at least 2 samples, got {x.size}")
    return Gaussian(float(x.mean()), float(x.std(ddof=1)))


def cosine_null(dim: int) -> Gaussian:
    """N(0, 1/d): the cosine between a uniformly random direction and any fixed vector in R^d.

    Its mean is 0 and its variance exactly 1/d; its shape is Gaussian within
    the paper's tolerance for d >= 1000 (the exact density is proportional to
    (1 - t^2)^((d-3)/2)).
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    return Gaussian(0.0, dim**-0.5)


def gaussian_mechanism_delta(eps: float, mu: float) -> float:
    """delta(eps) of the Gaussian mechanism with sensitivity/std ratio mu (Balle & Wang 2018, Thm. 8):

    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2); this is H_eps between N(0,1) and N(mu,1).
    """
    if mu == 0:
        return 0.0
    mu = abs(mu)
    a = float(_log_cdf(-eps / mu + mu / 2))
    b = eps + float(_log_cdf(-eps / mu - mu / 2))
    return float(np.exp(a) * -np.expm1(b - a)) if b < a else 0.0


def _log_mass(g: Gaussian, intervals: list[tuple[float, float]]) -> float:
    """log P(X in union of disjoint intervals), X ~ g, computed in the tail that keeps precision."""
    logs = []
    for lo, hi in intervals:
        a, b = (lo - g.mean) / g.std, (hi - g.mean) / g.std
        if a >= b:
            continue
        if a > 0:  # both in the upper tail: use survival functions
            la, lb = _log_sf(a), _log_sf(b)
        else:  # lower tail (or straddling 0): CDFs are precise enough
            la, lb = float(_log_cdf(b)), float(_log_cdf(a))
        if lb == -np.inf:
            logs.append(la)
        elif la > lb:
            logs.append(la + math.log(-math.expm1(lb - la)))
    return float(scipy.special.logsumexp(logs)) if logs else -np.inf


def _loss_region(p: Gaussian, q: Gaussian, eps: float) -> list[tuple[float, float]]:
    """Intervals of {x : log p(x) - log q(x) > eps}: where a x^2 + b x + c > 0."""
    a = 0.5 / q.std**2 - 0.5 / p.std**2
    b = p.mean / p.std**2 - q.mean / q.std**2
    c = 0.5 * (q.mean / q.std) ** 2 - 0.5 * (p.mean / p.std) ** 2 + math.log(q.std / p.std) - eps
    inf = math.inf
    if a == 0:
        if b == 0:
            return [(-inf, inf)] if c > 0 else []
        root = -c / b
        return [(root, inf)] if b > 0 else [(-inf, root)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-inf, inf)] if a > 0 else []
    # Stable roots: q_ = -(b + sign(b) sqrt(disc)) / 2; roots q_/a and c/q_ (no cancellation when a is tiny).
    q_ = -0.5 * (b + math.copysign(math.sqrt(disc), b))
    r1, r2 = sorted((q_ / a, c / q_))  # q_ != 0 since disc > 0
    return [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]


def log_hockey_stick(eps: float, p: Gaussian, q: Gaussian) -> float:
    """log H_eps(P || Q) = log(P(S) - e^eps Q(S)), S = {p > e^eps q}; -inf when it is 0."""
    region = _loss_region(p, q, eps)
    lp, lq = _log_mass(p, region), _log_mass(q, region)
    if lp == -np.inf or eps + lq >= lp:
        return -np.inf
    return lp + math.log(-math.expm1(eps + lq - lp))


def delta_two_gaussians(eps: float, null: Gaussian, alt: Gaussian) -> float:
    """delta(eps) of the pair: the larger hockey-stick divergence of the two directions."""
    return math.exp(max(log_hockey_stick(eps, alt, null), log_hockey_stick(eps, null, alt)))


def epsilon_two_gaussians(null: Gaussian, alt: Gaussian, delta: float, xtol: float = 1e-7) -> float:
    """The smallest eps >= 0 with delta_two_gaussians(eps) <= delta (bisection on log delta, to `xtol`); inf above
    MAX_EPSILON."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(log_hockey_stick(eps, alt, null), log_hockey_stick(eps, null, alt)) - log_delta

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > MAX_EPSILON:
            return math.inf
    # delta(eps) is non-increasing in eps, so the root is unique; the default xtol is far below any reported digit.
    return float(scipy.optimize.bisect(lambda e: 1.0 if excess(e) > 0 else -1.0, lo, hi, xtol=xtol))


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Epsilon at `delta` of the Gaussian mechanism with ratio `mu` (the closed form, inverted by bisection)."""
    if gaussian_mechanism_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_mechanism_delta(hi, mu) > delta:
        hi *= 2
    return float(scipy.optimize.bisect(lambda e: gaussian_mechanism_delta(e, mu) - delta, 0.0, hi, xtol=1e-12))


def no_signal_level(k_inserted: int, k_held_out: int | None, delta: float, quantile: float = 0.95,
                    repetitions: int = 200, seed: int = 0) -> float:
    """The `quantile` of the estimate when inserted and null statistics have the same distribution.

    A Gaussian fit to k samples has sampling error, and the two-Gaussian
    epsilon turns any difference of the fits (a variance ratio above all) into
    a positive epsilon: with no signal at all the estimate is not 0. This
    simulates that case (k_inserted standard normal samples against the
    standard normal null, or against k_held_out more samples when the null is
    fitted too; the estimate is invariant to shifting and scaling both) with
    a fixed seed, so the level is a reference, not a random output. An
    estimate below it is indistinguishable from fitting noise.
    """
    rng = np.random.default_rng(seed)
    known = Gaussian(0.0, 1.0)
    values = []
    for _ in range(repetitions):
        null = known if k_held_out is None else fit(rng.standard_normal(k_held_out))
        values.append(epsilon_two_gaussians(null, fit(rng.standard_normal(k_inserted)), delta, xtol=1e-3))
    return float(np.quantile(values, quantile))


def estimate(inserted: Sequence[float], delta: float, null: Gaussian | None = None,
             held_out: Sequence[float] | None = None) -> dict:
    """The empirical epsilon at `delta` of inserted-canary statistics against a null.

    The null is `null` (e.g. `cosine_null(d)`) if given, else the Gaussian
    fitted to `held_out`. Returns {"epsilon", "delta", "inserted": {mean, std},
    "null": {mean, std}, "null_source", "no_signal_level_95"} (see `no_signal_level`).
    """
    if null is None:
        if held_out is None:
            raise ValueError("give the null distribution or held-out samples")
        null, source = fit(held_out), "held_out"
    else:
        source = "analytic"
    alt = fit(inserted)
    return {
        "epsilon": epsilon_two_gaussians(null, alt, delta), "delta": delta,
        "inserted": dataclasses.asdict(alt), "null": dataclasses.asdict(null), "null_source": source,
        "no_signal_level_95": no_signal_level(len(inserted), None if source == "analytic" else len(held_out), delta),
    }
