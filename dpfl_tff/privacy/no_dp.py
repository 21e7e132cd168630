"""`--dp_mode=none`: plain FedAvg, no clipping, no noise, no guarantee (epsilon is infinite)."""

from __future__ import annotations

from typing import Any

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy.mechanism import PrivacyMechanism


class NoPrivacy(PrivacyMechanism):
    """The plain mean of the clients' updates (`queries.MeanQuery`)."""

    name = "none"
    provides_dp = False
    calibrates = False

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        if cfg.dp.target_epsilon is not None:
            raise ConfigError(f"--target_epsilon={cfg.dp.target_epsilon}: needs a DP mode, not --dp_mode=none")

    def query(self, record_specs: Any = None):
        del record_specs
        from dpfl_tff.privacy import queries

        return queries.MeanQuery()

    @property
    def noise_seeded(self) -> bool:
        return False  # there is no noise to seed

    def clip_in(self, query_state: Any) -> float | None:
        return None  # nothing is clipped

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        return {}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        del planned
        return "privacy: none (--dp_mode=none): no DP guarantee, epsilon is infinite"
