"""The dp-accounting machinery every mechanism shares: events of a round, accountants, epsilon over rounds.

Pure Python and dp-accounting (no TensorFlow). A mechanism (`privacy.mechanism`)
describes one round as a `RoundPrivacy`: the DpEvent and the neighbouring
relation it holds under; `EpsilonTracker` composes it over rounds.

Sampling (client-level DP: neighbours differ in one client's whole data):

* Poisson sampling (each client joins with probability q = m / N):
  `PoissonSampledDpEvent(q, GaussianDpEvent(z))` under add-or-remove-one; the
  sum's L2 sensitivity is C and the noise std z C.
* A fixed cohort of m drawn without replacement: only replace-one has a sound
  analysis (`SampledWithoutReplacementDpEvent`, Wang, Balle, Kasiviswanathan
  2019, arXiv:1808.00087); replacing one client moves the clipped sum by up to
  2C, so noise std z C is the Gaussian mechanism with multiplier z / 2.

Composition is linear in RDP, so the per-round RDP curve is computed once and
scaled; PLD self-composes the per-round distribution.

A round without noise (z = 0, the audit's noise-free run) has epsilon inf
(`noise_free`): it is decided here, before any accountant sees the event.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpfl_tff.errors import ConfigError

PLD_DISCRETIZATION = 1e-3
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"
# A client's data replaced by a special record (a zero update), its participation unchanged (DP-FTRL).
REPLACE_SPECIAL = "replace_special"
_RELATIONS = {
    ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
    REPLACE_SPECIAL: dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
}


@dataclasses.dataclass(frozen=True)
class RoundPrivacy:
    """The DP event of one training round and the relation it holds under."""

    event: dp_accounting.DpEvent
    neighboring_relation: str  # ADD_OR_REMOVE_ONE or REPLACE_ONE
    noise_multiplier: float  # effective z of what the server adds, in clip units
    description: str


def poisson_gaussian_round(num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
    """One round of a Gaussian sum (multiplier `z`) over a Poisson-sampled cohort, q = m / N, add-or-remove-one."""
    q = clients_per_round / num_clients
    return RoundPrivacy(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
        ADD_OR_REMOVE_ONE,
        z,
        f"Poisson sampling q={q:.6g}, Gaussian z={z:.6g}, add-or-remove-one",
    )


def fixed_cohort_gaussian_round(num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
    """One round of a Gaussian sum over a fixed cohort of m of N drawn without replacement, replace-one (z / 2)."""
    n, m = num_clients, clients_per_round
    return RoundPrivacy(
        dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)),
        REPLACE_ONE,
        z,
        f"fixed cohort {m} of {n} without replacement, Gaussian z/2={z / 2:.6g} "
        "(replace-one sensitivity 2C), replace-one",
    )


def known_cohort_gaussian_round(z: float, relation: str) -> RoundPrivacy:
    """One round's Gaussian release when its cohort is known to the reader: no amplification by sampling.

    Only the rounds a client takes part in depend on its data, so this event is
    composed over the worst client's participations. Add-or-remove-one (a
    Poisson cohort made public): the client's update (sensitivity C) is what is
    protected, Gaussian z. Replace-one (a fixed cohort): sensitivity 2C,
    Gaussian z / 2.
    """
    if relation == ADD_OR_REMOVE_ONE:
        return RoundPrivacy(dp_accounting.GaussianDpEvent(z), ADD_OR_REMOVE_ONE, z,
                            f"Gaussian z={z:.6g}, cohorts known (no sampling), sensitivity C")
    return RoundPrivacy(dp_accounting.GaussianDpEvent(z / 2), REPLACE_ONE, z,
                        f"Gaussian z/2={z / 2:.6g}, cohorts known (no sampling), replace-one sensitivity 2C")


def sampled_gaussian_round(num_clients: int, clients_per_round: int, scheme: str, z: float) -> RoundPrivacy:
    """One round of a Gaussian sum with noise multiplier `z`, amplified by the sampling scheme named `scheme`."""
    from dpfl_tff.sampling import scheme_named

    return scheme_named(scheme).gaussian_round(num_clients, clients_per_round, z)


def unsampled_gaussian_round(scheme: str, z: float) -> RoundPrivacy:
    """One round's Gaussian release, its cohort known (`known_cohort_gaussian_round` at the scheme's relation)."""
    from dpfl_tff.sampling import scheme_named

    return scheme_named(scheme).known_cohort_round(z)


def local_release(mechanism: str, z: float) -> RoundPrivacy:
    """One client's local release: Gaussian with multiplier z / 2, or Laplace of parameter z / 2 (replace-one, 2C)."""
    if mechanism == "gaussian":
        event = dp_accounting.GaussianDpEvent(z / 2)
    else:
        event = dp_accounting.LaplaceDpEvent(z / 2)
    return RoundPrivacy(event, REPLACE_ONE, z, f"local {mechanism} release, replace-one")


def summed_local_gaussian_round(num_clients: int, clients_per_round: int, z: float,
                                cohort_known: bool) -> RoundPrivacy:
    """The server's sum of m local Gaussian noises (std sqrt(m) z C, replace-one sensitivity 2C), fixed cohort."""
    n, m = num_clients, clients_per_round
    gaussian = dp_accounting.GaussianDpEvent(math.sqrt(m) * z / 2)
    if cohort_known:
        return RoundPrivacy(gaussian, REPLACE_ONE, math.sqrt(m) * z,
                            "sum of m local Gaussian noises, cohorts known, replace-one")
    return RoundPrivacy(dp_accounting.SampledWithoutReplacementDpEvent(n, m, gaussian), REPLACE_ONE,
                        math.sqrt(m) * z, "sum of m local Gaussian noises, fixed cohort, replace-one")


def banded_participation(num_clients: int, clients_per_round: int, bands: int, z: float) -> RoundPrivacy:
    """Banded MF: one of a client's participations, Poisson sampled at q = m B / N in its group's rounds.

    Each client is in one secret group of B; round t samples the clients of group t mod B with probability
    q, so a client is eligible once every B rounds, and with ||c|| = 1 its contribution to C x has L2 norm
    <= C_clip (`privacy.banded_strategy`). Choquette-Choo et al. 2023 (arXiv:2306.08153, Theorem 4;
    jax_privacy's `amplified_bandmf_event`): the run is this event composed over the eligible rounds.
    """
    q = clients_per_round * bands / num_clients
    return RoundPrivacy(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
        ADD_OR_REMOVE_ONE,
        z,
        f"banded MF, {bands} band(s), Poisson sampling q={q:.6g} "
        + ("every round" if bands == 1 else f"once every {bands} rounds (a client's group's)")
        + f", Gaussian z={z:.6g}, add-or-remove-one",
    )


def banded_compositions(stream_rounds: list[int], bands: int) -> int:
    """Participations a client may have over noise streams of `stream_rounds` rounds: sum of ceil(n / B).

    A resume starts a fresh stream with a fresh secret grouping (`privacy.bandmf`); the streams' releases
    are composed, each stream's being the amplified banded-MF mechanism over its own rounds.
    """
    return sum(-(-int(n) // int(bands)) for n in stream_rounds if n > 0)


def bandmf_event(rp: RoundPrivacy, stream_rounds: list[int], bands: int) -> dp_accounting.DpEvent:
    """The run of banded MF: `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), sum ceil(n/B))`."""
    return dp_accounting.SelfComposedDpEvent(rp.event, banded_compositions(stream_rounds, bands))


def tree_event(noise_multiplier: float, tree_steps: list[int]) -> dp_accounting.DpEvent:
    """DP-FTRL: one `SingleEpochTreeAggregationDpEvent` per tree, composed (trees of 0 steps left out)."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, int(steps))
        for steps in tree_steps if steps > 0
    ])


def blt_event(noise_multiplier: float, sensitivities: list[float]) -> dp_accounting.DpEvent:
    """BLT-DP-FTRL's run (`privacy.blt`): one Gaussian of multiplier z / sqrt(sum of the streams' squared
    sensitivities); no noise stream released yet: nothing."""
    s2 = sum(s * s for s in sensitivities)
    if s2 == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(s2))


def self_composed(rp: RoundPrivacy, rounds: int) -> tuple[dp_accounting.DpEvent, str]:
    """(`rounds` compositions of one round's event, its neighbouring relation): a planned run's event."""
    return dp_accounting.SelfComposedDpEvent(rp.event, rounds), rp.neighboring_relation


def check_supported(accountant: str, rp: RoundPrivacy) -> dp_accounting.PrivacyAccountant:
    """An empty accountant of kind `accountant` for `rp`'s relation, after checking it can take `rp`'s event.

    Raises:
      ConfigError: one line naming --accountant and what it cannot account.
    """
    acc = make_accountant(accountant, rp.neighboring_relation)
    if not acc.supports(rp.event):
        raise ConfigError(
            f"--accountant={accountant}: dp-accounting cannot account {rp.description}; use --accountant=rdp"
        )
    return acc


def noise_free(event: dp_accounting.DpEvent) -> bool:
    """Whether `event` contains a noiseless release (a Gaussian or Laplace event with parameter 0) that happens.

    Such an event has epsilon inf at any delta below the probability that the
    client's noiseless release happens (the sampling probability q = m/N, or
    m/N for a fixed cohort of m); inf is an upper bound at every delta, and the
    default delta 1/N^1.1 is below 1/N <= q. Decided before an accountant sees
    the event: dp-accounting's RDP of a sampled-without-replacement Gaussian
    with z = 0 divides by zero, and `EpsilonTracker`'s self-composed PLD would
    drop the PLD accountant's own "non-DP event" flag (epsilon 0 instead of
    inf). A release sampled with probability 0, or composed 0 times, does not
    happen.
    """
    if isinstance(event, (dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent)):
        return event.noise_multiplier == 0
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return event.sampling_probability > 0 and noise_free(event.event)
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        return event.sample_size > 0 and noise_free(event.event)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return event.count > 0 and noise_free(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(noise_free(e) for e in event.events)
    return False


@functools.lru_cache(maxsize=8192)
def _subsampled_gaussian_rdp(without_replacement: bool, q: float, sigma: float, orders: tuple[float, ...]) -> Any:
    """dp-accounting's RDP curve of one Poisson-sampled (or sampled-without-replacement) Gaussian, read-only."""
    compute = (rdp_lib._compute_rdp_sample_wor_gaussian if without_replacement  # noqa: SLF001
               else rdp_lib._compute_rdp_poisson_subsampled_gaussian)  # noqa: SLF001
    curve = np.asarray(compute(q=q, noise_multiplier=sigma, orders=np.array(orders)), dtype=np.float64)
    curve.setflags(write=False)
    return curve


class CachedRdpAccountant(dp_accounting.rdp.RdpAccountant):
    """dp-accounting's RDP accountant, each (sub)sampled Gaussian's curve computed once per process.

    The same numbers: a Gaussian, Poisson-sampled or sampled-without-replacement
    event adds `count` times the curve dp-accounting's own function gives for
    its (q, z) at these orders, as `RdpAccountant` does, but that curve is
    memoized (`_subsampled_gaussian_rdp`). Without replacement at q ~ 0.5 one
    curve costs ~1.5 s; a run's tracker, its calibration, a resume, a dry run
    and a sweep's seeds ask for the same (q, z) again. Support checks and every
    other event go to dp-accounting unchanged.
    """

    def _maybe_compose(self, event, count, do_compose):
        kinds = (dp_accounting.GaussianDpEvent, dp_accounting.PoissonSampledDpEvent,
                 dp_accounting.SampledWithoutReplacementDpEvent)
        if not do_compose or not isinstance(event, kinds):
            return super()._maybe_compose(event, count, do_compose)
        error = super()._maybe_compose(event, count, False)  # dp-accounting's own checks of the event
        if error is not None:
            return error
        if isinstance(event, dp_accounting.GaussianDpEvent):
            key = (False, 1.0, event.noise_multiplier)
        elif isinstance(event, dp_accounting.PoissonSampledDpEvent):
            sigma = rdp_lib._effective_gaussian_noise_multiplier(event.event)  # noqa: SLF001
            key = (False, event.sampling_probability, sigma)
        else:
            key = (True, event.sample_size / event.source_dataset_size,
                   rdp_lib._effective_gaussian_noise_multiplier(event.event))  # noqa: SLF001
        self._rdp += count * _subsampled_gaussian_rdp(*key, tuple(float(o) for o in self._orders))
        return None


def integer_orders() -> tuple[float, ...]:
    """The integer orders among dp-accounting's default RDP orders: their RDP is a finite sum, ~15x faster to
    compute than the fractional orders' series at large q; an epsilon over them is never below the default's."""
    return tuple(o for o in dp_accounting.rdp.RdpAccountant().orders if float(o).is_integer())


def make_accountant(kind: str, relation: str, orders: Sequence[float] | None = None) -> dp_accounting.PrivacyAccountant:
    """An empty RDP or PLD accountant for `relation` (`orders`: RDP's orders, None for dp-accounting's default)."""
    rel = _RELATIONS[relation]
    if kind == "rdp":
        if orders is not None:
            return CachedRdpAccountant(orders=list(orders), neighboring_relation=rel)
        return CachedRdpAccountant(neighboring_relation=rel)
    if kind == "pld":
        # Pessimistic discretisation keeps PLD an upper bound at any interval; 1e-3 (dp-accounting's
        # default is 1e-4) moves epsilon by ~2e-5 relative and makes each epsilon ~10x cheaper.
        return pld.PLDAccountant(neighboring_relation=rel, value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"--accountant={kind}: must be one of rdp, pld")


def epsilon_after(rp: RoundPrivacy, rounds: int, delta: float, accountant: str) -> float:
    """Epsilon of `rounds` composed rounds at `delta` (inf without noise, `noise_free`).

    Raises:
      ConfigError: if the accountant cannot take the round's event.
    """
    if rounds == 0:
        return 0.0
    acc = check_supported(accountant, rp)
    if noise_free(rp.event):
        return math.inf
    acc.compose(rp.event, rounds)
    return float(acc.get_epsilon(delta))


class EpsilonTracker:
    """Epsilon after each round, computed incrementally.

    RDP: the per-round RDP curve is computed once; after t rounds it is t
    times that curve (RDP composes additively), converted at `delta`
    (microseconds). PLD: the per-round privacy loss distribution is built once
    and self-composed t times (tens of milliseconds); `prefetch(t)` starts that
    in a background thread so that it overlaps with round t's training.
    A round without noise (`noise_free`) gives inf after any round, with no
    accountant composition at all.
    """

    def __init__(self, rp: RoundPrivacy, delta: float, accountant: str):
        self.round_privacy = rp
        self.delta = delta
        self.accountant = accountant
        acc = check_supported(accountant, rp)
        self.noise_free = noise_free(rp.event)
        if not self.noise_free:
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
        if self.noise_free:
            return math.inf
        if self.accountant == "rdp":
            eps, _ = rdp_lib.compute_epsilon(self._orders, self._rdp_one * rounds, self.delta)
            return float(eps)
        return float(self._pld_one.self_compose(rounds).get_epsilon_for_delta(self.delta))

    def prefetch(self, rounds: int) -> None:
        """Starts computing `epsilon(rounds)` in the background (PLD only; RDP is instant)."""
        if self.accountant == "rdp" or self.noise_free or rounds in self._cache or rounds in self._pending:
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


def score_release(noise_multiplier: float, sampling_rate: float, relation: str) -> dp_accounting.DpEvent:
    """A candidate's private score (`selection`): a sum of per-client values in [0, 1] plus Gaussian noise.

    Each client adds one value in [0, 1] (its accuracy on its own examples), so the sum's sensitivity is 1
    under add-or-remove-one, replace-one and replace-special alike, and noise of std `noise_multiplier` is
    `GaussianDpEvent(noise_multiplier)`. Clients taken by Poisson sampling with probability `sampling_rate`
    < 1 (add-or-remove-one only: dp-accounting has no Poisson analysis under replace-one) give
    `PoissonSampledDpEvent(sampling_rate, ...)`.

    Raises:
      ConfigError: Poisson sampling of the score under a replace relation.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1:
        return gaussian
    if relation != ADD_OR_REMOVE_ONE:
        raise ConfigError(f"--score_sampling_rate={sampling_rate:g}: must be 1 for runs accounted under "
                          f"{relation.replace('_', '-')} (Poisson sampling of the score has an analysis under "
                          "add-or-remove-one only: --client_sampling=poisson)")
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def composed(parts: list[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    """The events of several releases composed (`selection`: the trained candidates of a sweep, its runs)."""
    return dp_accounting.ComposedDpEvent(list(parts))


def scored_candidate(training: dp_accounting.DpEvent, score: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """One candidate of a private selection: its DP training run, then its private score (composed)."""
    return dp_accounting.ComposedDpEvent([training, score])


def repeat_and_select(candidate: dp_accounting.DpEvent, mean: float, shape: float) -> dp_accounting.DpEvent:
    """Papernot and Steinke (ICLR 2022, arXiv:2110.03620): run `candidate` K times, K random, release the best.

    K is Poisson(mean) for shape = inf, else truncated negative binomial of that shape (0: logarithmic,
    1: geometric) and that mean. Only the best run's output (by its private score) is released, and K is
    kept secret; dp-accounting's RDP accountant (Theorems 2 and 6) bounds the whole procedure.
    """
    return dp_accounting.dp_event.RepeatAndSelectDpEvent(candidate, mean, shape)


def example_level_client_event(num_records: int, expected_batch: float, z: float,
                               steps: int) -> dp_accounting.DpEvent:
    """One client's record-level event: `steps` DP-SGD steps, each Poisson-sampled at q = b / n, Gaussian z.

    Add-or-remove-one record of the client's `num_records` records; the
    per-step sum of clipped gradients has L2 sensitivity C and noise std z C.
    No amplification by client sampling is claimed (every participation counts).
    """
    return dp_accounting.SelfComposedDpEvent(example_level_step_event(min(1.0, expected_batch / num_records), z), steps)


def example_level_step_event(q: float, z: float) -> dp_accounting.DpEvent:
    """One DP-SGD step of a client at record level: a Poisson(q) batch's clipped sum plus Gaussian noise z C."""
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


def example_level_epsilons(num_records: list[int], participations: list[int], expected_batch: float,
                           z: float, steps_per_round: list[int], delta: float, accountant: str) -> list[float]:
    """Each client's record-level epsilon at `delta` after `participations[i]` rounds of `steps_per_round[i]` steps.

    The run's record-level guarantee is the maximum of the list.
    """
    out = []
    for n, rounds, steps in zip(num_records, participations, steps_per_round):
        if rounds == 0 or steps == 0:
            out.append(0.0)
            continue
        if z == 0:
            out.append(math.inf)
            continue
        acc = make_accountant(accountant, ADD_OR_REMOVE_ONE)
        acc.compose(example_level_client_event(n, expected_batch, z, steps), rounds)
        out.append(float(acc.get_epsilon(delta)))
    return out
