"""`--dp_mode=bandmf`: banded matrix-factorization noise with amplification by sampling.

Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta and Xu, "(Amplified)
Banded Matrix Factorization: A unified approach to private training",
NeurIPS 2023 (arXiv:2306.08153); as in jax_privacy's `matrix_factorization`
(`banded.py`, `optimize_banded_toeplitz`, `amplified_bandmf_event`).

What runs:

* Sampling (`--client_sampling=banded`, `sampling.BandedSampler`): when the
  run starts every client is put in one of B secret groups uniformly at
  random; round t (1-based) Poisson-samples the clients of group (t - 1) mod B
  with probability q = m B / N (m = --clients_per_round stays the expected
  cohort; q > 1 is refused). A client is eligible once in every B rounds.
* Noise (`privacy.bandmf_query`): the server clips every update to C, sums,
  adds z C x_t with x = C^-1 xi for the B-banded Toeplitz strategy of
  `privacy.banded_strategy` (unit-norm coefficients, optimized for the run's
  --rounds T by the mean squared prefix-sum error), generated online from the
  last B - 1 x's, and divides by m. B = 1 is DP-FedAvg with Poisson sampling.

Privacy (client level, add-or-remove-one): every column of C has norm <= 1
and a client's participations are >= B rounds apart, so (the paper's
Theorem 4) the run is `SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(z)), ceil(T / B))`: epsilon after t rounds composes ceil(t / B)
participations. RDP or PLD.

Resume: a resumed run starts a new noise stream (the buffers zeroed, the
strategy from its first row) with a new secret grouping (a new sampler), at
the first round it runs (`BandedLedger.begin_round`), whether or not rounds
are re-run. Each stream is by itself the mechanism above over its own rounds,
the streams are composed: epsilon = the event above with sum over streams of
ceil(n_s / B) participations (`events.banded_compositions`). A checkpoint
holds the current stream's B - 1 noise vectors: keep checkpoints/ as private
as the server. --log_cohorts is refused (the analysis needs secret cohorts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dpfl_tff.config import BANDS_AUTO, ExperimentConfig
from dpfl_tff.errors import ConfigError, LedgerError
from dpfl_tff.privacy import bands_auto, banded_strategy, events, truncation
from dpfl_tff.privacy.events import ADD_OR_REMOVE_ONE, EpsilonTracker, RoundPrivacy, banded_compositions
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.privacy.mechanism import PrivacyMechanism, refuse
from dpfl_tff.sampling import BandedPoissonSampling, scheme_of

STRATEGY_JSON = "strategy.json"
# The noise buffers (B - 1 float64 model copies) may take at most this share of the machine's memory.
MAX_BUFFER_SHARE = 0.25


class BandedLedger(Ledger):
    """Banded MF's ledger: the released rounds of each noise stream and their composed participations.

    `begin_round` starts a new stream at the first round a process runs (a new run, or a resumed one); its
    fields (`stream`, `stream_round`) go into the round's ledger.jsonl line and metrics, and `replay_entry`
    rebuilds the streams from them.
    """

    neighboring_relation = ADD_OR_REMOVE_ONE

    def __init__(self, participation: RoundPrivacy, delta: float, accountant: str, bands: int,
                 out_of_reach_per_round: float):
        super().__init__()
        self.participation, self.delta, self.bands = participation, delta, int(bands)
        self.tracker = EpsilonTracker(participation, delta, accountant)
        self.out_of_reach_per_round = out_of_reach_per_round
        self.streams: list[int] = []  # rounds released in each noise stream
        self._started = False  # whether this process has begun its stream
        self._pending: dict[str, int] | None = None

    @property
    def amplified_by_sampling(self) -> bool:
        return True

    def begin_round(self, round_num: int) -> dict[str, Any]:
        del round_num
        if not self._started:
            self._pending = {"stream": len(self.streams) + 1, "stream_round": 1}
        else:
            self._pending = {"stream": len(self.streams), "stream_round": self.streams[-1] + 1}
        return dict(self._pending)

    def _streams_after(self, fields: dict[str, int]) -> list[int]:
        if fields["stream_round"] == 1:
            return [*self.streams, 1]
        return [*self.streams[:-1], self.streams[-1] + 1]

    def compositions(self, streams: list[int] | None = None) -> int:
        return banded_compositions(self.streams if streams is None else streams, self.bands)

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        """Every round's Gaussian xi_t may be shifted by the worst client (by at most 1/z: ||c|| = 1)."""
        del participations
        return (self.released if released is None else released) * self.out_of_reach_per_round

    def _fields(self, streams: list[int], released: int) -> dict[str, Any]:
        k = self.compositions(streams)
        return {"epsilon": self.tracker.epsilon(k), "participations_accounted": k, "noise_streams": len(streams),
                **self.sampler_fields(released)}

    def preview(self, cohort) -> float:
        del cohort
        if self._pending is None:
            raise RuntimeError("BandedLedger.preview before begin_round")
        return self.tracker.epsilon(self.compositions(self._streams_after(self._pending)))

    def _add(self, fields: dict[str, int], error: type[Exception]) -> None:
        expected = (len(self.streams) + 1, 1) if fields["stream_round"] == 1 else (
            len(self.streams), (self.streams[-1] + 1) if self.streams else None)
        if (fields["stream"], fields["stream_round"]) != expected:
            raise error(f"stream {fields['stream']} round {fields['stream_round']} does not follow the "
                        f"{len(self.streams)} noise stream(s) before it")
        self.streams = self._streams_after(fields)
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        del cohort
        if self._pending is None:
            raise RuntimeError("BandedLedger.commit before begin_round")
        fields, self._pending = self._pending, None
        self._add(fields, RuntimeError)
        self._started = True
        return {**self._fields(self.streams, self.released), "rounds_accounted": self.released}

    def replay(self, cohort) -> None:
        raise LedgerError("a banded-MF ledger line must be replayed with its noise stream (replay_entry)")

    def replay_entry(self, entry: dict[str, Any]) -> None:
        try:
            fields = {k: int(entry[k]) for k in ("stream", "stream_round")}
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger release {entry.get('release')}: no noise-stream fields, which banded MF "
                              "needs") from e
        self._add(fields, LedgerError)

    def _planned_fields(self, streams: list[int], released: int) -> dict[str, Any]:
        fields = self._fields(streams, released)
        fields["effective_noise_multiplier"] = self.participation.noise_multiplier
        fields["analysis"] = (f"{self.participation.description}; {fields['participations_accounted']} "
                              f"participation(s) composed over {len(streams)} noise stream(s)")
        return fields

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        del participations
        return self._planned_fields([int(rounds)], int(rounds))

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        left = max(rounds - resume_round, 0)
        streams = [*self.streams, left] if left else list(self.streams)  # a resumed run opens a new stream
        total = self.released + left
        return {**self._planned_fields(streams, total), "rounds_accounted": total}

    def prefetch(self) -> None:
        if self._pending is not None:
            self.tracker.prefetch(self.compositions(self._streams_after(self._pending)))

    def close(self) -> None:
        self.tracker.close()


class BandedMatrixFactorization(PrivacyMechanism):
    """Amplified banded MF (see the module docstring)."""

    name = "bandmf"
    neighboring_relation = ADD_OR_REMOVE_ONE
    default_client_sampling = BandedPoissonSampling.name

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        t, dp = cfg.train, cfg.dp
        auto = dp.bands == BANDS_AUTO  # resolved by `resolved` (plan), the checks below then run on its B
        refusals = [
            (not scheme_of(cfg).banded,
             f"--client_sampling={t.client_sampling} with --dp_mode=bandmf: banded MF's analysis needs "
             "--client_sampling=banded (the default with bandmf)"),
            (auto and dp.target_epsilon is None,
             f"--bands={BANDS_AUTO}: needs --target_epsilon (B is chosen for the smallest expected prefix-sum "
             "error z^2*||A C_B^-1||_F^2/T at the run's epsilon; at a fixed --noise_multiplier every B has a "
             "different epsilon, so their errors do not compare); give --target_epsilon, or an integer --bands"),
            (not auto and dp.bands > t.rounds, f"--bands={dp.bands}: must be <= --rounds={t.rounds}"),
            (not auto and cfg.task.n_is_known and t.clients_per_round * dp.bands > cfg.population,
             f"--bands={dp.bands}: q = clients_per_round * bands / N = {t.clients_per_round} * {dp.bands} / "
             f"{cfg.population} must be <= 1; use fewer --bands or a smaller --clients_per_round"),
            (dp.adaptive_clipping, "--adaptive_clipping with --dp_mode=bandmf: not supported; use a fixed --clip_norm"),
            (t.fedavg_impl != "grouped",
             f"--fedavg_impl={t.fedavg_impl} with --dp_mode=bandmf: not supported (a noise stream is restarted "
             "through the grouped process' state); use --fedavg_impl=grouped"),
            (cfg.log_cohorts,
             "--log_cohorts with --dp_mode=bandmf: not supported (its amplified epsilon needs secret cohorts)"),
            (dp.noise_multiplier == 0 and dp.target_epsilon is None and not cfg.canary_clients,
             "--noise_multiplier=0 with --dp_mode=bandmf: zero noise gives no privacy; use --dp_mode=none, "
             "or set --noise_multiplier > 0"),
        ]
        refuse(refusals)

    @classmethod
    def resolved(cls, cfg: ExperimentConfig, model_parameters: int | None = None) -> ExperimentConfig:
        """--bands=auto (N known): `cfg` with the chosen B (`privacy.bands_auto`); else `cfg`.

        A B chosen before the model's size was known (`plan.check`) is chosen again with it (`plan.prepare`:
        the buffers' memory bound; the calibrations are cached).
        """
        if cfg.dp.bands_auto is not None and model_parameters is not None:
            cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, bands=BANDS_AUTO, bands_auto=None))
        if cfg.dp.bands != BANDS_AUTO or not cfg.task.n_is_known:
            return cfg
        return bands_auto.resolved(cfg, model_parameters)

    @property
    def bands(self) -> int:
        return self.cfg.dp.bands

    @property
    def strategy(self) -> banded_strategy.BandedStrategy:
        """The strategy optimized for --rounds and --bands (cached by both)."""
        return banded_strategy.optimize_banded(self.cfg.train.rounds, self.bands)

    def query(self, record_specs: Any = None):
        from dpfl_tff.privacy import bandmf_query

        if record_specs is None:
            raise ValueError("the banded-MF query needs the model update's TensorSpecs")
        self._check_buffers(record_specs)
        dp = self.cfg.dp
        return bandmf_query.bandmf_query(dp.clip_norm, dp.noise_multiplier, self.strategy.coefficients,
                                         self.cfg.train.clients_per_round, record_specs, dp.noise_seed)

    def _check_buffers(self, record_specs: Any) -> None:
        import numpy as np

        params = sum(int(np.prod(s.shape)) for s in record_specs)
        need = bands_auto.buffer_bytes(self.bands, params)
        total = bands_auto.memory_bytes()
        if total is None:
            return
        if need > MAX_BUFFER_SHARE * total:
            raise ConfigError(
                f"--bands={self.bands}: the server would keep {self.bands - 1} float64 copies of the "
                f"{params:,}-parameter model ({need / 2**30:.1f} GiB), more than {MAX_BUFFER_SHARE:.0%} of this "
                "machine's memory; use fewer --bands"
            )

    def round_privacy(self) -> RoundPrivacy | None:
        """One participation of a client (the run composes ceil(T / B) of them)."""
        if not self.cfg.task.n_is_known:
            return None
        return self.scheme.gaussian_round(self.cfg.population, self.cfg.train.clients_per_round,
                                          self.cfg.dp.noise_multiplier)

    def out_of_reach_per_round(self) -> float:
        z = self.cfg.dp.noise_multiplier
        return truncation.gaussian_out_of_reach(1.0 / z) if z else 0.0

    def planned_out_of_reach(self, rounds: int) -> float:
        return rounds * self.out_of_reach_per_round()

    def ledger(self) -> BandedLedger:
        return BandedLedger(self.round_privacy(), self.cfg.target_delta, self.cfg.dp.accountant, self.bands,
                            self.out_of_reach_per_round())

    def planned_event(self, rounds: int) -> tuple[Any, str] | None:
        rp = self.round_privacy()
        if rp is None:
            return None
        return events.bandmf_event(rp, [rounds], self.bands), rp.neighboring_relation

    def prepare_state(self, state: Any, round_fields: dict[str, Any]) -> Any:
        """At a stream's first round: the state with the noise buffers to restart (`bandmf_query.with_new_stream`)."""
        if round_fields.get("stream_round") != 1:
            return state
        from dpfl_tff.privacy import bandmf_query

        return state._replace(aggregator=bandmf_query.with_new_stream(state.aggregator, round_fields["stream"]))

    def summary_fields(self) -> dict[str, Any]:
        s = self.strategy
        return {"bands": self.bands, "strategy_loss": s.loss, "strategy_independent_noise_loss": s.independent_loss,
                "strategy_file": STRATEGY_JSON, **bands_auto.summary_fields(self.cfg)}

    def run_files(self) -> dict[str, Any]:
        """strategy.json: the strategy and what the accounting used, to recompute the sensitivity and epsilon."""
        rp = self.round_privacy()
        cfg = self.cfg
        return {STRATEGY_JSON: {
            **self.strategy.as_json(),
            "noise_multiplier": cfg.dp.noise_multiplier,
            "sampling": "banded: secret groups of B, round t Poisson-samples group t mod B",
            "sampling_probability": None if rp is None else cfg.train.clients_per_round * self.bands / cfg.population,
            "neighboring_relation": ADD_OR_REMOVE_ONE,
            "participations_planned": math.ceil(cfg.train.rounds / self.bands),
            "event": "SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), sum over noise streams of "
                     "ceil(rounds / B))",
            **bands_auto.summary_fields(cfg),
        }}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg, s = self.cfg, self.strategy
        choice = bands_auto.choice_text(cfg)
        return (
            f"privacy: {choice + '; ' if choice else ''}{planned['analysis']}; strategy {self.bands}-banded Toeplitz optimized for "
            f"{cfg.train.rounds} rounds (prefix-sum error {s.loss / s.independent_loss:.3g}x independent noise's, "
            f"{STRATEGY_JSON}); accountant {cfg.dp.accountant.upper()}, {self.delta_text(planned)}; epsilon after "
            f"{cfg.train.rounds} rounds: {planned['epsilon']:.4g}"
        )
