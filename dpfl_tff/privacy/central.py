"""`--dp_mode=central`: DP-FedAvg with a trusted server (McMahan et al. 2018, arXiv:1710.06963).

The server clips every client's update to L2 norm C (or an adaptive clip,
Andrew et al. 2021), sums, adds N(0, (zC)^2) once and divides by the expected
cohort m (`queries.central_query`). One round is a Gaussian mechanism with
noise multiplier z (the effective z of both releases with adaptive
clipping), amplified by the round's sampling (`sampling.SamplingScheme.gaussian_round`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import truncation
from dpfl_tff.privacy import events
from dpfl_tff.privacy.events import REPLACE_ONE, RoundPrivacy
from dpfl_tff.privacy.ledgers import CentralLedger
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.privacy.noise import central_noise
from dpfl_tff.sampling import scheme_of


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
        scheme = scheme_of(cfg)
        if scheme.banded:
            raise ConfigError(
                "--client_sampling=banded with --dp_mode=central: banded sampling is banded MF's; use "
                "--dp_mode=bandmf (with --bands=1 it is DP-FedAvg), or --client_sampling=poisson"
            )
        if not scheme.amplifies:
            raise ConfigError(
                f"--client_sampling={cfg.train.client_sampling} with --dp_mode=central: DP-FedAvg's epsilon rests on "
                "amplification by random sampling, which this scheme does not give; use --client_sampling=poisson "
                "or uniform, or --dp_mode=ftrl"
            )
        if cfg.dp.noise_multiplier == 0 and cfg.dp.target_epsilon is None and not cfg.canary_clients:
            raise ConfigError(
                "--noise_multiplier=0 with --dp_mode=central: zero noise gives no privacy "
                "(epsilon is infinite); use --dp_mode=none to train without DP, "
                "or set --noise_multiplier > 0"
            )

    def query(self, record_specs: Any = None):
        del record_specs
        from dpfl_tff.privacy import queries

        return queries.central_query(self.cfg.dp, self.cfg.train.clients_per_round)

    def round_privacy(self) -> RoundPrivacy | None:
        t = self.cfg.train
        if not self.cfg.task.n_is_known:
            return None
        return self.scheme.gaussian_round(self.cfg.population, t.clients_per_round,
                                          self.noise.effective_noise_multiplier)

    def out_of_reach_per_round(self) -> float:
        """The samplers' out-of-reach bound of one round (`privacy.truncation`): the value release and,
        with adaptive clipping, the clipped-count release, each shifted by its sensitivity over its std.

        Sensitivities: C and 1/2 (tensorflow-privacy's clipped-count records are +-1/2) under
        add-or-remove-one, twice that under replace-one (a fixed cohort).
        """
        n = self.noise
        if n.effective_noise_multiplier == 0:
            return 0.0  # no noise: epsilon is infinite, no delta is stated
        factor = 2.0 if self.neighboring_relation == REPLACE_ONE else 1.0
        term = truncation.gaussian_out_of_reach(factor / n.value_noise_multiplier)
        if self.cfg.dp.adaptive_clipping:
            term += truncation.gaussian_out_of_reach(factor * 0.5 / n.clipped_count_stddev)
        return term

    def planned_out_of_reach(self, rounds: int) -> float:
        return rounds * self.out_of_reach_per_round()

    def ledger(self) -> CentralLedger:
        """The ledger; with the cohorts in the folder (--log_cohorts) its epsilon is not amplified by sampling."""
        unamplified = self.scheme.known_cohort_round(self.noise.effective_noise_multiplier)
        return CentralLedger(self.round_privacy(), self.cfg.target_delta, self.cfg.dp.accountant,
                             unamplified=unamplified, cohorts_listed=self.records_cohorts,
                             out_of_reach_per_round=self.out_of_reach_per_round())

    def planned_event(self, rounds: int) -> tuple[Any, str] | None:
        """The amplified event of `rounds` rounds; with the cohorts in the folder, the unamplified one (every round)."""
        if not self.records_cohorts:
            return super().planned_event(rounds)
        return events.self_composed(self.scheme.known_cohort_round(self.noise.effective_noise_multiplier), rounds)

    def clip_in(self, query_state: Any) -> float | None:
        """Adaptive clipping: the clip in the query's state (float32), as --clip_norm while it is that value."""
        if not self.cfg.dp.adaptive_clipping:
            return self.cfg.dp.clip_norm
        # NormalizedQuery(QuantileAdaptiveClipSumQuery): the sum's clip (`queries.central_query`).
        clip = np.float32(query_state.numerator_state.sum_state.l2_norm_clip)
        return self.cfg.dp.clip_norm if clip == np.float32(self.cfg.dp.clip_norm) else float(clip)

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        if "clip" in query_metrics:  # adaptive clipping: the clip of the next round, as the query reports it
            return {"next_clip_norm": float(query_metrics["clip"])}
        return super().record_fields(query_metrics, query_state)

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg = self.cfg
        return (
            f"privacy: central DP, {planned['analysis']}; accountant {cfg.dp.accountant.upper()}, "
            f"{self.delta_text(planned)}; epsilon after {cfg.train.rounds} rounds: {planned['epsilon']:.4g}"
        )
