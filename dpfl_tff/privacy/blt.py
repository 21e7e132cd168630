"""`--dp_mode=blt`: BLT-DP-FTRL, buffered-linear-Toeplitz correlated noise with cyclic participation.

References: Dvijotham et al. 2024 (arXiv:2404.16706), McMahan et al. 2024
(arXiv:2408.08868); min-separation sensitivity: Kalinin and Lampert 2024
(arXiv:2405.13763, Theorem 2), jax_privacy's `minsep_sensitivity_squared`.

Participation (`--client_sampling=cyclic`, `sampling.CyclicSampler`): the
clients are split into b = floor(N / m) fixed groups; round t (1-based)
trains group (t - 1) mod b. Any two participations of a client are exactly
b rounds apart and in T rounds it takes part at most k = ceil(T / b) times.
No amplification by sampling is claimed: the groups need no secrecy, and
ledger.jsonl records the cohorts (a resume rebuilds the groups from them;
the ledger checks every client's participations are >= b rounds apart).

Noise (`privacy.blt_query`): the server clips every update to L2 norm C,
sums, and adds z C x_t with x = C^-1 xi, xi_t ~ N(0, I) (float64), for the
BLT strategy C (`privacy.blt_strategy`: c_0 = 1, c_j = sum_i omega_i
theta_i^(j-1)) optimized for T, b and k (mean squared prefix-sum error times
the min-sep sensitivity squared), then divides by m. The prefix sums of the
outputs are post-processing of C G + z C xi.

Privacy (client level, add-or-remove-one of a client's data: the neighbour
adds or removes one client's updates from the rounds of its group, the
groups otherwise fixed and public): the rounds 1..t of one stream are the
Gaussian mechanism on C_t G (C_t the leading t x t block) of L2 sensitivity
sens_t C, sens_t^2 = minsep_sensitivity_squared(C_t, b, ceil(t / b)) (exact:
C's coefficients are positive and non-increasing), noise std z C, so
`GaussianDpEvent(z / sens_t)`; epsilon after t rounds uses exactly that.

Resume: a resume from a checkpoint older than the ledger re-runs released
rounds in a fresh stream (buffers zeroed, new seed, its own step 0), never
with the old stream's noise. Streams are independent Gaussian mechanisms
composed adaptively, so the run is one `GaussianDpEvent(z / sqrt(sum_s
sens_s^2))` over its streams s (Gaussian composition is exact: mu^2 adds),
every stream with its own length (`BLTLedger`). Noise seeds come from OS
entropy (tests only: --noise_seed and the stream's number). The checkpoints
hold the buffers and the seed: keep checkpoints/ as private as the server.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import LedgerError
from dpfl_tff.privacy import blt_strategy, events, truncation
from dpfl_tff.privacy.events import ADD_OR_REMOVE_ONE, make_accountant
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.privacy.mechanism import PrivacyMechanism, refuse
from dpfl_tff.sampling import CyclicSampling, scheme_of

SERVER_OPTIMIZERS = ("sgd", "sgdm")
STRATEGY_FILE = "strategy.json"


class BLTLedger(Ledger):
    """BLT's ledger: the streams of released rounds, their sensitivities, their composed epsilon.

    `begin_round(r)` starts a new stream at the first round and when the previous
    release was not round r - 1 (a resume that re-runs rounds). Its fields
    (`blt_stream`, `blt_stream_round`, `blt_strategy_rounds`) go into ledger.jsonl
    and the metrics; `replay_entry` rebuilds the streams from them. Every client's
    participations in a stream are checked to be at least b rounds apart.
    """

    neighboring_relation = ADD_OR_REMOVE_ONE

    def __init__(self, strategy: blt_strategy.BLTStrategy, noise_multiplier: float, delta: float, accountant: str):
        super().__init__()
        self.strategy, self.noise_multiplier, self.delta, self.accountant = strategy, noise_multiplier, delta, accountant
        self.streams: list[int] = []
        self._last_round = 0
        self._last_seen: dict[int, int] = {}  # client -> its last round in the current stream
        self._pending: dict[str, Any] | None = None
        self._pending_round = 0
        self._eps_cache: dict[float, float] = {}
        self._sens_cache: dict[int, float] = {}

    def sensitivity(self, steps: int) -> float:
        if steps not in self._sens_cache:
            self._sens_cache[steps] = self.strategy.sensitivity(steps)
        return self._sens_cache[steps]

    def sensitivities(self, streams: list[int]) -> list[float]:
        return [self.sensitivity(s) for s in streams]

    def epsilon(self, streams: list[int] | None = None) -> float:
        sens = self.sensitivities(self.streams if streams is None else streams)
        s2 = sum(s * s for s in sens)
        if s2 == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if s2 not in self._eps_cache:
            acc = make_accountant(self.accountant, ADD_OR_REMOVE_ONE)
            acc.compose(events.blt_event(self.noise_multiplier, sens))
            self._eps_cache[s2] = float(acc.get_epsilon(self.delta))
        return self._eps_cache[s2]

    def stream_out_of_reach(self, streams: list[int]) -> float:
        """A stream's whole release shifts by sens_s / z noise stds in L2 (`truncation.gaussian_out_of_reach`)."""
        if self.noise_multiplier == 0:
            return 0.0
        return sum(truncation.gaussian_out_of_reach(s / self.noise_multiplier) for s in self.sensitivities(streams))

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        del participations
        return self.stream_out_of_reach(self.streams if released is None else [released])

    def _starts_stream(self, r: int, last: int, streams: list[int]) -> bool:
        return not streams or last != r - 1

    def begin_round(self, round_num: int) -> dict[str, Any]:
        r = int(round_num)
        new = self._starts_stream(r, self._last_round, self.streams)
        self._pending = {"blt_stream": len(self.streams) + (1 if new else 0),
                         "blt_stream_round": 1 if new else self.streams[-1] + 1,
                         "blt_strategy_rounds": self.strategy.rounds}
        self._pending_round = r
        return dict(self._pending)

    def _streams_after(self, fields: dict[str, Any]) -> list[int]:
        if fields["blt_stream_round"] == 1:
            return [*self.streams, 1]
        return [*self.streams[:-1], self.streams[-1] + 1]

    def preview(self, cohort) -> float:
        if self._pending is None:
            raise RuntimeError("BLTLedger.preview before begin_round")
        return self.epsilon(self._streams_after(self._pending))

    def _add(self, round_num: int, fields: dict[str, Any], cohort, error: type[Exception]) -> None:
        if fields["blt_strategy_rounds"] != self.strategy.rounds:
            raise error(f"round {round_num}: released with a BLT strategy optimized for {fields['blt_strategy_rounds']}"
                        f" rounds, this run's is for --rounds={self.strategy.rounds}; keep "
                        f"--rounds={fields['blt_strategy_rounds']} to resume it")
        stream, step = fields["blt_stream"], fields["blt_stream_round"]
        if stream not in (len(self.streams), len(self.streams) + 1) or (
                step != (1 if stream > len(self.streams) else self.streams[-1] + 1)):
            raise error(f"round {round_num}: BLT stream {stream} step {step} does not follow the "
                        f"{len(self.streams)} stream(s) before it")
        if step == 1:
            self._last_seen = {}
        clients = [int(c) for c in cohort] if cohort is not None else None
        if clients is None:
            raise error(f"round {round_num}: no cohort, which the BLT ledger needs to check the participations")
        if len(set(clients)) != len(clients):
            raise error(f"round {round_num}: a client takes part twice in one round")
        b = self.strategy.min_separation
        for c in clients:
            if c in self._last_seen and round_num - self._last_seen[c] < b:
                raise error(f"round {round_num}: client {c} took part in round {self._last_seen[c]}, fewer than "
                            f"b={b} rounds before (cyclic participation broken)")
            self._last_seen[c] = round_num
        self.streams = self._streams_after(fields)
        self._last_round = round_num
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        if self._pending is None:
            raise RuntimeError("BLTLedger.commit before begin_round")
        fields, self._pending = self._pending, None
        self._add(self._pending_round, fields, cohort, RuntimeError)
        return {"epsilon": self.epsilon(), "rounds_accounted": self.released, "blt_streams": len(self.streams),
                "blt_sensitivity": math.sqrt(sum(s * s for s in self.sensitivities(self.streams))),
                **self.sampler_fields()}

    def replay(self, cohort) -> None:
        raise LedgerError("a BLT ledger line must be replayed with its stream (replay_entry)")

    def replay_entry(self, entry: dict[str, Any]) -> None:
        try:
            fields = {k: int(entry[k]) for k in ("blt_stream", "blt_stream_round", "blt_strategy_rounds")}
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger release {entry.get('release')}: no BLT stream fields, which --dp_mode=blt "
                              "needs") from e
        self._add(int(entry["round"]), fields, entry.get("cohort"), LedgerError)

    def projected_streams(self, resume_round: int, rounds: int) -> list[int]:
        streams, last = list(self.streams), self._last_round
        for r in range(resume_round + 1, rounds + 1):
            if self._starts_stream(r, last, streams):
                streams.append(1)
            else:
                streams[-1] += 1
            last = r
        return streams

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        streams = self.projected_streams(resume_round, rounds)
        return {**self._planned_fields(streams), "rounds_accounted": self.released + max(rounds - resume_round, 0)}

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        return self._planned_fields([rounds] if rounds else [])

    def _planned_fields(self, streams: list[int]) -> dict[str, Any]:
        st = self.strategy
        sens = self.sensitivities(streams)
        total = math.sqrt(sum(s * s for s in sens))
        return {
            "epsilon": self.epsilon(streams),
            "delta_sampler": truncation.delta_sampler(self.stream_out_of_reach(streams), self.delta),
            "blt_streams": len(streams),
            "blt_sensitivity": total,
            "effective_noise_multiplier": self.noise_multiplier / total if total else math.inf,
            "analysis": (
                f"BLT-DP-FTRL, {st.buffers} buffer(s), cyclic participation: b={st.min_separation} fixed groups, "
                f"at most k={st.participations} participations b apart; min-sep sensitivity "
                f"{total:.6g} (clip units) over {len(streams)} stream(s)"
                + (f" of {streams} rounds after the run's ledger" if self.released else "")
                + f", Gaussian z/sens={self.noise_multiplier / total if total else math.inf:.6g}, add-or-remove-one"
            ),
        }


class BLTFTRL(PrivacyMechanism):
    """BLT correlated noise with cyclic participation (see the module docstring)."""

    name = "blt"
    neighboring_relation = ADD_OR_REMOVE_ONE
    ledger_needs_cohorts = True  # the participations are checked, the groups rebuilt on a resume
    default_client_sampling = CyclicSampling.name

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        t, dp = cfg.train, cfg.dp
        refusals = [
            (not scheme_of(cfg).fixed_groups,
             f"--client_sampling={t.client_sampling} with --dp_mode=blt: BLT's sensitivity needs fixed groups b "
             "rounds apart; use --client_sampling=cyclic (the default with blt)"),
            (t.server_optimizer not in SERVER_OPTIMIZERS,
             f"--server_optimizer={t.server_optimizer} with --dp_mode=blt: must be one of "
             f"{', '.join(SERVER_OPTIMIZERS)} (DP-FTRL, with or without momentum)"),
            (dp.adaptive_clipping, "--adaptive_clipping with --dp_mode=blt: not supported; use a fixed --clip_norm"),
            (t.fedavg_impl != "grouped",
             f"--fedavg_impl={t.fedavg_impl} with --dp_mode=blt: not supported (the noise stream is restarted "
             "through the grouped process' state); use --fedavg_impl=grouped"),
            (dp.noise_multiplier == 0 and dp.target_epsilon is None and not cfg.canary_clients,
             "--noise_multiplier=0 with --dp_mode=blt: zero noise gives no privacy; use --dp_mode=none, "
             "or set --noise_multiplier > 0"),
        ]
        refuse(refusals)

    @property
    def min_separation(self) -> int:
        """b = floor(N / m): the cyclic groups, and the rounds between two participations of a client."""
        return self.cfg.population // self.cfg.train.clients_per_round

    @property
    def strategy(self) -> blt_strategy.BLTStrategy:
        """The BLT optimized for T, b, k = ceil(T / b) and --blt_buffers (cached by those inputs)."""
        t, b = self.cfg.train.rounds, self.min_separation
        return blt_strategy.optimize(t, b, blt_strategy.max_participations(t, b), self.cfg.dp.blt_buffers)

    def query(self, record_specs: Any = None):
        from dpfl_tff.privacy import blt_query

        if record_specs is None:
            raise ValueError("the BLT query needs the model update's TensorSpecs")
        dp, st = self.cfg.dp, self.strategy
        return blt_query.blt_query(dp.clip_norm, dp.noise_multiplier, self.cfg.train.clients_per_round, st.theta,
                                   st.omega, record_specs, self.stream_seeds(0))

    def stream_seeds(self, stream: int) -> np.ndarray:
        """The noise seed (two int64) of stream `stream`: OS entropy, or (tests only) from --noise_seed and `stream`."""
        if self.cfg.dp.noise_seed is None:
            return np.array([secrets.randbits(62), secrets.randbits(62)], np.int64)
        return np.random.default_rng([self.cfg.dp.noise_seed, 31, stream]).integers(0, 2**62, 2, dtype=np.int64)

    def prepare_state(self, state: Any, round_fields: dict[str, Any]) -> Any:
        """At a stream's first round: the state with a new stream, freshly seeded (`blt_query.with_new_stream`)."""
        if round_fields.get("blt_stream_round") != 1:
            return state
        from dpfl_tff.privacy import blt_query

        return state._replace(aggregator=blt_query.with_new_stream(state.aggregator,
                                                                   self.stream_seeds(round_fields["blt_stream"])))

    def ledger(self) -> BLTLedger:
        return BLTLedger(self.strategy, self.cfg.dp.noise_multiplier, self.cfg.target_delta, self.cfg.dp.accountant)

    def planned_out_of_reach(self, rounds: int) -> float:
        return self.ledger().out_of_reach(rounds)

    def planned_event(self, rounds: int) -> tuple[Any, str]:
        return events.blt_event(self.cfg.dp.noise_multiplier, [self.strategy.sensitivity(rounds)]), ADD_OR_REMOVE_ONE

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        return {"next_clip_norm": self.cfg.dp.clip_norm}

    def strategy_record(self) -> dict[str, Any]:
        """strategy.json: everything needed to recompute the sensitivity and the epsilon."""
        st = self.strategy
        return {
            "dp_mode": self.name,
            "strategy": "buffered linear Toeplitz (BLT): c_0 = 1, c_j = sum_i omega_i theta_i^(j-1)",
            "loss": "mean over the T prefix sums of the expected squared noise error per unit noise multiplier, "
                    "times the min-sep sensitivity squared (jax_privacy LossFn.build_min_sep, error='mean')",
            "rounds": st.rounds, "buffers": st.buffers, "theta": list(st.theta), "omega": list(st.omega),
            "min_separation": st.min_separation, "max_participations": st.participations,
            "sensitivity": st.sensitivity(st.rounds), "loss_value": st.loss, "identity_loss": st.identity_loss,
            "optimizer_seconds": st.seconds, "noise_multiplier": self.cfg.dp.noise_multiplier,
            "clip_norm": self.cfg.dp.clip_norm, "clients_per_round": self.cfg.train.clients_per_round,
            "population": self.cfg.population,
            "dp_event": "GaussianDpEvent(noise_multiplier / sensitivity), add-or-remove-one; streams restarted by "
                        "a resume compose as one Gaussian of noise_multiplier / sqrt(sum of their sensitivities^2)",
            "toeplitz_coefs": [float(c) for c in st.coefs()],
        }

    def run_files(self) -> dict[str, dict[str, Any]]:
        return {STRATEGY_FILE: self.strategy_record()}

    def summary_fields(self) -> dict[str, Any]:
        st = self.strategy
        return {"blt_buffers": st.buffers, "blt_min_separation": st.min_separation,
                "blt_max_participations": st.participations, "blt_loss": st.loss,
                "blt_sensitivity_planned": st.sensitivity(st.rounds)}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg, st = self.cfg, self.strategy
        return (
            f"privacy: {planned['analysis']}; accountant {cfg.dp.accountant.upper()}, {self.delta_text(planned)}; "
            f"epsilon after {cfg.train.rounds} rounds: {planned['epsilon']:.4g} (sampling cyclic, no amplification; "
            f"strategy optimized in {st.seconds:.2f} s, loss {st.loss:.4g} vs {st.identity_loss:.4g} uncorrelated; "
            f"{STRATEGY_FILE})"
        )
