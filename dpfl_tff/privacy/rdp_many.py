"""RDP of the Poisson-subsampled Gaussian at many sampling rates at once (NumPy), for `--dp_level=example`.

A run of `--dp_level=example` needs one RDP curve per distinct sampling rate
q_i = b / n_i, and a federation of thousands of clients has thousands of
distinct record counts (EMNIST: 3,400 clients). dp-accounting computes one
curve in 0.2-0.5 s (a Python loop over the terms of every order), i.e. 10-30
minutes for 3,400 rates. This module computes the same quantity, by the same
formulas, with the loops over terms vectorized over the rates:

  RDP(alpha) = log(A_alpha) / (alpha - 1)   (Mironov, Talwar, Zhang 2019, arXiv:1908.10530)

  integer alpha:    A_alpha = sum_{i=0..alpha} C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2))
  fractional alpha: dp-accounting's `_compute_log_a_frac` series (two halves split at
                    z0 = sigma^2 log(1/q - 1) + 1/2, each term with its log-erfc factor), summed
                    term by term for every rate until that rate's terms fall below e^-30, as there.

with q = 0 -> 0, q = 1 -> alpha / (2 sigma^2), sigma = 0 -> inf, as in
dp-accounting's `_compute_rdp_poisson_subsampled_gaussian` (add-or-remove-one).
NumPy's log and exp round differently from `math`'s and the integer sums are
added in another order (`logsumexp`), and the fractional series cancels (its
terms alternate in sign), so the two differ by rounding, which the cancellation
can magnify (seen: a relative 3e-8 at q = 1e-4, sigma = 0.3, alpha = 1.1). Each
log A is therefore raised by a bound on its own rounding error (the number of
log-space additions, each a few ulps at the scale of the largest term or partial
sum, relative to A), so that a curve is never below the exact value of the
formula: tests/test_example_level_planning.py checks it is never below
dp-accounting's and within a relative 1e-6 of it on a grid of rates, noise
multipliers and every default order.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

# A bound on the rounding of one log-space addition, relative to the scale of its operands: 16 ulps (each
# addition rounds an exp, a log1p and a sum, each by half an ulp, of a value of that scale), with a margin of 4.
_ERR = 16 * np.finfo(np.float64).eps


def _log_add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = np.minimum(x, y), np.maximum(x, y)
    with np.errstate(invalid="ignore"):
        return np.where(a == -np.inf, b, np.log1p(np.exp(a - b)) + b)


def _log_sub(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log(exp(x) - exp(y)) for x >= y elementwise (dp-accounting's `_log_sub`, vectorized)."""
    if np.any(x < y):
        raise ValueError("The result of subtraction must be non-negative.")
    d = x - y
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = np.log(np.expm1(d)) + y
    out = np.where(d > 700, x, out)  # expm1 overflows: dp-accounting returns x
    out = np.where(x == y, -np.inf, out)
    return np.where(y == -np.inf, x, out)


def _log_a_int(q: np.ndarray, sigma: float, alpha: int) -> np.ndarray:
    i = np.arange(alpha + 1, dtype=np.float64)
    log_comb = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    terms = (log_comb[None, :] + i[None, :] * np.log(q)[:, None] + (alpha - i)[None, :] * np.log(1 - q)[:, None]
             + ((i * i - i) / (2 * sigma**2))[None, :])
    log_a = special.logsumexp(terms, axis=1)
    # All terms are positive: the sum's relative error is below (terms + 1) ulps at the largest term's scale.
    top = terms.max(axis=1)
    return log_a + _ERR * (alpha + 2) * (1 + np.abs(top) + np.abs(log_a))


def _log_a_frac(q: np.ndarray, sigma: float, alpha: float) -> np.ndarray:
    """dp-accounting's `_compute_log_a_frac` for every rate in `q`, each series run to its own last term (the
    arrays shrink to the rates still running), raised by a bound on its rounding (see `poisson_gaussian_rdp`)."""
    n = q.size
    log_a0, log_a1 = np.full(n, -np.inf), np.full(n, -np.inf)
    top = np.full(n, -np.inf)  # the largest term or partial sum seen (in log)
    scale = np.zeros(n)  # the largest |log| among the terms and partial sums that matter
    terms = np.zeros(n)
    z0_all = sigma**2 * np.log(1 / q - 1) + 0.5
    log_q_all, log_1mq_all = np.log(q), np.log(1 - q)
    idx = np.arange(n)
    i = 0
    while idx.size:
        z0, log_q, log_1mq = z0_all[idx], log_q_all[idx], log_1mq_all[idx]
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        # dp-accounting's _log_erfc(x) = log 2 + log_ndtr(-x sqrt 2)
        log_e0 = math.log(0.5) + (math.log(2) + special.log_ndtr(-((i - z0) / (math.sqrt(2) * sigma)) * 2**0.5))
        log_e1 = math.log(0.5) + (math.log(2) + special.log_ndtr(-((z0 - j) / (math.sqrt(2) * sigma)) * 2**0.5))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            a0, a1 = _log_add(log_a0[idx], log_s0), _log_add(log_a1[idx], log_s1)
        else:
            a0, a1 = _log_sub(log_a0[idx], log_s0), _log_sub(log_a1[idx], log_s1)
        log_a0[idx], log_a1[idx] = a0, a1
        t, sc = top[idx], scale[idx]
        for v in (log_s0, log_s1, a0, a1):
            t = np.maximum(t, v)
            sc = np.where(v > -40, np.maximum(sc, np.abs(v)), sc)  # below e^-40 of the largest: nothing moves
        top[idx], scale[idx] = t, sc
        terms[idx] += 1
        idx = idx[~(np.maximum(log_s0, log_s1) < -30)]  # dp-accounting's do ... until, per rate
        i += 1
    log_a = _log_add(log_a0, log_a1)
    # Alternating terms cancel: the absolute error of the sum is below (additions + 1) ulps at the scale of the
    # largest term or partial sum; relative to A itself, that many times exp(top - log A).
    with np.errstate(over="ignore"):
        rel = _ERR * (2 * terms + 2) * (1 + scale + np.abs(log_a)) * np.exp(top - log_a)
    return log_a + np.log1p(rel)


def poisson_gaussian_rdp(qs: Sequence[float], noise_multiplier: float, orders: Sequence[float]) -> np.ndarray:
    """RDP curves (len(qs), len(orders)) of one Poisson-subsampled Gaussian step at each rate in `qs`.

    The same values as dp-accounting's `_compute_rdp_poisson_subsampled_gaussian(q, z, orders)` for each q
    (see the module docstring), each raised by a bound on its own rounding error.
    """
    q = np.asarray(qs, dtype=np.float64)
    orders = [float(a) for a in orders]
    out = np.zeros((q.size, len(orders)))
    if q.size == 0:
        return out
    if noise_multiplier == 0:
        out[:] = np.inf
        out[q == 0] = 0.0
        return out
    inner = (q > 0) & (q < 1)
    qi = q[inner]
    for k, alpha in enumerate(orders):
        if math.isinf(alpha):
            out[q > 0, k] = np.inf
            continue
        out[q == 1, k] = alpha / (2 * noise_multiplier**2)
        if qi.size:
            log_a = (_log_a_int(qi, noise_multiplier, int(alpha)) if alpha.is_integer()
                     else _log_a_frac(qi, noise_multiplier, alpha))
            out[inner, k] = log_a / (alpha - 1)
    return out
