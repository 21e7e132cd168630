"""`--dp_level=example`: record-level DP by DP-SGD inside every client, and each client's record epsilon.

Neighbouring data sets differ in one *record* of one client (add-or-remove-one
record). Every client trains its local steps with DP-SGD
(`privacy.dp_sgd`, Abadi et al. 2016, arXiv:1607.00133): each step draws its
batch by Poisson sampling of the client's n_i records at q_i = min(1, b / n_i)
(b = --client_batch_size), clips each example's gradient to L2 norm C_ex, adds
Gaussian noise of std z_ex C_ex to the sum (float64, `privacy.sampler`) and
divides by b. A client runs `local_steps(n_i, b, epochs)` =
epochs * ceil(n_i / b) steps per round. Its update, and everything computed
from it, is then private for its records against everyone, the server
included; no training statistic leaves a client.

The server adds nothing (`--dp_mode=none`: the plain mean of the updates;
client-level DP on top is refused). A record lives in one client, and the
other clients' updates do not depend on it, so its guarantee is its client's:
client i's record epsilon composes, over the rounds it took part in,
`SelfComposedDpEvent(PoissonSampledDpEvent(q_i, GaussianDpEvent(z_ex)), steps_i)`
(RDP or PLD). No amplification by client sampling is claimed (every round a
client took part in counts in full, and ledger.jsonl lists the cohorts).
The run's record-level guarantee, `record_epsilon`, is the maximum over clients.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import events, rdp_many, truncation
from dpfl_tff.privacy.events import ADD_OR_REMOVE_ONE, example_level_client_event, make_accountant
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.privacy.mechanism import PrivacyMechanism, refuse

RECORD_RELATION = "add_or_remove_one_record"
# summary.json lists every client's record epsilon up to this many clients, quantiles beyond.
PER_CLIENT_LIMIT = 100
# More distinct sampling rates than this: the ledger's RDP curves are computed vectorized (`rdp_many`), not one
# by one by dp-accounting (0.2-0.5 s each).
VECTORIZE_ABOVE = 16
QUANTILES = (0.0, 0.5, 0.9, 0.99, 1.0)


def local_steps(num_records: int, expected_batch: int, epochs: int) -> int:
    """DP-SGD steps of a client of `num_records` records in one round: epochs * ceil(n / b) (0 without records)."""
    if num_records <= 0:
        return 0
    return int(epochs) * -(-int(num_records) // int(expected_batch))


def sampling_rate(num_records: int, expected_batch: int) -> float:
    """q = min(1, b / n): each record's probability to be in one step's Poisson batch."""
    return min(1.0, expected_batch / num_records)


def _step_rdp(q: float, z: float, orders: tuple[float, ...] | None) -> tuple[Any, Any]:
    """(orders, RDP curve) of one `PoissonSampledDpEvent(q, GaussianDpEvent(z))`, add-or-remove-one (the curve
    is computed once per process by `events.CachedRdpAccountant`: dp-accounting takes 0.2-0.5 s per curve)."""
    acc = make_accountant("rdp", ADD_OR_REMOVE_ONE, orders)
    acc.compose(events.example_level_step_event(q, z))
    return acc.orders, acc.rdp


def _counts_field(counts: Sequence[int]) -> dict[str, Any]:
    """`record_counts` (each client's n_i) up to PER_CLIENT_LIMIT clients, else their min, max and total."""
    if len(counts) <= PER_CLIENT_LIMIT:
        return {"record_counts": list(counts)}
    return {"record_counts_range": {"clients": len(counts), "min": min(counts), "max": max(counts),
                                    "total": sum(counts)}}


def per_client(eps: list[float]) -> dict[str, Any]:
    """`record_epsilon_per_client` (up to PER_CLIENT_LIMIT clients), else `record_epsilon_quantiles` (nearest rank,
    rounded up: each quantile is a client's value at or above it)."""
    if len(eps) <= PER_CLIENT_LIMIT:
        return {"record_epsilon_per_client": list(eps)}
    ranked = sorted(eps)
    return {"record_epsilon_quantiles": {
        f"{q:g}": ranked[min(len(ranked) - 1, math.ceil(q * (len(ranked) - 1)))] for q in QUANTILES}}


class RecordLedger(Ledger):
    """Each client's record-level epsilon, from the rounds it took part in (cohorts from every release).

    `epsilon` (client level) is infinite: nothing protects a client's whole data. Per client the steps of one
    round are fixed by its record count, so after p participations its event is `steps_i * p` Poisson-sampled
    Gaussian steps: RDP is that many times one step's curve (one per distinct sampling rate, `step_curve`;
    epsilons cached per (rate, steps in all), so clients of equal counts and participations share one), PLD
    composes the event afresh for each (rate, steps in all) (cached; about 0.1 s each). `orders`: the RDP orders (None:
    dp-accounting's default, what a run reports; calibration searches on a faster subset of them).
    """

    neighboring_relation = None  # client level: no guarantee

    def __init__(self, record_counts: Sequence[int], expected_batch: int, epochs: int, z: float, delta: float,
                 accountant: str, orders: tuple[float, ...] | None = None):
        super().__init__()
        self.counts = [int(n) for n in record_counts]
        self.b, self.epochs, self.z, self.delta, self.accountant = expected_batch, epochs, float(z), delta, accountant
        self.steps = [local_steps(n, expected_batch, epochs) for n in self.counts]
        self.participations: collections.Counter = collections.Counter()
        self.orders = orders
        self._pld: dict[tuple[float, int], float] = {}  # (q, steps in all) -> epsilon
        self._curves: dict[float, tuple[Any, Any]] | None = None  # q -> (orders, one step's RDP curve)
        self._rdp_eps: dict[tuple[float, int], float] = {}  # (q, steps in all) -> epsilon
        self.out_of_reach_per_step = 0.0 if self.z == 0 else truncation.gaussian_out_of_reach(1.0 / self.z)
        make_accountant(accountant, ADD_OR_REMOVE_ONE)  # raises on an unknown accountant

    def client_epsilon(self, client: int, participations: int) -> float:
        """Client `client`'s record epsilon at `delta` after `participations` rounds (0 rounds: 0; z = 0: inf)."""
        n, steps = self.counts[client], self.steps[client]
        if participations <= 0 or steps == 0:
            return 0.0
        if self.z == 0:
            return math.inf
        if self.accountant == "rdp":
            q, total = sampling_rate(n, self.b), steps * participations
            key = (q, total)
            if key not in self._rdp_eps:
                orders, rdp = self.step_curve(q)
                self._rdp_eps[key] = float(rdp_lib.compute_epsilon(orders, rdp * total, self.delta)[0])
            return self._rdp_eps[key]
        key = (sampling_rate(n, self.b), steps * participations)  # clients of one rate and step count share it
        if key not in self._pld:
            acc = make_accountant("pld", ADD_OR_REMOVE_ONE)
            acc.compose(example_level_client_event(n, self.b, self.z, steps), participations)
            self._pld[key] = float(acc.get_epsilon(self.delta))
        return self._pld[key]

    def step_curve(self, q: float) -> tuple[Any, Any]:
        """(orders, RDP curve) of one step at rate `q`. The curves of all the ledger's distinct rates are computed
        on first use: by dp-accounting, one by one, up to `VECTORIZE_ABOVE` distinct rates; beyond, all at once
        by `rdp_many.poisson_gaussian_rdp` (the same formulas vectorized over the rates, each value raised by a
        bound on its rounding: never below dp-accounting's)."""
        if self._curves is None:
            rates = sorted({sampling_rate(n, self.b) for n, s in zip(self.counts, self.steps) if s > 0})
            if len(rates) > VECTORIZE_ABOVE and self.z > 0:
                orders = np.asarray(dp_accounting.rdp.RdpAccountant().orders if self.orders is None else self.orders,
                                    dtype=np.float64)
                curves = rdp_many.poisson_gaussian_rdp(rates, self.z, orders)
                self._curves = {q: (orders, curves[k]) for k, q in enumerate(rates)}
            else:
                self._curves = {}
        if q not in self._curves:
            self._curves[q] = _step_rdp(q, self.z, self.orders)
        return self._curves[q]

    def epsilons(self, participations: dict[int, int] | None = None) -> list[float]:
        """Every client's record epsilon (`participations`: per client, default the ledger's)."""
        p = self.participations if participations is None else participations
        return [self.client_epsilon(c, p.get(c, 0)) for c in range(len(self.counts))]

    def _after(self, cohort) -> dict[int, int]:
        p = dict(self.participations)
        for c in cohort:
            p[int(c)] = p.get(int(c), 0) + 1
        return p

    def _fields(self, participations: dict[int, int]) -> dict[str, Any]:
        eps = self.epsilons(participations)
        worst = max(range(len(eps)), key=lambda c: eps[c]) if eps else 0
        worst_steps = max((self.steps[c] * k for c, k in participations.items()), default=0)
        out = truncation.delta_sampler(worst_steps * self.out_of_reach_per_step, self.delta)
        return {"epsilon": math.inf, "record_epsilon": max(eps, default=0.0), "record_epsilon_client": int(worst),
                "record_steps_max": int(worst_steps), "delta_sampler": out}

    def preview(self, cohort) -> float:
        return math.inf

    def preview_of(self, cohort, view: str) -> tuple[float, str]:
        """Every budget guard caps `record_epsilon` (the model is post-processing of the private updates)."""
        del view
        return self._fields(self._after(cohort))["record_epsilon"], "record_epsilon"

    def guarded_field(self, view: str) -> str:
        del view
        return "record_epsilon"

    def replay(self, cohort) -> None:
        if cohort is None:  # a ledger line without its cohort: any client may have taken part
            cohort = range(len(self.counts))
        self.participations = collections.Counter(self._after(cohort))
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        self.replay(cohort)
        return {**self._fields(self.participations), "rounds_accounted": self.released}

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        p = rounds if participations is None else participations
        every = {c: p for c in range(len(self.counts))}
        fields = self._fields(every)
        fields["analysis"] = self.analysis(p)
        fields.update(per_client(self.epsilons(every)))
        return fields

    def analysis(self, participations: int) -> str:
        return (f"DP-SGD in every client, Poisson sampling q_i = min(1, {self.b}/n_i), Gaussian z_ex={self.z:.6g}, "
                f"{self.epochs} x ceil(n_i/{self.b}) steps per round, add-or-remove-one record, composed over "
                f"{participations} participation(s) per client, no amplification by client sampling")

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        """Every client may take part in every round left."""
        left = max(rounds - resume_round, 0)
        p = {c: self.participations.get(c, 0) + left for c in range(len(self.counts))}
        fields = self._fields(p)
        fields["analysis"] = self.analysis(max(p.values(), default=0))
        fields["rounds_accounted"] = self.released + left
        return fields

    def summary_fields(self) -> dict[str, Any]:
        """summary.json: every client's record epsilon (or quantiles for more than PER_CLIENT_LIMIT clients)."""
        eps = self.epsilons()
        return {"record_epsilon": max(eps, default=0.0),
                "record_participations_max": max(self.participations.values(), default=0), **per_client(eps)}


class ExampleLevelDPSGD(PrivacyMechanism):
    """`--dp_level=example` (see the module docstring): DP-SGD at the clients, the plain mean at the server."""

    name = "none"  # the client-level mode: the server adds no noise
    releases_client_statistics = False  # the clients' training metrics are not private: they stay there
    ledger_needs_cohorts = True  # each client's participations, rebuilt on a resume from ledger.jsonl

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        dp, t = cfg.dp, cfg.train
        refuse([
            (dp.mode != "none",
             f"--dp_level=example with --dp_mode={dp.mode}: client-level DP on top of record-level DP is not "
             "supported; give --dp_mode=none (the server then averages the clients' already-private updates)"),
            (dp.example_noise_multiplier == 0 and dp.target_epsilon is None,
             "--example_noise_multiplier=0 with --dp_level=example: zero noise gives no record-level privacy "
             "(record_epsilon is infinite); set --example_noise_multiplier > 0, or --dp_level=client --dp_mode=none "
             "to train without DP"),
            (cfg.canary_clients > 0,
             f"--canary_clients={cfg.canary_clients} with --dp_level=example: the audit's canaries are clients "
             "(client-level); canary records are not supported; leave --canary_clients=0"),
            (t.fedavg_impl != "grouped",
             f"--fedavg_impl={t.fedavg_impl} with --dp_level=example: DP-SGD runs in --fedavg_impl=grouped only"),
            (t.client_max_examples > 0,
             f"--client_max_examples={t.client_max_examples} with --dp_level=example: DP-SGD samples from all of a "
             "client's records (the accounting's n_i); leave --client_max_examples=0"),
        ])

    def query(self, record_specs: Any = None):
        del record_specs
        from dpfl_tff.privacy import queries

        return queries.MeanQuery()

    def cohort_size_covered(self) -> bool:
        """Which clients take part is drawn independently of every record: its size reveals none."""
        return True

    def clip_in(self, query_state: Any) -> float | None:
        return None  # the server clips nothing (each example's gradient is clipped at the clients)

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        return {}

    def _record_counts(self) -> list[int]:
        counts = list(self.cfg.dp.record_counts)
        if not counts:  # before the data is loaded (plan.check): one client of one batch, to check the accountant
            counts = [self.cfg.train.client_batch_size]
        return counts

    def ledger(self) -> RecordLedger:
        cfg = self.cfg
        return RecordLedger(self._record_counts(), cfg.train.client_batch_size, cfg.train.client_epochs,
                            cfg.dp.example_noise_multiplier, cfg.target_delta, cfg.dp.accountant)

    def planned_out_of_reach(self, rounds: int) -> float:
        z = self.cfg.dp.example_noise_multiplier
        if z == 0:
            return 0.0
        steps = max(local_steps(n, self.cfg.train.client_batch_size, self.cfg.train.client_epochs)
                    for n in self._record_counts())
        return rounds * steps * truncation.gaussian_out_of_reach(1.0 / z)

    def planned_event(self, rounds: int) -> tuple[Any, str] | None:
        return None  # the guarantee is a maximum over clients, not one event (`calibrate_example_noise`)

    def summary_fields(self) -> dict[str, Any]:
        dp = self.cfg.dp
        return {"dp_level": "example", "example_clip_norm": dp.example_clip_norm,
                "example_noise_multiplier": dp.example_noise_multiplier, "record_neighboring_relation": RECORD_RELATION,
                "expected_batch": self.cfg.train.client_batch_size, **_counts_field(dp.record_counts)}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg = self.cfg
        n = len(cfg.dp.record_counts)
        return (
            f"privacy: record-level DP (--dp_level=example): DP-SGD in each of the {n} clients, per-example clip "
            f"{cfg.dp.example_clip_norm:g}, Gaussian z_ex={cfg.dp.example_noise_multiplier:.6g}, Poisson batches of "
            f"expected size {cfg.train.client_batch_size}; add-or-remove-one record; accountant "
            f"{cfg.dp.accountant.upper()} per client, no amplification by client sampling; {self.delta_text(planned)}; "
            f"record epsilon (max over clients) if every client takes part in all {cfg.train.rounds} rounds: "
            f"{planned['record_epsilon']:.4g}; no client-level guarantee (epsilon inf)"
        )

    def delta_text(self, planned: dict[str, Any] | None = None) -> str:
        cfg = self.cfg
        default = "" if cfg.dp.target_delta else " (default 1/(clients' records)^1.1)"
        text = f"delta={cfg.target_delta:.3g}{default}"
        if planned is not None and planned.get("delta_sampler"):
            text += f" + {planned['delta_sampler']:.2g} (noise sampler's bound)"
        return text


def planned_record_epsilon(cfg: ExperimentConfig, z: float, accountant: str | None = None,
                           orders: tuple[float, ...] | None = None) -> float:
    """record_epsilon of `cfg`'s planned run (every client in all --rounds) at noise multiplier `z`."""
    t = cfg.train
    ledger = RecordLedger(cfg.dp.record_counts, t.client_batch_size, t.client_epochs, z, cfg.target_delta,
                          accountant or cfg.dp.accountant, orders)
    return ledger.planned(t.rounds)["record_epsilon"]


def calibrate_example_noise(cfg: ExperimentConfig, target_epsilon: float) -> float:
    """The smallest z_ex (to a relative 1e-4, rounded up) whose planned record_epsilon is <= `target_epsilon`.

    Bisection on the maximum over clients (each client's epsilon decreases in z, so the maximum does),
    with RDP at the integer orders of dp-accounting's default: a minimum over fewer orders, so never below
    the epsilon the run reports (RDP at every default order). The result is then checked with the run's
    accountant and raised by 0.1% steps until it passes (PLD), so it is always on the safe side.

    Raises:
      ConfigError: no z_ex <= 2**20 reaches the target.
    """
    orders = events.integer_orders()

    def eps(z: float) -> float:
        return planned_record_epsilon(cfg, z, "rdp", orders)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 2**20:
            raise ConfigError(
                f"--target_epsilon={target_epsilon}: no --example_noise_multiplier <= 2^20 reaches it for "
                f"{cfg.train.rounds} rounds at delta={cfg.target_delta:.3g}; raise --target_epsilon or lower --rounds")
    lo = hi / 2
    while lo > 1e-2 and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    for _ in range(60):
        if hi - lo <= 1e-4 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    for _ in range(1000):
        if planned_record_epsilon(cfg, hi) <= target_epsilon:
            return hi
        hi *= 1.001
    raise ConfigError(f"--target_epsilon={target_epsilon}: calibration of --example_noise_multiplier did not "
                      f"converge with --accountant={cfg.dp.accountant}; give --example_noise_multiplier")
