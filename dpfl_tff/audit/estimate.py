"""Empirical epsilon of canary statistics: a point estimate and a lower confidence bound, pure NumPy/SciPy.

An attack statistic (the cosine between a canary's direction and the model
delta) is observed for canaries that were in the population ("inserted") and
for canaries that were not (the null: held-out canaries, or the analytic
distribution of the cosine with a random direction, N(0, 1/d) for d >= 1000).
Two figures come from them.

**The point estimate** (`estimate`, the estimator of Andrew et al., ICLR 2024,
arXiv:2302.03098). Both samples are fitted with Gaussians, N(mu0, s0^2) (null)
and N(mu1, s1^2), and the estimate is the epsilon at which the pair of
Gaussians is (epsilon, delta)-DP: the smallest eps >= 0 with

    max(H_eps(P1 || P0), H_eps(P0 || P1)) <= delta,
    H_eps(P || Q) = integral of max(0, p(x) - e^eps q(x)) dx  (hockey-stick divergence)

computed exactly: the region where p > e^eps q is the set where a quadratic
in x is positive (one or two intervals), whose masses are normal CDFs.
It is an estimate, not a bound, and it is biased upward at finite K: a
Gaussian fit to finite samples has sampling error, which the two-Gaussian
epsilon turns into a positive epsilon even with no signal at all
(`no_signal_level`: at delta 5.6e-4, 95% of no-signal estimates are below
about 1.0 with 200 canaries against the analytic null, 2.6 with 50). So a
correct run can show a point estimate above its theoretical epsilon.

**The lower bound** (`lower_bound`): a one-sided lower confidence bound on
epsilon from a threshold test with Clopper-Pearson intervals (Jagielski et al.
2020, arXiv:2006.07709; Nasr et al. 2021, arXiv:2101.04535). It is this figure
that is compared with the theoretical epsilon: if the run is (eps, delta)-DP,
the bound exceeds eps with probability at most 1 - confidence, and with no
signal it is 0 except with that probability. See `lower_bound` for the test,
the split of the confidence and the premise it rests on.

Neither shows that a run is private: a stronger attack could show more. A
bound above the theoretical epsilon shows (at its confidence) that the noise
or the accounting is wrong; a large one on a noise-free run shows that the
audit can see missing noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

_log_cdf = scipy.special.log_ndtr  # log Phi(x), accurate far into both tails


def _log_sf(x: float) -> float:
    return float(_log_cdf(-x))


# The confidence of `lower_bound` unless one is given (experiments/audit.py --confidence).
DEFAULT_CONFIDENCE = 0.95
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


def _check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")


@functools.lru_cache(maxsize=64)
def _clopper_pearson_table(trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper): one-sided Clopper-Pearson bounds at level `alpha` for k = 0..trials successes.

    lower[k], the alpha quantile of Beta(k, n - k + 1) (0 for k = 0), and upper[k], the 1 - alpha quantile of
    Beta(k + 1, n - k) (1 for k = n), satisfy P_p(lower[K] > p) <= alpha and P_p(upper[K] < p) <= alpha for
    K ~ Binomial(n, p), for every p (Clopper & Pearson 1934).
    """
    k = np.arange(trials + 1)
    lower = np.zeros(trials + 1)
    lower[1:] = scipy.stats.beta.ppf(alpha, k[1:], trials - k[1:] + 1)
    upper = np.ones(trials + 1)
    upper[:-1] = scipy.stats.beta.ppf(1 - alpha, k[:-1] + 1, trials - k[:-1])
    return lower, upper


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """The one-sided lower confidence bound of a binomial rate: below the true rate except with prob <= alpha."""
    return float(_clopper_pearson_table(trials, alpha)[0][successes])


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """The one-sided upper confidence bound of a binomial rate: above the true rate except with prob <= alpha."""
    return float(_clopper_pearson_table(trials, alpha)[1][successes])


def threshold_epsilon(tpr: np.ndarray | float, fpr: np.ndarray | float, delta: float) -> np.ndarray | float:
    """The smallest eps >= 0 that an (eps, delta)-DP pair allows for a test with these true/false positive rates.

    A test "stat >= t" of an (eps, delta)-DP mechanism has TPR <= e^eps FPR + delta and, on the complement
    with the neighbours' roles swapped, 1 - FPR <= e^eps (1 - TPR) + delta (Kairouz et al. 2015,
    arXiv:1311.0776), so eps >= max(0, ln((TPR - delta) / FPR), ln((1 - FPR - delta) / (1 - TPR))). Both
    terms grow with TPR and shrink with FPR: a lower bound of TPR and an upper bound of FPR give a lower
    bound of eps.
    """
    tpr, fpr = np.asarray(tpr, np.float64), np.asarray(fpr, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((tpr > delta) & (fpr > 0), np.log(tpr - delta) - np.log(fpr), np.where(tpr > delta, np.inf, 0.0))
        b = np.where((1 - fpr > delta) & (tpr < 1), np.log(1 - fpr - delta) - np.log1p(-tpr),
                     np.where(1 - fpr > delta, np.inf, 0.0))
    out = np.maximum(0.0, np.maximum(a, b))
    return float(out) if out.ndim == 0 else out


def _at_or_above(sorted_x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return len(sorted_x) - np.searchsorted(sorted_x, thresholds, side="left")


def lower_bound(inserted: Sequence[float], held_out: Sequence[float], delta: float,
                confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """A one-sided lower confidence bound on epsilon at `delta`: a threshold test with Clopper-Pearson intervals.

    The test guesses "inserted" when the statistic is >= a threshold t; its
    true positive rate is estimated on the inserted canaries, its false
    positive rate on the held-out ones, and `threshold_epsilon` turns the
    Clopper-Pearson lower bound of TPR and upper bound of FPR into a lower
    bound of epsilon (Jagielski et al. 2020, arXiv:2006.07709; Nasr et al.
    2021, arXiv:2101.04535).

    How the confidence is split: the threshold is chosen on one half of the
    canaries (the first half of the inserted and of the held-out statistics:
    the canaries' directions are exchangeable, so any fixed split is a random
    one), midway between two consecutive statistics of that half, as the one
    with the largest bound there, and the bound is evaluated
    on the other half, which played no part in the choice. So no correction
    for the choice is needed (no Bonferroni over thresholds); alpha =
    1 - confidence is split evenly between the two one-sided intervals, TPR
    (alpha/2) and FPR (alpha/2), and by the union bound both hold with
    probability >= confidence. Then the bound is <= the epsilon of any
    (eps, delta) the mechanism satisfies, and with no signal (inserted and
    held-out statistics alike) it is 0, except with probability
    <= 1 - confidence.

    The premise: the statistics are independent trials, the held-out ones
    draws of the statistic of a canary that was not inserted, the inserted
    ones of a canary that was. For the held-out canaries this is exact (their
    directions are independent of the training, so given the model their
    cosines are independent); for the inserted ones it is the one-run premise
    of Andrew et al. (ICLR 2024): independent random canaries, nearly
    orthogonal in d >> K dimensions, each a separate trial. Steinke, Nasr and
    Jagielski (2023, arXiv:2305.08846) bound one run without it (not
    implemented here).

    With n canaries per half the bound is at most `max_lower_bound` (every
    inserted canary above every held-out one): about
    ln(n / ln(2 / (1 - confidence))), 3.3 for K = 200 (n = 100) at 95%; more canaries are needed to show more.

    Returns:
      {"epsilon_lower_bound", "confidence", "delta", "method", "threshold",
      "evaluation": {"inserted", "inserted_at_or_above", "held_out",
      "held_out_at_or_above"}, "tpr_lower", "fpr_upper", "max_lower_bound"}.

    Raises:
      ValueError: for fewer than 2 statistics on either side, a non-finite
        statistic, delta outside [0, 1) or confidence outside [0.5, 1).
    """
    _check_confidence(confidence)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    x, y = np.asarray(inserted, np.float64), np.asarray(held_out, np.float64)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"the lower bound needs at least 2 inserted and 2 held-out statistics, got {x.size}, {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("the statistics must be finite")
    half = 1 - confidence
    alpha = half / 2  # per one-sided interval
    sel_x, ev_x = np.sort(x[: x.size // 2]), np.sort(x[x.size // 2:])
    sel_y, ev_y = np.sort(y[: y.size // 2]), np.sort(y[y.size // 2:])
    pooled = np.union1d(sel_x, sel_y)  # thresholds: midway between consecutive values (one, if all are equal)
    candidates = (pooled[:-1] + pooled[1:]) / 2 if pooled.size > 1 else pooled
    tp, fp = _at_or_above(sel_x, candidates), _at_or_above(sel_y, candidates)
    lo, _ = _clopper_pearson_table(sel_x.size, alpha)
    _, hi = _clopper_pearson_table(sel_y.size, alpha)
    score = threshold_epsilon(lo[tp], hi[fp], delta)
    gap = tp / sel_x.size - fp / sel_y.size  # breaks ties (all scores 0 without signal): the widest separation
    t = float(candidates[np.lexsort((gap, score))[-1]])
    k1, k0 = int(_at_or_above(ev_x, np.array([t]))[0]), int(_at_or_above(ev_y, np.array([t]))[0])
    tpr_lo = clopper_pearson_lower(k1, ev_x.size, alpha)
    fpr_hi = clopper_pearson_upper(k0, ev_y.size, alpha)
    best = threshold_epsilon(clopper_pearson_lower(ev_x.size, ev_x.size, alpha),
                             clopper_pearson_upper(0, ev_y.size, alpha), delta)
    return {
        "epsilon_lower_bound": float(threshold_epsilon(tpr_lo, fpr_hi, delta)), "confidence": confidence,
        "delta": delta, "method": "threshold test, Clopper-Pearson; threshold chosen on one half, bound on the other",
        "threshold": t,
        "evaluation": {"inserted": int(ev_x.size), "inserted_at_or_above": k1,
                       "held_out": int(ev_y.size), "held_out_at_or_above": k0},
        "tpr_lower": tpr_lo, "fpr_upper": fpr_hi, "max_lower_bound": float(best),
    }


def estimate(inserted: Sequence[float], delta: float, null: Gaussian | None = None,
             held_out: Sequence[float] | None = None, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """The empirical epsilon at `delta` of inserted-canary statistics against a null, and its lower bound.

    The null of the point estimate is `null` (e.g. `cosine_null(d)`) if
    given, else the Gaussian fitted to `held_out`. The lower bound needs the
    held-out statistics (`lower_bound`); without them it is None.

    Returns:
      {"epsilon" (the point estimate), "delta", "inserted": {mean, std},
      "null": {mean, std}, "null_source", "no_signal_level_95" (see
      `no_signal_level`), "epsilon_lower_bound", "lower_bound_confidence",
      "lower_bound" (the details of `lower_bound`)}.
    """
    _check_confidence(confidence)
    if null is None:
        if held_out is None:
            raise ValueError("give the null distribution or held-out samples")
        null, source = fit(held_out), "held_out"
    else:
        source = "analytic"
    alt = fit(inserted)
    bound = None if held_out is None else lower_bound(inserted, held_out, delta, confidence)
    return {
        "epsilon": epsilon_two_gaussians(null, alt, delta), "delta": delta,
        "inserted": dataclasses.asdict(alt), "null": dataclasses.asdict(null), "null_source": source,
        "no_signal_level_95": no_signal_level(len(inserted), None if source == "analytic" else len(held_out), delta),
        "epsilon_lower_bound": None if bound is None else bound["epsilon_lower_bound"],
        "lower_bound_confidence": confidence, "lower_bound": bound,
    }
