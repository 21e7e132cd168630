"""How much Gaussian noise central DP adds, in clip units: pure arithmetic, no TensorFlow.

With adaptive clipping (Andrew et al. 2021, arXiv:1905.03871) two Gaussian
releases happen per round: the noised sum of clipped updates (std
`value_noise_multiplier * C`) and the noised count of clipped clients (std
`clipped_count_stddev`, sensitivity 1/2 per client as tensorflow-privacy
counts it). `--noise_multiplier` z is their effective total, as in TFF's
`adaptive_clip_noise_params`, which `value_split` reproduces (a test checks
the two agree): value_z = (z**-2 - (2 s)**-2)**-0.5 with s the clipped-count
std, which needs s > z/2.
"""

from __future__ import annotations

import dataclasses
import math

from dpfl_tff.config import DPConfig
from dpfl_tff.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CentralNoise:
    """What the central Gaussian aggregator adds per round, in clip units.

    Attributes:
      value_noise_multiplier: std of the noise on the sum of clipped updates,
        divided by the (current) clip norm.
      clipped_count_stddev: std of the noise on the clipped-count release of
        adaptive clipping (0 when clipping is fixed).
      effective_noise_multiplier: the single Gaussian noise multiplier
        equivalent to both releases together (what is accounted):
        (value_z**-2 + (2 * clipped_count_stddev)**-2)**-0.5; the clipped
        count has sensitivity 1/2 per client.
    """

    value_noise_multiplier: float
    clipped_count_stddev: float
    effective_noise_multiplier: float


def value_split(z: float, expected_cohort: float, clipped_count_stddev: float | None) -> tuple[float, float]:
    """(value noise multiplier, clipped-count std) whose releases together are one Gaussian of multiplier z.

    The same as TFF's `adaptive_clip_noise_params` (default clipped-count std
    0.05 * expected cohort).

    Raises:
      ValueError: clipped_count_stddev <= z / 2 (no split exists).
    """
    if z <= 0:
        return 0.0, 0.0 if clipped_count_stddev is None else clipped_count_stddev
    std = 0.05 * expected_cohort if clipped_count_stddev is None else clipped_count_stddev
    if z >= 2 * std:
        raise ValueError(f"clipped_count_stddev = {std} must exceed noise_multiplier / 2 = {z / 2}")
    return (z**-2 - (2 * std) ** -2) ** -0.5, std


def central_noise(dp: DPConfig, expected_cohort: float) -> CentralNoise:
    """Splits `dp.noise_multiplier` between the value and clipped-count releases.

    Fixed clipping: the value release gets all of it. Adaptive clipping:
    `dp.noise_multiplier` is the effective total (`value_split`).

    Raises:
      ConfigError: the clipped-count noise is too small for z; names the flags to change.
    """
    z = dp.noise_multiplier
    if not dp.adaptive_clipping:
        return CentralNoise(z, 0.0, z)
    try:
        value_z, cc_std = value_split(z, float(expected_cohort), dp.clipped_count_stddev)
    except ValueError as e:
        raise ConfigError(_adaptive_noise_error(z, expected_cohort, dp.clipped_count_stddev)) from e
    if z == 0:
        return CentralNoise(0.0, cc_std, 0.0)
    return CentralNoise(value_z, cc_std, (value_z**-2 + (2 * cc_std) ** -2) ** -0.5)


def _adaptive_noise_error(z: float, m: float, clipped_count_stddev: float | None) -> str:
    if clipped_count_stddev is None:
        smallest_m = math.floor(10 * z) + 1  # default stddev 0.05 m must exceed z / 2
        return (
            f"--adaptive_clipping with --noise_multiplier={z} and --clients_per_round={m:g}: the clipped-count "
            f"noise (default --clipped_count_stddev = 0.05*clients_per_round = {0.05 * m:g}) must exceed "
            f"noise_multiplier/2 = {z / 2:g}; use --clients_per_round >= {smallest_m}, or set "
            f"--clipped_count_stddev > {z / 2:g}, or lower --noise_multiplier"
        )
    return (
        f"--clipped_count_stddev={clipped_count_stddev} with --adaptive_clipping and --noise_multiplier={z}: "
        f"must be > noise_multiplier/2 = {z / 2:g}; raise --clipped_count_stddev or lower --noise_multiplier"
    )
