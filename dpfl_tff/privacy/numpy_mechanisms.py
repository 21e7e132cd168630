"""Classic DP mechanisms in NumPy, with explicit randomness.

Every function takes a `numpy.random.Generator`; nothing uses global random
state. Definitions: a mechanism M is (epsilon, delta)-DP if for all
neighbouring inputs x, x' and all events S,
P[M(x) in S] <= e^epsilon P[M(x') in S] + delta (pure DP: delta = 0).
Sensitivities are *bounds* over all neighbouring pairs, supplied by the
caller, never measured from one pair of inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0. Found {value}.")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float, np.floating)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in the open interval (0, 1). Found {delta}.")


def _check_values(value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("value must be finite (no NaN or inf).")
    return arr


def laplace_mechanism(value, l1_sensitivity: float, epsilon: float, rng: np.random.Generator):
    """Adds Laplace(0, b = l1_sensitivity / epsilon) noise to every coordinate.

    Guarantee: epsilon-DP for the ideal Laplace when `l1_sensitivity` bounds
    the L1 distance between the values of any two neighbouring inputs (Dwork,
    McSherry, Nissim, Smith 2006, "Calibrating noise to sensitivity"). NumPy's
    sampler is -ln of a 53-bit uniform (|L| <= 52 ln 2 = 36.04 b: its
    `random_laplace` maps U in (0, 1) on a 2^-53 grid to log(2U)), so what runs
    is (epsilon, (1/2) e^-36.04 (e^epsilon - 1))-DP, as
    `privacy.truncation.laplace_out_of_reach(epsilon, bound=36.04)` computes.

    Returns:
      (noised value, the scale b used).
    """
    _check_positive("l1_sensitivity", l1_sensitivity)
    _check_positive("epsilon", epsilon)
    arr = _check_values(value)
    scale = l1_sensitivity / epsilon
    return arr + rng.laplace(0.0, scale, size=arr.shape), scale


def gaussian_sigma_classic(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """sigma = sqrt(2 ln(1.25 / delta)) * Delta_2 / epsilon, valid for epsilon < 1.

    Dwork and Roth 2014, Theorem A.1.

    Raises:
      ValueError: if epsilon >= 1 (the theorem does not hold there; use
        `gaussian_sigma_analytic`).
    """
    _check_positive("epsilon", epsilon)
    _check_delta(delta)
    _check_positive("l2_sensitivity", l2_sensitivity)
    if epsilon >= 1:
        raise ValueError(f"epsilon must be < 1 for the classic Gaussian calibration. Found {epsilon}; use analytic.")
    return math.sqrt(2 * math.log(1.25 / delta)) * l2_sensitivity / epsilon


def gaussian_delta(sigma: float, epsilon: float, l2_sensitivity: float) -> float:
    """Exact delta of the Gaussian mechanism at epsilon (Balle and Wang 2018, Theorem 8).

    delta = Phi(D/(2 s) - eps s/D) - e^eps Phi(-D/(2 s) - eps s/D).
    """
    a = l2_sensitivity / (2 * sigma)
    b = epsilon * sigma / l2_sensitivity
    # e^eps * Phi(-a-b) computed in log space to avoid overflow for large epsilon.
    second = math.exp(epsilon + special.log_ndtr(-a - b))
    return float(stats.norm.cdf(a - b) - second)


def gaussian_sigma_analytic(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """Smallest sigma for which the Gaussian mechanism is (epsilon, delta)-DP, any epsilon > 0.

    The analytic Gaussian mechanism of Balle and Wang 2018 ("Improving the
    Gaussian mechanism for differential privacy", arXiv:1805.06530): delta(sigma)
    from `gaussian_delta` decreases in sigma; bisection finds the smallest
    sigma with delta(sigma) <= delta, returned from the safe side.
    """
    _check_positive("epsilon", epsilon)
    _check_delta(delta)
    _check_positive("l2_sensitivity", l2_sensitivity)
    lo, hi = 1e-12 * l2_sensitivity, l2_sensitivity
    while gaussian_delta(hi, epsilon, l2_sensitivity) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if gaussian_delta(mid, epsilon, l2_sensitivity) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def gaussian_mechanism(
    value,
    l2_sensitivity: float,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    calibration: str = "analytic",
):
    """Adds N(0, sigma^2) noise with sigma calibrated to (epsilon, delta).

    Guarantee: (epsilon, delta)-DP when `l2_sensitivity` bounds the L2 distance
    between the values of any two neighbouring inputs.

    Args:
      calibration: `analytic` (Balle and Wang 2018, any epsilon) or `classic`
        (Dwork and Roth 2014, epsilon < 1 only).

    Returns:
      (noised value, the sigma used).
    """
    if calibration == "analytic":
        sigma = gaussian_sigma_analytic(epsilon, delta, l2_sensitivity)
    elif calibration == "classic":
        sigma = gaussian_sigma_classic(epsilon, delta, l2_sensitivity)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic'. Found {calibration!r}.")
    arr = _check_values(value)
    return arr + rng.normal(0.0, sigma, size=arr.shape), sigma


def _exponential_logits(utilities: Sequence[float], epsilon: float, sensitivity: float) -> np.ndarray:
    _check_positive("epsilon", epsilon)
    _check_positive("sensitivity", sensitivity)
    u = np.asarray(utilities, dtype=np.float64)
    if u.ndim != 1 or u.size == 0:
        raise ValueError("utilities must be a non-empty 1-D sequence of candidates' scores.")
    if not np.all(np.isfinite(u)):
        raise ValueError("utilities must be finite (no NaN or inf).")
    return epsilon * u / (2 * sensitivity)


def exponential_mechanism_probabilities(utilities: Sequence[float], epsilon: float, sensitivity: float) -> np.ndarray:
    """P(i) proportional to exp(epsilon u_i / (2 Delta_u)), computed with log-sum-exp."""
    logits = _exponential_logits(utilities, epsilon, sensitivity)
    shifted = logits - logits.max()  # exact for nearby values; keeps precision at any scale
    return np.exp(shifted - special.logsumexp(shifted))


def exponential_mechanism(
    utilities: Sequence[float], epsilon: float, sensitivity: float, rng: np.random.Generator
) -> int:
    """Index i drawn with probability proportional to exp(epsilon u_i / (2 Delta_u)).

    Guarantee: pure epsilon-DP when `sensitivity` bounds how much any
    candidate's utility changes between neighbouring inputs (McSherry and
    Talwar 2007). Sampled with the Gumbel-max trick (argmax of logits plus
    Gumbel noise has exactly the softmax law), stable for large utilities.
    """
    logits = _exponential_logits(utilities, epsilon, sensitivity)
    return int(np.argmax(logits - logits.max() + rng.gumbel(size=logits.shape)))
