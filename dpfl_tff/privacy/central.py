"""`--dp_mode=central`: DP-FedAvg with a trusted server (McMahan et al. 2018, arXiv:1710.06963).

The server clips every client's update to L2 norm C (or an adaptive clip,
Andrew et al. 2021), sums, adds N(0, (zC)^2) once and divides by the expected
cohort m (`queries.central_query`). One round is a Gaussian mechanism with
noise multiplier z (the effective z of both releases with adaptive
clipping), amplified by the round's sampling (`events.sampled_gaussian_round`).
"""

from __future__ import annotations

from typing import Any

import dp_accounting

from dpfl_tff.config import DPConfig, ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy.events import RoundPrivacy, sampled_gaussian_round, unsampled_gaussian_round
from dpfl_tff.privacy.ledgers import CentralLedger
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.privacy.noise import central_noise


class CentralGaussian(PrivacyMechanism):
    """Clip at the server, Gaussian noise once on the sum (see the module docstring)."""

    name = "central"

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.noise = central_noise(cfg.dp, cfg.train.clients_per_round)  # raises on an impossible split
        rp = self.round_privacy()
        self.neighboring_relation = None if rp is None else rp.neighboring_relation

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        if cfg.train.client_sampling == "shuffle":
            raise ConfigError(
                "--client_sampling=shuffle with --dp_mode=central: DP-FedAvg's epsilon rests on amplification by "
                "random sampling, which a shuffle does not give; use --client_sampling=poisson or uniform, or "
                "--dp_mode=ftrl"
            )
        if cfg.dp.noise_multiplier == 0 and cfg.dp.target_epsilon is None and not cfg.canary_clients:
            raise ConfigError(
                "--noise_multiplier=0 with --dp_mode=central: zero noise gives no privacy "
                "(epsilon is infinite); use --dp_mode=none to train without DP, "
                "or set --noise_multiplier > 0"
            )

    @staticmethod
    def query_of(dp: DPConfig, expected_cohort: float):
        from dpfl_tff.privacy import queries

        return queries.central_query(dp, expected_cohort)

    def round_privacy(self) -> RoundPrivacy | None:
        t = self.cfg.train
        if not self.cfg.task.n_is_known:
            return None
        return sampled_gaussian_round(self.cfg.population, t.clients_per_round, t.client_sampling,
                                      self.noise.effective_noise_multiplier)

    def ledger(self) -> CentralLedger:
        """The ledger; with the cohorts in the folder (--log_cohorts) its epsilon is not amplified by sampling."""
        unamplified = unsampled_gaussian_round(self.cfg.train.client_sampling, self.noise.effective_noise_multiplier)
        return CentralLedger(self.round_privacy(), self.cfg.target_delta, self.cfg.dp.accountant,
                             unamplified=unamplified, cohorts_listed=self.records_cohorts)

    def planned_event(self, rounds: int) -> tuple[Any, str] | None:
        """The amplified event of `rounds` rounds; with the cohorts in the folder, the unamplified one (every round)."""
        if not self.records_cohorts:
            return super().planned_event(rounds)
        rp = unsampled_gaussian_round(self.cfg.train.client_sampling, self.noise.effective_noise_multiplier)
        return dp_accounting.SelfComposedDpEvent(rp.event, rounds), rp.neighboring_relation

    def record_fields(self, aggregator_metrics: dict[str, Any], clip: float | None) -> tuple[dict[str, Any], Any]:
        query_metrics = aggregator_metrics.get("dp_query_metrics", {})
        if "clip" in query_metrics:  # adaptive clipping: the clip of the next round
            clip = float(query_metrics["clip"])
        return {"next_clip_norm": clip}, clip

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg = self.cfg
        return (
            f"privacy: central DP, {planned['analysis']}; accountant {cfg.dp.accountant.upper()}, "
            f"{self.delta_text()}; epsilon after {cfg.train.rounds} rounds: {planned['epsilon']:.4g}"
        )
