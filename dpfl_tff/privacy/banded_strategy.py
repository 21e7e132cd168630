"""Banded Toeplitz strategies for matrix-factorization noise (NumPy/SciPy, float64; no TensorFlow).

Banded MF (Choquette-Choo et al., NeurIPS 2023, arXiv:2306.08153) releases the
prefix sums A x of the rounds' clipped sums x (A: T x T lower-triangular ones)
as B (C x + z xi), factorizing A = B C. With a lower-triangular Toeplitz C
whose first column is c = (c_0, ..., c_{B-1}, 0, ...) (B bands) the server
adds, in round t, z C_clip (C^-1 xi)_t to the round's sum: the noise of the
released model is then correlated across rounds, so that the prefix sums (the
model, for SGD on the server) carry less noise than independent per-round
noise gives.

Sensitivity: every column of C is c shifted (and cut at the bottom), so with
||c||_2 = 1 every column has L2 norm <= 1; a client that takes part at most
once in every B consecutive rounds touches disjoint columns
(`sampling.BandedSampler`), which is what makes the amplified analysis of
`privacy.events.bandmf_event` hold.

The loss minimized here (jax_privacy's `optimize_banded_toeplitz` has the
same objective under the name "mean error"): the mean squared error of the
noise on the prefix sums, per unit noise, over the run's T rounds,

    loss(c) = ||A C^-1||_F^2 / T = (1/T) sum_{k<T} (T - k) e_k^2,

where C^-1 is lower-triangular Toeplitz with first column d (`inverse_column`:
d_0 = 1/c_0, d_k = -(1/c_0) sum_{j=1}^{min(k, B-1)} c_j d_{k-j}) and e = cumsum(d)
is the first column of A C^-1. B = 1 (c = (1)) is DP-FedAvg's independent noise:
loss (T + 1) / 2. c is optimized as v / ||v|| (so ||c|| = 1 exactly) by L-BFGS
from the truncated square-root factorization (c_j = binom(2j, j) / 4^j,
Fichtenberger et al. 2023), and kept only if better than its start.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
from scipy import optimize, signal


@dataclasses.dataclass(frozen=True)
class BandedStrategy:
    """A B-banded lower-triangular Toeplitz strategy optimized for T rounds."""

    rounds: int  # T
    bands: int  # B
    coefficients: tuple[float, ...]  # c_0..c_{B-1}, L2 norm 1
    loss: float  # mean squared prefix-sum error per unit noise (the docstring's loss)
    independent_loss: float  # the same for B = 1 (DP-FedAvg's noise): (T + 1) / 2
    optimizer_seconds: float
    optimizer_iterations: int

    def as_json(self) -> dict:
        """strategy.json's content: enough to rebuild C, its inverse and the sensitivity."""
        c = np.asarray(self.coefficients)
        return {
            "strategy": "banded_toeplitz",
            "rounds": self.rounds,
            "bands": self.bands,
            "coefficients": list(self.coefficients),
            "first_column_of_C": list(self.coefficients) + [0.0] * (self.rounds - self.bands),
            "column_norm_max": float(np.linalg.norm(c)),
            "sensitivity": "1 per participation (every column of C has L2 norm <= ||c|| = 1; participations at "
                           "least B rounds apart touch disjoint columns)",
            "loss": "mean squared prefix-sum error per unit noise, ||A C^-1||_F^2 / T",
            "loss_value": self.loss,
            "independent_noise_loss_value": self.independent_loss,
            "optimizer": "scipy L-BFGS-B on c = v / ||v||, from the truncated square-root factorization",
            "optimizer_seconds": self.optimizer_seconds,
            "optimizer_iterations": self.optimizer_iterations,
        }


def inverse_column(coefficients, rounds: int) -> np.ndarray:
    """First column (length T) of C^-1 for the banded Toeplitz C of `coefficients` (c_0 != 0)."""
    c = np.asarray(coefficients, np.float64)
    impulse = np.zeros(int(rounds))
    impulse[0] = 1.0
    return signal.lfilter([1.0], c, impulse)


def toeplitz(first_column, rounds: int) -> np.ndarray:
    """The dense T x T lower-triangular Toeplitz matrix with `first_column` (tests and small T)."""
    col = np.zeros(int(rounds))
    k = min(len(first_column), rounds)
    col[:k] = np.asarray(first_column, np.float64)[:k]
    idx = np.arange(rounds)
    diff = idx[:, None] - idx[None, :]
    return np.where(diff >= 0, col[np.clip(diff, 0, rounds - 1)], 0.0)


def prefix_loss(coefficients, rounds: int) -> float:
    """||A C^-1||_F^2 / T for the strategy `coefficients` (inf if C^-1 blows up)."""
    e = np.cumsum(inverse_column(coefficients, rounds))
    weights = np.arange(rounds, 0, -1, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.dot(weights, e * e) / rounds)
    return value if math.isfinite(value) else math.inf


def sqrt_factorization(bands: int) -> np.ndarray:
    """binom(2j, j) / 4^j for j < B (the coefficients of (1 - x)^(-1/2)), normalized to L2 norm 1."""
    c = np.ones(int(bands))
    for j in range(1, bands):
        c[j] = c[j - 1] * (2 * j - 1) / (2 * j)
    return c / np.linalg.norm(c)


@functools.lru_cache(maxsize=32)
def optimize_banded(rounds: int, bands: int) -> BandedStrategy:
    """The B-banded strategy minimizing `prefix_loss` for T = `rounds` (cached by (T, B))."""
    rounds, bands = int(rounds), int(bands)
    if not 1 <= bands <= rounds:
        raise ValueError(f"bands={bands}: must be in [1, rounds={rounds}]")
    start = time.perf_counter()
    independent = prefix_loss([1.0], rounds)
    if bands == 1:
        return BandedStrategy(rounds, 1, (1.0,), independent, independent, time.perf_counter() - start, 0)
    x0 = sqrt_factorization(bands)

    def objective(v):
        norm = np.linalg.norm(v)
        if norm == 0 or v[0] <= 0:
            return 1e300
        value = prefix_loss(v / norm, rounds)
        return value if math.isfinite(value) else 1e300

    bounds = [(1e-6, None)] + [(None, None)] * (bands - 1)  # c_0 > 0: C invertible
    result = optimize.minimize(objective, x0, method="L-BFGS-B", bounds=bounds,
                               options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-10})
    c = result.x / np.linalg.norm(result.x)
    loss = prefix_loss(c, rounds)
    start_loss = prefix_loss(x0, rounds)
    if not loss < start_loss:
        c, loss = x0, start_loss
    return BandedStrategy(rounds, bands, tuple(float(v) for v in c), loss, independent,
                          time.perf_counter() - start, int(result.nit))
