"""`--dp_mode=local`: client-level local DP, for an untrusted server.

Each client zeroes a non-finite update, clips it (L2 norm C for Gaussian, L1
for Laplace) and adds its own noise (std zC, or Laplace scale zC) before it
leaves the client (`queries.LocalNoiseMeanQuery`); the server averages. Nothing
else computed from a client's data leaves it: no training metric, no norm, no
flag. One release is the Gaussian mechanism with multiplier z/2 (replace-one
sensitivity 2C) or (2/z)-DP Laplace (at the bounded sampler's delta_sampler); `ledgers.LocalLedger` composes them
over each client's participations, which is why its ledger records cohorts; with
the cohorts in the folder, the central view is reported without amplification by
sampling (`ledgers.LocalLedger`).
"""

from __future__ import annotations

from typing import Any

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import truncation
from dpfl_tff.privacy.events import REPLACE_ONE
from dpfl_tff.privacy.ledgers import LocalLedger
from dpfl_tff.privacy.mechanism import PrivacyMechanism


class LocalNoise(PrivacyMechanism):
    """Clip and noise at every client (see the module docstring)."""

    name = "local"
    calibrates = False  # its guarantee against the server is local_epsilon, per client; z is given
    neighboring_relation = REPLACE_ONE
    releases_client_statistics = False
    ledger_needs_cohorts = True

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        dp = cfg.dp
        if dp.adaptive_clipping:
            raise ConfigError("--adaptive_clipping with --dp_mode=local: not supported; use a fixed --clip_norm")
        if dp.noise_multiplier == 0 and dp.target_epsilon is None and not (
                cfg.canary_clients and dp.local_mechanism == "gaussian"):
            raise ConfigError(
                "--noise_multiplier=0 with --dp_mode=local: zero noise gives no privacy; "
                "use --dp_mode=none, or set --noise_multiplier > 0"
            )
        if dp.target_epsilon is not None:
            from dpfl_tff.privacy import registry  # at call time: the registry imports this module

            modes = [f"--dp_mode={name}" for name, m in registry.MECHANISMS.items() if m.calibrates]
            raise ConfigError(
                f"--target_epsilon={dp.target_epsilon}: calibration supports {', '.join(modes[:-1])} and "
                f"{modes[-1]} (on their epsilon); under --dp_mode=local give --noise_multiplier, and --max_epsilon "
                "to cap local_epsilon")

    def query(self, record_specs: Any = None):
        del record_specs
        from dpfl_tff.privacy import queries

        dp = self.cfg.dp
        return queries.LocalNoiseMeanQuery(dp.local_mechanism, dp.clip_norm, dp.noise_multiplier, dp.noise_seed)

    def planned_out_of_reach(self, rounds: int) -> float:
        """The worst client takes part in every round."""
        dp = self.cfg.dp
        return rounds * truncation.local_release_out_of_reach(dp.local_mechanism, dp.noise_multiplier)

    def ledger(self) -> LocalLedger:
        return LocalLedger(self.cfg)

    @property
    def noise_key(self) -> str:
        return "noise_std" if self.cfg.dp.local_mechanism == "gaussian" else "laplace_scale"

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        return {**super().record_fields(query_metrics, query_state),
                self.noise_key: float(query_metrics[self.noise_key])}

    def summary_fields(self) -> dict[str, Any]:
        return {"local_mechanism": self.cfg.dp.local_mechanism}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg = self.cfg
        return (
            f"privacy: local DP ({cfg.dp.local_mechanism}) at each client, replace-one; accountant "
            f"{cfg.dp.accountant.upper()}, {self.delta_text(planned)}; if a client took part in all {cfg.train.rounds} "
            f"rounds: local epsilon {planned['local_epsilon']:.4g}, central view {planned['epsilon']:.4g} "
            f"({planned['epsilon_analysis']}; ledger.jsonl lists the cohorts, so not amplified by sampling"
            + (f"; {planned['epsilon_if_cohorts_secret']:.4g} only if they were secret"
               if "epsilon_if_cohorts_secret" in planned else "") + ")"
        )
