"""The delta that the noise sampler's bound adds: `delta_sampler`, pure arithmetic (no TensorFlow).

The samplers (`privacy.sampler`) draw noise that is the ideal noise
conditioned on a bounded set K (Gaussian: every Box-Muller pair of radius
R <= B_G = `GAUSSIAN_BOUND` = sqrt(312 ln 2) = 14.706 standard deviations;
Laplace: every coordinate |L| <= B_L = `LAPLACE_BOUND` = 156 ln 2 = 108.13
scales). Conditioning on an event of the noise alone keeps the density ratio
of two neighbouring outputs where both can occur, so for every set S of
outputs (P, Q the ideal mechanisms on neighbours, P~, Q~ the sampled ones, Z
the probability of K):

  P~(S) <= e^eps Q~(S) + delta / Z + P~(the output lies outside what Q~ can reach).

The last term is the *out-of-reach* probability: the neighbour's output is
the same noise shifted by Delta (in noise units, `shift` = sensitivity / std
or / scale), and an output is out of its reach when noise + Delta leaves K.
Summed over the releases in which the worst-case client's data enters (a
union bound over the run, which composes the conditioned rounds exactly as
the accountant composes the ideal ones), plus delta (1/Z - 1), it is
`delta_sampler`; every stated delta is `--target_delta + delta_sampler`.

Per release (`gaussian_out_of_reach`, `laplace_out_of_reach`):

* Gaussian, L2 shift s (||Delta||_2 <= s): a pair shifted by rho leaves the
  disc only if its radius is in (B - rho, B], probability
  h(rho) = exp(-(B - rho)^2 / 2) - exp(-B^2 / 2). The shift may be spread
  over many pairs (rho_k with sum rho_k^2 <= s^2): at most 4^(j+1) pairs have
  rho_k in (s 2^-(j+1), s 2^-j], each at most h(s 2^-j), and the pairs below
  eta = s 2^-J add at most B s sqrt(P) exp(-(B - eta)^2 / 2) (h(rho) <=
  rho B exp(-(B - rho)^2 / 2); Cauchy-Schwarz over P pairs). The bound is the
  smallest over J, with P = `MAX_COORDINATES` = 2^41 (valid for any update
  of up to 2^41 coordinates, 8 TiB of float32).
* Laplace, L1 shift s: coordinate i leaves [-B, B] only if |L_i| is in
  (B - delta_i, B], probability (1/2)(exp(-(B - delta_i)) - exp(-B)); that is
  convex in delta_i, so over sum delta_i <= s it is at most
  (1/2) exp(-B) (exp(s) - 1).
* The normaliser: Z >= 1 - n 2^-156 for a run that draws n < 2^63 noise
  coordinates in all, so delta (1/Z - 1) <= delta 2^-92 (`normalizer_term`).

The discretisation of the samplers' inputs (a 156-bit grid for v below 2^-24,
52 bits above it and for the angle) and the rounding inside log, sqrt, sincos and the addition are not
in this term; docs/privacy.md#floating-point-noise says why the simulation
accepts them (Mironov 2012).
"""

from __future__ import annotations

import math

# The samplers' bounds, with a relative margin of 1e-12 for the rounding of log and sqrt (a few ulps).
GAUSSIAN_BOUND = math.sqrt(312.0 * math.log(2.0)) * (1 + 1e-12)
LAPLACE_BOUND = 156.0 * math.log(2.0) * (1 + 1e-12)
MAX_COORDINATES = 2**41
_MAX_LEVELS = 64
# A setting whose delta_sampler exceeds this fraction of --target_delta is refused (`check_sampler_delta`).
MAX_FRACTION_OF_DELTA = 0.01


def pair_out_of_reach(rho: float, bound: float = GAUSSIAN_BOUND) -> float:
    """h(rho) = exp(-(B - rho)^2 / 2) - exp(-B^2 / 2): a pair shifted by rho leaves the disc of radius B."""
    b = bound
    return math.exp(-b * b / 2) * math.expm1(b * rho - rho * rho / 2)


def gaussian_out_of_reach(shift: float, bound: float = GAUSSIAN_BOUND) -> float:
    """Bound on the probability that one Gaussian release lands where its neighbour's cannot reach.

    Args:
      shift: the release's L2 sensitivity divided by its noise std (>= 0; inf for no noise).
      bound: the samplers' radius B (tests give other samplers' bounds).

    Returns:
      A probability in [0, 1] (1 when `shift` >= the sampler's bound).
    """
    b, s = bound, float(shift)
    if s <= 0:
        return 0.0
    if s >= b:
        return 1.0
    best, levels = math.inf, 0.0
    for j in range(_MAX_LEVELS + 1):
        eta = s * 2.0**-j
        tail = b * s * math.sqrt(MAX_COORDINATES) * math.exp(-(b - eta) ** 2 / 2)
        best = min(best, levels + tail)
        levels += min(4.0 ** (j + 1), MAX_COORDINATES) * pair_out_of_reach(eta, b)
    return min(1.0, best)


def laplace_out_of_reach(shift: float, bound: float = LAPLACE_BOUND) -> float:
    """Bound on the probability that one Laplace release lands where its neighbour's cannot reach.

    Args:
      shift: the release's L1 sensitivity divided by its Laplace scale (>= 0).
      bound: the samplers' bound B on |L| (tests give other samplers' bounds).
    """
    b, s = bound, float(shift)
    if s <= 0:
        return 0.0
    if s >= b:
        return 1.0
    return min(1.0, 0.5 * math.exp(-b) * math.expm1(s))


def local_release_out_of_reach(mechanism: str, noise_multiplier: float) -> float:
    """One local release (`privacy.local`): sensitivity 2C (L2 for gaussian, L1 for laplace) over zC, shift 2/z."""
    if noise_multiplier <= 0:
        return 0.0  # no noise: epsilon is infinite, no delta is stated
    if mechanism == "laplace":
        return laplace_out_of_reach(2 / noise_multiplier)
    return gaussian_out_of_reach(2 / noise_multiplier)


def normalizer_term(delta: float) -> float:
    """delta (1/Z - 1) <= delta 2^-92: the ideal mechanism's delta divided by the samplers' Z (module docstring)."""
    return float(delta) * 2.0**-92


def delta_sampler(out_of_reach: float, delta: float) -> float:
    """The sampler's term of a run: the worst client's out-of-reach sum plus the normaliser's term, at most 1."""
    if out_of_reach <= 0:
        return 0.0
    return min(1.0, out_of_reach + normalizer_term(delta))


def stated_delta(target_delta: float, sampler_term: float) -> float:
    """The delta every epsilon line states: the accountant's (--target_delta) plus the sampler's term, at most 1."""
    return min(1.0, target_delta + sampler_term)


def tree_levels(steps: int) -> int:
    """Nodes of a tree of `steps` leaves that hold a given leaf: ceil(log2(steps + 1)) (as dp-accounting counts)."""
    return int(steps).bit_length() if steps > 0 else 0
