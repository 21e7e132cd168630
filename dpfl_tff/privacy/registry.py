"""The privacy modes by `--dp_mode` name: the one place that maps a mode's name to its mechanism."""

from __future__ import annotations

from dpfl_tff.config import DP_MODES, ExperimentConfig
from dpfl_tff.privacy.bandmf import BandedMatrixFactorization
from dpfl_tff.privacy.blt import BLTFTRL
from dpfl_tff.privacy.central import CentralGaussian
from dpfl_tff.privacy.example_level import ExampleLevelDPSGD
from dpfl_tff.privacy.ftrl import TreeAggregationFTRL
from dpfl_tff.privacy.local import LocalNoise
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.privacy.no_dp import NoPrivacy

MECHANISMS: dict[str, type[PrivacyMechanism]] = {
    m.name: m for m in (NoPrivacy, CentralGaussian, LocalNoise, TreeAggregationFTRL, BandedMatrixFactorization, BLTFTRL)
}
assert tuple(MECHANISMS) == DP_MODES, "config.DP_MODES must list the registered mechanisms"


def mechanism_class(cfg: ExperimentConfig) -> type[PrivacyMechanism]:
    """The mechanism of `--dp_mode`, or record-level DP-SGD with `--dp_level=example` (whose check needs mode none)."""
    if cfg.dp.dp_level == "example":
        return ExampleLevelDPSGD
    return MECHANISMS[cfg.dp.mode]


def mechanism_for(cfg: ExperimentConfig) -> PrivacyMechanism:
    """The mechanism of `cfg` (validated, with N known for the accounting parts)."""
    return mechanism_class(cfg)(cfg)
