"""BLT strategies (buffered linear Toeplitz, Dvijotham et al. 2024, arXiv:2404.16706), optimized in NumPy/SciPy.

Pure NumPy/SciPy, float64, no TensorFlow. A BLT with buffers i = 1..d, decays
theta_i in (0, 1) and output scales omega_i > 0 is the lower-triangular
Toeplitz strategy C with first column

    c_0 = 1,   c_j = sum_i omega_i theta_i^(j-1)   (j >= 1).

Its generating function is C(x) = 1 + sum_i omega_i x / (1 - theta_i x) =
P(x) / Q(x) with Q = prod_i (1 - theta_i x): C^-1 is the Toeplitz matrix of
Q / P (`inverse_coefs`, `scipy.signal.lfilter`), and x = C^-1 xi streams from
d buffers s_i (`stream_inverse`): x_t = xi_t - sum_i omega_i s_i,
s_i <- theta_i s_i + x_t (the recurrence `privacy.blt_query` runs in TensorFlow).

Sensitivity (`minsep_sensitivity_squared`, jax_privacy's
`toeplitz.minsep_sensitivity_squared`; Kalinin and Lampert 2024,
arXiv:2405.13763, Theorem 2): a client takes part at most k times, any two
participations at least b rounds apart (jax_privacy's min-sep: rounds r1 < r2
have separation r2 - r1 >= b). For non-negative non-increasing coefficients
the worst pattern is k participations exactly b apart from round 0, so
sens^2 = ||sum_{i<k} C[:, i b]||^2 exactly; other coefficients are first
projected onto that set (|c| then reverse cumulative max), an upper bound.

Loss (what `optimize` minimizes): the mean over the T prefix sums of their
expected squared noise error per unit noise multiplier,
sens^2 * mean_t ||(A C^-1)[t, :]||^2 with A the prefix-sum (all-ones lower
triangular) workload: jax_privacy's `LossFn.build_min_sep(error="mean")`.
At equal epsilon (the run is GaussianDpEvent(z / sens)) the noise of the
prefix sums scales as this loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
from scipy import optimize as sp_optimize
from scipy import signal, special

MAX_BUFFERS = 10
RTOL = 1.01  # `optimize` adds a buffer while the loss improves by more than 1% (jax_privacy's default)


def toeplitz_coefs(theta, omega, n: int) -> np.ndarray:
    """c_0..c_{n-1} of the BLT (theta, omega): c_0 = 1, c_j = sum_i omega_i theta_i^(j-1)."""
    theta, omega = np.asarray(theta, np.float64), np.asarray(omega, np.float64)
    c = np.ones(n)
    if n > 1 and theta.size:
        powers = theta[None, :] ** np.arange(n - 1)[:, None]
        c[1:] = powers @ omega
    elif n > 1:
        c[1:] = 0.0
    return c


def _polys(theta, omega) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q): C(x) = P(x) / Q(x), coefficients in increasing powers of x."""
    q = np.array([1.0])
    for t in theta:
        q = np.convolve(q, [1.0, -t])
    p = np.concatenate([q, [0.0]])
    for i, w in enumerate(omega):
        others = np.array([1.0])
        for j, t in enumerate(theta):
            if j != i:
                others = np.convolve(others, [1.0, -t])
        p[1:1 + others.size] += w * others
    return p, q


def inverse_coefs(theta, omega, n: int) -> np.ndarray:
    """First column of C^-1 (n x n): the power series of Q(x) / P(x)."""
    p, q = _polys(np.asarray(theta, np.float64), np.asarray(omega, np.float64))
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter(q, p, impulse)


def stream_inverse(theta, omega, xi: np.ndarray) -> np.ndarray:
    """x = C^-1 xi row by row (xi: rounds x ...) with d buffers: the recurrence the TF query runs."""
    theta, omega = np.asarray(theta, np.float64), np.asarray(omega, np.float64)
    xi = np.asarray(xi, np.float64)
    buffers = np.zeros((theta.size, *xi.shape[1:]))
    out = np.empty_like(xi)
    expand = (slice(None),) + (None,) * (xi.ndim - 1)
    for t in range(xi.shape[0]):
        x = xi[t] - np.tensordot(omega, buffers, axes=1)
        buffers = theta[expand] * buffers + x[None]
        out[t] = x
    return out


def max_participations(n: int, min_sep: int, participations: int | None = None) -> int:
    """The most participations b-separated rounds allow in n rounds, ceil(n / b), capped by `participations`."""
    k = -(-int(n) // int(min_sep))
    return k if participations is None else min(k, int(participations))


def minsep_sensitivity_squared(coefs: np.ndarray, min_sep: int, participations: int | None = None,
                               n: int | None = None) -> float:
    """Squared L2 sensitivity of the n x n Toeplitz C (first column `coefs`) under b-min-separated participation.

    Exact for non-negative non-increasing coefficients, an upper bound otherwise (see the module docstring).
    """
    c = np.asarray(coefs, np.float64)
    n = c.size if n is None else int(n)
    c = np.pad(c[:n], (0, max(n - c.size, 0)))
    if n == 0:
        return 0.0
    b = int(min_sep)
    if b < 1:
        raise ValueError(f"min_sep={min_sep}: must be >= 1")
    c = np.maximum.accumulate(np.abs(c)[::-1])[::-1]
    k = max_participations(n, b, participations)
    pad = (-n) % b
    v = np.pad(c, (0, pad)).reshape(-1, b).cumsum(axis=0).reshape(-1)  # v_t = sum_{i>=0, ib<=t} c_{t-ib}
    if b * k < v.size:  # keep only the k participations at 0, b, ..., (k-1) b
        v[b * k:] = v[b * k:] - v[:-b * k].copy()
    v = v[:n]
    return float(v @ v)


def per_query_error(noising_coefs: np.ndarray) -> np.ndarray:
    """||(A C^-1)[t, :]||^2 for every t: A C^-1 is Toeplitz with first column cumsum(C^-1's)."""
    return np.cumsum(np.cumsum(noising_coefs) ** 2)


def loss(theta, omega, n: int, min_sep: int, participations: int | None = None) -> float:
    """sens^2 * mean squared prefix-sum error (see the module docstring)."""
    r = inverse_coefs(theta, omega, n)
    err = float(np.mean(per_query_error(r)))
    return minsep_sensitivity_squared(toeplitz_coefs(theta, omega, n), min_sep, participations) * err


@dataclasses.dataclass(frozen=True)
class BLTStrategy:
    """An optimized BLT and what it was optimized for (strategy.json holds all of it)."""

    theta: tuple[float, ...]
    omega: tuple[float, ...]
    rounds: int  # T
    min_separation: int  # b
    participations: int  # k = ceil(T / b)
    loss: float
    seconds: float
    identity_loss: float  # the loss of C = I (no correlation: DP-SGD's noise), for comparison

    @property
    def buffers(self) -> int:
        return len(self.theta)

    def coefs(self, n: int | None = None) -> np.ndarray:
        return toeplitz_coefs(self.theta, self.omega, self.rounds if n is None else n)

    def inverse_coefs(self, n: int | None = None) -> np.ndarray:
        return inverse_coefs(self.theta, self.omega, self.rounds if n is None else n)

    def sensitivity(self, rounds: int) -> float:
        """L2 sensitivity (clip units) of the first `rounds` rounds of one stream: b-min-sep, ceil(rounds/b) times."""
        if rounds <= 0:
            return 0.0
        return math.sqrt(minsep_sensitivity_squared(self.coefs(rounds), self.min_separation,
                                                    max_participations(rounds, self.min_separation)))


def _unpack(params: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """theta_i = sigmoid(a_i) in (0, 1); omega = softmax([u, 0])[:d]: omega_i > 0, sum omega < 1 = c_0."""
    theta = special.expit(params[:d])
    omega = special.softmax(np.concatenate([params[d:], [0.0]]))[:d]
    return theta, omega


def _pack(theta: np.ndarray, omega: np.ndarray) -> np.ndarray:
    theta = np.clip(theta, 1e-12, 1 - 1e-12)
    return np.concatenate([special.logit(theta), np.log(omega) - math.log(1.0 - float(np.sum(omega)))])


def _optimize_fixed(n: int, b: int, k: int, d: int,
                    warm: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimizes `loss` over BLTs of d buffers (L-BFGS-B on log loss, a few starts).

    `warm`: a (d-1)-buffer solution; it starts one run with a new buffer of tiny output scale, so the loss of
    d buffers is never worse than that of d-1 (up to the optimizer's tolerance).
    """
    def objective(params):
        theta, omega = _unpack(params, d)
        value = loss(theta, omega, n, b, k)
        return math.log(value) if np.isfinite(value) and value > 0 else 1e6

    starts = []
    for spread in (1.0, 0.5):
        # decays spread from 1 - 1/n^(spread) up, scales summing to 1/2 (single participation's optimum c_1)
        starts.append(_pack(1.0 - np.logspace(-spread * math.log10(max(n, 2)), -0.3, d), np.full(d, 0.5 / d)))
    if warm is not None:
        theta_w, omega_w = warm
        omega_new = np.concatenate([np.asarray(omega_w) * (1 - 1e-3), [1e-3 * (1 - float(np.sum(omega_w)))]])
        starts.append(_pack(np.concatenate([theta_w, [0.5]]), omega_new))
    best = None
    for x0 in starts:
        res = sp_optimize.minimize(objective, x0, method="L-BFGS-B", options={"maxiter": 300})
        if best is None or res.fun < best.fun:
            best = res
    theta, omega = _unpack(best.x, d)
    order = np.argsort(-theta)
    return theta[order], omega[order], math.exp(best.fun)


@functools.lru_cache(maxsize=32)
def optimize(rounds: int, min_sep: int, participations: int, buffers: int | None = None) -> BLTStrategy:
    """The BLT minimizing `loss` for T = `rounds`, b = `min_sep`, k = `participations` (cached by its inputs).

    Buffers are added one at a time, each run also warm-started from the previous solution. `buffers` None:
    while one more improves the loss by more than 1% (at most MAX_BUFFERS); else exactly `buffers`.
    """
    start = time.perf_counter()
    n, b, k = int(rounds), int(min_sep), int(participations)
    theta, omega, value = _optimize_fixed(n, b, k, 1)
    for d in range(2, (MAX_BUFFERS if buffers is None else int(buffers)) + 1):
        t2, o2, v2 = _optimize_fixed(n, b, k, d, warm=(theta, omega))  # warm: d buffers never worse than d - 1
        if buffers is None and RTOL * v2 >= value:
            break
        theta, omega, value = t2, o2, v2
    identity = minsep_sensitivity_squared(np.eye(1, n).ravel(), b, k) * float(np.mean(np.arange(1, n + 1)))
    return BLTStrategy(tuple(float(t) for t in theta), tuple(float(w) for w in omega), n, b, k,
                       float(loss(theta, omega, n, b, k)), time.perf_counter() - start, identity)
