"""Privacy accounting: configuration -> DpEvent -> (epsilon, delta).

The event of one round is built from the same `ExperimentConfig` that builds
the aggregator (`noise.central_noise`) and the client sampler
(`sampling.py`), so the number reported is the number of what runs.

Guarantees (client-level DP: neighbouring data sets differ in one client's
whole data):

* `client_sampling=poisson`: each client joins a round independently with
  probability q = m / N. One round is `PoissonSampledDpEvent(q,
  GaussianDpEvent(z))` under the add-or-remove-one relation; the sum's L2
  sensitivity is C and the noise std is z C.
* `client_sampling=uniform`: exactly m of N clients, drawn without
  replacement. Only the replace-one relation has a sound analysis
  (`SampledWithoutReplacementDpEvent`, Wang, Balle, Kasiviswanathan 2019,
  arXiv:1808.00087). Replacing one client moves the sum of updates clipped
  to C by up to 2C, so with noise std z C the event's noise multiplier is z/2.

Rounds compose; epsilon is reported at `ExperimentConfig.target_delta`.
Composition is linear in RDP, so the per-round RDP curve is computed once and
scaled; PLD self-composes the per-round distribution.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from typing import Any

import dp_accounting
from dp_accounting import mechanism_calibration, pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy.noise import central_noise

PLD_DISCRETIZATION = 1e-3
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"
_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclasses.dataclass(frozen=True)
class RoundPrivacy:
    """The DP event of one training round and the relation it holds under."""

    event: dp_accounting.DpEvent
    neighboring_relation: str  # ADD_OR_REMOVE_ONE or REPLACE_ONE
    noise_multiplier: float  # effective z of what the server adds, in clip units
    description: str


def round_privacy(cfg: ExperimentConfig) -> RoundPrivacy | None:
    """The DP event of one central-DP round of `cfg`; None for other modes.

    Raises:
      ValueError: if the adaptive-clipping noise split is impossible.
    """
    if cfg.dp.mode != "central":
        return None  # local DP: see LocalLedger
    n, m = cfg.task.num_clients, cfg.train.clients_per_round
    z = central_noise(cfg.dp, m).effective_noise_multiplier
    if cfg.train.client_sampling == "poisson":
        q = m / n
        return RoundPrivacy(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
            ADD_OR_REMOVE_ONE,
            z,
            f"Poisson sampling q={q:.6g}, Gaussian z={z:.6g}, add-or-remove-one",
        )
    return RoundPrivacy(
        dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)),
        REPLACE_ONE,
        z,
        f"fixed cohort {m} of {n} without replacement, Gaussian z/2={z / 2:.6g} "
        "(replace-one sensitivity 2C), replace-one",
    )


def check_accountable(cfg: ExperimentConfig) -> None:
    """Raises ConfigError unless `cfg`'s rounds can be accounted as configured."""
    if cfg.dp.mode == "local":
        LocalLedger(cfg)  # raises if the accountant cannot take the local events
        return
    rp = round_privacy(cfg)
    if rp is not None and not make_accountant(cfg.dp.accountant, rp.neighboring_relation).supports(rp.event):
        raise ConfigError(
            f"--accountant={cfg.dp.accountant}: dp-accounting cannot account {rp.description}; use --accountant=rdp"
        )


def calibrate_noise_multiplier(cfg: ExperimentConfig, target_epsilon: float) -> float:
    """Smallest noise multiplier z whose epsilon after `cfg.train.rounds` rounds is <= target.

    Uses dp-accounting's `calibrate_dp_mechanism` (Brent's method), which
    returns a value on the safe side of the root: the epsilon of the result
    never exceeds `target_epsilon`. Everything but z is taken from `cfg`
    (sampling, relation, accountant, delta, adaptive split).

    Raises:
      ConfigError: if no z in (0, 2**30] meets the target.
    """
    def event(z: float) -> dp_accounting.DpEvent:
        z_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=float(z)))
        return dp_accounting.SelfComposedDpEvent(round_privacy(z_cfg).event, cfg.train.rounds)

    relation = round_privacy(cfg).neighboring_relation

    def solve(kind: str, bracket: mechanism_calibration.BracketInterval) -> float:
        return float(mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(kind, relation), event, target_epsilon, cfg.target_delta, bracket,
            tol=1e-5 if kind == "rdp" else 1e-4,  # each PLD evaluation costs seconds
        ))

    try:
        z = solve("rdp", mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0))
        if cfg.dp.accountant == "pld":
            # PLD is tighter than RDP, so its z is below RDP's. Bracket it from there: PLD
            # discretisation of a tiny z would need tens of GB.
            lo = z / 2
            while lo > 1e-2 and _epsilon_of(cfg, lo, "pld") <= target_epsilon:
                lo /= 2
            z = solve("pld", mechanism_calibration.ExplicitBracketInterval(lo, z))
    except (mechanism_calibration.NoBracketIntervalFoundError, mechanism_calibration.NoOptimumFoundError,
            ValueError) as e:
        raise ConfigError(
            f"--target_epsilon={target_epsilon}: no noise multiplier reaches it for {cfg.train.rounds} rounds "
            f"at delta={cfg.target_delta:.3g} ({e}); raise --target_epsilon or lower --rounds"
        ) from e
    return float(z)


def _epsilon_of(cfg: ExperimentConfig, z: float, kind: str) -> float:
    z_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=float(z)))
    return epsilon_after(round_privacy(z_cfg), cfg.train.rounds, cfg.target_delta, kind)


def with_calibrated_noise(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with `noise_multiplier` calibrated to `dp.target_epsilon` (unchanged if unset)."""
    if cfg.dp.mode == "none" or cfg.dp.target_epsilon is None:
        return cfg
    z = calibrate_noise_multiplier(cfg, cfg.dp.target_epsilon)
    return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=z)).validate()


def make_accountant(kind: str, relation: str) -> dp_accounting.PrivacyAccountant:
    """An empty RDP or PLD accountant for `relation`."""
    rel = _RELATIONS[relation]
    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=rel)
    if kind == "pld":
        # Pessimistic discretisation keeps PLD an upper bound at any interval; 1e-3 (dp-accounting's
        # default is 1e-4) moves epsilon by ~2e-5 relative and makes each epsilon ~10x cheaper.
        return pld.PLDAccountant(neighboring_relation=rel, value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"--accountant={kind}: must be one of rdp, pld")


def epsilon_after(rp: RoundPrivacy, rounds: int, delta: float, accountant: str) -> float:
    """Epsilon of `rounds` composed rounds at `delta` (inf if unsupported)."""
    if rounds == 0:
        return 0.0
    acc = make_accountant(accountant, rp.neighboring_relation)
    if not acc.supports(rp.event):
        raise ConfigError(
            f"--accountant={accountant}: dp-accounting cannot account {rp.description}; use --accountant=rdp"
        )
    acc.compose(rp.event, rounds)
    return float(acc.get_epsilon(delta))


class EpsilonTracker:
    """Epsilon after each round, computed incrementally.

    RDP: the per-round RDP curve is computed once; after t rounds it is t
    times that curve (RDP composes additively), converted at `delta`
    (microseconds). PLD: the per-round privacy loss distribution is built once
    and self-composed t times (tens of milliseconds); `prefetch(t)` starts that
    in a background thread so that it overlaps with round t's training.
    """

    def __init__(self, rp: RoundPrivacy, delta: float, accountant: str):
        self.round_privacy = rp
        self.delta = delta
        self.accountant = accountant
        acc = make_accountant(accountant, rp.neighboring_relation)
        if not acc.supports(rp.event):
            raise ConfigError(
                f"--accountant={accountant}: dp-accounting cannot account {rp.description}; use --accountant=rdp"
            )
        acc.compose(rp.event)
        if accountant == "rdp":
            self._orders = acc.orders
            self._rdp_one = acc.rdp
        else:
            self._pld_one = acc._pld  # noqa: SLF001  (the accountant exposes no getter)
        self._cache: dict[int, float] = {}
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _compute(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        if self.accountant == "rdp":
            eps, _ = rdp_lib.compute_epsilon(self._orders, self._rdp_one * rounds, self.delta)
            return float(eps)
        return float(self._pld_one.self_compose(rounds).get_epsilon_for_delta(self.delta))

    def prefetch(self, rounds: int) -> None:
        """Starts computing `epsilon(rounds)` in the background (PLD only; RDP is instant)."""
        if self.accountant == "rdp" or rounds in self._cache or rounds in self._pending:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epsilon")
        self._pending[rounds] = self._pool.submit(self._compute, rounds)

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds at `self.delta`."""
        if rounds not in self._cache:
            pending = self._pending.pop(rounds, None)
            self._cache[rounds] = pending.result() if pending else self._compute(rounds)
        return self._cache[rounds]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def rounds_within_budget(tracker: EpsilonTracker, max_epsilon: float, max_rounds: int) -> int:
    """Largest t <= max_rounds with epsilon(t) <= max_epsilon (epsilon grows with t)."""
    lo, hi = 0, max_rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tracker.epsilon(mid) <= max_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = [
    "ADD_OR_REMOVE_ONE",
    "REPLACE_ONE",
    "EpsilonTracker",
    "CentralLedger",
    "Ledger",
    "LocalLedger",
    "RoundPrivacy",
    "make_ledger",
    "calibrate_noise_multiplier",
    "check_accountable",
    "with_calibrated_noise",
    "epsilon_after",
    "make_accountant",
    "round_privacy",
    "rounds_within_budget",
]


# --------------------------------------------------------------------------
# Ledgers: what the round loop asks after each round, for every DP mode.


class Ledger:
    """Epsilon bookkeeping of one run (the base class is the no-DP ledger).

    It counts *releases*: every round whose outputs were written. A round
    re-run after a resume is a new release and is counted again.
    """

    neighboring_relation: str | None = None

    def __init__(self):
        self.released = 0

    def preview(self, cohort) -> float:
        """Epsilon (central view) if one more round runs with `cohort`."""
        del cohort
        return math.inf

    def commit(self, cohort) -> dict[str, Any]:
        """Records one more released round with `cohort`; returns its metrics fields."""
        del cohort
        self.released += 1
        return {"epsilon": math.inf, "rounds_accounted": self.released}

    def replay(self, cohort) -> None:
        """Re-records a release from the ledger log (resume); computes no epsilon."""
        del cohort
        self.released += 1

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        """Figures of a planned run of `rounds` rounds (no training)."""
        del rounds, participations
        return {"epsilon": math.inf}

    def prefetch(self) -> None:
        """Starts computing the epsilon of the next release (PLD: in the background)."""

    def close(self) -> None:
        pass


class CentralLedger(Ledger):
    """Central DP: epsilon depends only on the number of released rounds."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.round_privacy = round_privacy(cfg)
        self.neighboring_relation = self.round_privacy.neighboring_relation
        self.tracker = EpsilonTracker(self.round_privacy, cfg.target_delta, cfg.dp.accountant)

    def preview(self, cohort) -> float:
        return self.tracker.epsilon(self.released + 1)

    def commit(self, cohort) -> dict[str, Any]:
        self.released += 1
        return {"epsilon": self.tracker.epsilon(self.released), "rounds_accounted": self.released}

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        return {
            "epsilon": self.tracker.epsilon(rounds),
            "effective_noise_multiplier": self.round_privacy.noise_multiplier,
            "analysis": self.round_privacy.description,
        }

    def prefetch(self) -> None:
        self.tracker.prefetch(self.released + 1)

    def close(self) -> None:
        self.tracker.close()


class LocalLedger(Ledger):
    """Client-level (local) DP: two numbers, both under replace-one.

    * `local_epsilon`: what protects a client against the server, who sees
      each local release and who took part (no amplification by sampling).
      One release: Gaussian with noise multiplier z/2 (L2 sensitivity 2C), or
      Laplace with scale z C on L1 sensitivity 2C, pure epsilon 2/z. Composed
      over the worst client's participations so far, at the run's delta; for
      Laplace the smaller of pure composition (delta 0) and the accountant's.
    * `epsilon` (central view, what the model reveals about one client): the
      model is post-processing of all local releases, so `local_epsilon`
      bounds it (analysis `post_processing`). For Gaussian noise with a fixed
      cohort of m (uniform sampling), the m local noises add up to Gaussian
      noise of std sqrt(m) z C on a sum of replace-one sensitivity 2C:
      `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(sqrt(m) z / 2))`
      per round; the smaller of the two is reported (analysis
      `sampled_sum_gaussian`). Under Poisson sampling the cohort size, and with
      it the total noise, depends on the neighbour, so only the
      post-processing bound is reported.
    """

    neighboring_relation = REPLACE_ONE

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.delta = cfg.target_delta
        dp = cfg.dp
        z = dp.noise_multiplier
        self.mechanism = dp.local_mechanism
        if self.mechanism == "gaussian":
            release = dp_accounting.GaussianDpEvent(z / 2)
        else:
            release = dp_accounting.LaplaceDpEvent(z / 2)
            self.pure_epsilon_per_release = 2.0 / z
        self._release = RoundPrivacy(release, REPLACE_ONE, z, f"local {self.mechanism} release, replace-one")
        acc = make_accountant(dp.accountant, REPLACE_ONE)
        if not acc.supports(release):
            raise ConfigError(
                f"--accountant={dp.accountant}: dp-accounting cannot account a local {self.mechanism} release; "
                "use --accountant=rdp"
            )
        self._local = EpsilonTracker(self._release, self.delta, dp.accountant)
        self._sum: EpsilonTracker | None = None
        if self.mechanism == "gaussian" and cfg.train.client_sampling == "uniform":
            n, m = cfg.task.num_clients, cfg.train.clients_per_round
            summed = RoundPrivacy(
                dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(math.sqrt(m) * z / 2)),
                REPLACE_ONE, math.sqrt(m) * z, "sum of m local Gaussian noises, fixed cohort, replace-one",
            )
            kind = dp.accountant if make_accountant(dp.accountant, REPLACE_ONE).supports(summed.event) else "rdp"
            self._sum = EpsilonTracker(summed, self.delta, kind)
        self._participations: collections.Counter = collections.Counter()
        self.max_participations = 0

    def local_epsilon(self, participations: int) -> float:
        eps = self._local.epsilon(participations)
        if self.mechanism == "laplace":
            eps = min(eps, participations * self.pure_epsilon_per_release)
        return eps

    def _central(self, rounds: int, participations: int) -> tuple[float, str]:
        post = self.local_epsilon(participations)
        if self._sum is not None:
            summed = self._sum.epsilon(rounds)
            if summed < post:
                return summed, "sampled_sum_gaussian"
        return post, "post_processing"

    def _max_after(self, cohort) -> int:
        return max([self.max_participations, *(self._participations[int(c)] + 1 for c in cohort)])

    def preview(self, cohort) -> float:
        return self._central(self.released + 1, self._max_after(cohort))[0]

    def replay(self, cohort) -> None:
        self.max_participations = self._max_after(cohort)
        self._participations.update(int(c) for c in cohort)
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        self.max_participations = self._max_after(cohort)
        self._participations.update(int(c) for c in cohort)
        self.released += 1
        return {**self._fields(self.released, self.max_participations), "rounds_accounted": self.released}

    def _fields(self, rounds: int, participations: int) -> dict[str, Any]:
        eps, analysis = self._central(rounds, participations)
        fields = {
            "epsilon": eps,
            "epsilon_analysis": analysis,
            "local_epsilon": self.local_epsilon(participations),
            "max_participations": participations,
        }
        if self.mechanism == "laplace":
            fields["local_epsilon_per_release"] = self.pure_epsilon_per_release  # pure, delta 0
            fields["local_epsilon_pure"] = participations * self.pure_epsilon_per_release
        return fields

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        p = rounds if participations is None else participations
        fields = self._fields(rounds, p)
        fields["analysis"] = (
            f"local {self.mechanism}, z={self.cfg.dp.noise_multiplier:g}, replace-one, "
            f"{p} participations of the worst client; central view: {fields['epsilon_analysis']}"
        )
        return fields

    def close(self) -> None:
        self._local.close()
        if self._sum is not None:
            self._sum.close()


def make_ledger(cfg: ExperimentConfig) -> Ledger:
    """The ledger for `cfg.dp.mode` (`cfg` after noise calibration)."""
    if cfg.dp.mode == "central":
        return CentralLedger(cfg)
    if cfg.dp.mode == "local":
        return LocalLedger(cfg)
    return Ledger()
