"""Privacy accounting: configuration -> mechanism -> DpEvent -> (epsilon, delta).

The event of one round comes from the run's mechanism (`privacy.registry`),
which also builds the query the process runs, so the number reported is the
number of what runs. This module is the entry point for everything that
needs an epsilon without training (`compute_epsilon`, calibration, the budget
guard, `plan.check`); it imports no TensorFlow. The machinery itself lives in
`privacy.events` (events, accountants, trackers) and `privacy.ledgers`.

Guarantees (client-level DP: neighbouring data sets differ in one client's
whole data) are stated in `privacy.events` (sampling), `privacy.central` and
`privacy.local` (the mechanisms). Epsilon is reported at
`ExperimentConfig.target_delta`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import dp_accounting
from dp_accounting import mechanism_calibration

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import truncation
from dpfl_tff.privacy.events import RoundPrivacy, make_accountant
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.privacy.registry import mechanism_for

if TYPE_CHECKING:
    from dpfl_tff.privacy.mechanism import PrivacyMechanism


def round_privacy(cfg: ExperimentConfig) -> RoundPrivacy | None:
    """The DP event of one round of `cfg`, if its epsilon depends only on the number of rounds (central DP).

    Raises:
      ConfigError: if the adaptive-clipping noise split is impossible.
    """
    return mechanism_for(cfg).round_privacy()


def make_ledger(cfg: ExperimentConfig) -> Ledger:
    """The ledger of `cfg`'s mechanism (`cfg` after noise calibration)."""
    return mechanism_for(cfg).ledger()


def check_accountable(cfg: ExperimentConfig) -> None:
    """Raises ConfigError unless `cfg`'s rounds can be accounted as configured."""
    mechanism_for(cfg).accounting.check_accountable()


def sampler_delta(cfg: ExperimentConfig, noise_multiplier: float | None = None,
                  mechanism: PrivacyMechanism | None = None) -> float:
    """`delta_sampler` of `cfg`'s planned run (the worst client, all --rounds) at `noise_multiplier` (default cfg's).

    `mechanism`: `cfg`'s, if already built (used only at cfg's own noise multiplier).
    """
    if noise_multiplier is not None:
        cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=float(noise_multiplier)))
        mechanism = None
    mechanism = mechanism or mechanism_for(cfg)
    return truncation.delta_sampler(mechanism.accounting.planned_out_of_reach(cfg.train.rounds), cfg.target_delta)


def check_sampler_delta(cfg: ExperimentConfig, mechanism: PrivacyMechanism | None = None) -> None:
    """Refuses a run whose samplers' truncation term would exceed 1% of --target_delta (`privacy.truncation`).

    The term grows with the rounds and shrinks fast with the noise multiplier;
    the message names the smallest noise multiplier that passes. Seeded noise
    (tests only, no privacy) and zero noise (no guarantee: epsilon is
    infinite) are not checked.

    Raises:
      ConfigError: one line naming --noise_multiplier, the term and the smallest z that passes.
    """
    mechanism = mechanism or mechanism_for(cfg)
    z = cfg.dp.noise_multiplier
    if cfg.dp.dp_level == "example":
        return _check_example_sampler_delta(cfg, mechanism)
    if not mechanism.provides_dp or z == 0 or mechanism.noise_seeded:
        return
    limit = truncation.MAX_FRACTION_OF_DELTA * cfg.target_delta
    term = sampler_delta(cfg, mechanism=mechanism)
    if term <= limit:
        return

    def passes(zz: float) -> bool:
        try:
            return sampler_delta(cfg, zz) <= limit
        except ConfigError:  # e.g. an adaptive-clipping split that larger noise makes impossible
            return False

    lo, hi = z, 2 * z
    while not passes(hi) and hi < 2**20:
        lo, hi = hi, 2 * hi
    smallest = ""
    if passes(hi):
        for _ in range(60):  # bisection to a relative 1e-6: `hi` always passes
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if passes(mid) else (mid, hi)
            if hi - lo <= 1e-6 * hi:
                break
        shown = _rounded_up(hi)
        while not passes(shown):  # the printed value must pass, not only the bisection's
            shown = _rounded_up(shown * (1 + 1e-6))
        smallest = f"; the smallest noise multiplier that passes is {shown:.6g}"
    raise ConfigError(
        f"--noise_multiplier={z:g}: the noise sampler's bound adds delta_sampler={term:.3g} after "
        f"{cfg.train.rounds} rounds, above 1% of the delta ({cfg.target_delta:.3g}) "
        f"(docs/privacy.md#floating-point-noise){smallest}"
    )


def _check_example_sampler_delta(cfg: ExperimentConfig, mechanism: PrivacyMechanism) -> None:
    """`check_sampler_delta` for --dp_level=example: the worst client's DP-SGD steps, at --example_noise_multiplier."""
    z = cfg.dp.example_noise_multiplier
    if z == 0 or mechanism.noise_seeded:
        return
    term = truncation.delta_sampler(mechanism.accounting.planned_out_of_reach(cfg.train.rounds), cfg.target_delta)
    if term > truncation.MAX_FRACTION_OF_DELTA * cfg.target_delta:
        raise ConfigError(
            f"--example_noise_multiplier={z:g}: the noise sampler's bound adds delta_sampler={term:.3g} over the "
            f"worst client's DP-SGD steps in {cfg.train.rounds} rounds, above 1% of the delta "
            f"({cfg.target_delta:.3g}) (docs/privacy.md#floating-point-noise); raise --example_noise_multiplier")


def _rounded_up(x: float) -> float:
    """`x` rounded up to 6 significant digits (what `:.6g` then prints exactly)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 5)
    return float(f"{math.ceil(x / unit) * unit:.6g}")


def calibrate_noise_multiplier(cfg: ExperimentConfig, target_epsilon: float,
                               rdp_orders: tuple[float, ...] | None = None) -> float:
    """Smallest noise multiplier z whose epsilon after `cfg.train.rounds` rounds is <= target.

    Uses dp-accounting's `calibrate_dp_mechanism` (Brent's method), which
    returns a value on the safe side of the root: the epsilon of the result
    never exceeds `target_epsilon`. Everything but z is taken from `cfg`
    (sampling, relation, accountant, delta, adaptive split). `rdp_orders`:
    calibrate with RDP at these orders only, whatever `cfg`'s accountant (a
    minimum over fewer orders: a z at or above the run's own; `bands_auto`
    ranks its candidates so, at dp-accounting's integer orders).

    Raises:
      ConfigError: if no z in (0, 2**30] meets the target.
    """
    def event(z: float) -> dp_accounting.DpEvent:
        z_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=float(z)))
        return mechanism_for(z_cfg).accounting.planned_event(cfg.train.rounds)[0]

    relation = mechanism_for(cfg).accounting.planned_event(cfg.train.rounds)[1]

    def solve(kind: str, bracket: mechanism_calibration.BracketInterval) -> float:
        return float(mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(kind, relation, rdp_orders if kind == "rdp" else None), event, target_epsilon,
            cfg.target_delta, bracket,
            tol=1e-5 if kind == "rdp" else 1e-4,  # each PLD evaluation costs seconds
        ))

    try:
        z = solve("rdp", mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0))
        if cfg.dp.accountant == "pld" and rdp_orders is None:
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
    """Epsilon of `cfg`'s planned run at noise `z` with accountant `kind` (the event calibration solves for)."""
    z_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=float(z)))
    event, relation = mechanism_for(z_cfg).accounting.planned_event(cfg.train.rounds)
    acc = make_accountant(kind, relation)
    acc.compose(event)
    return float(acc.get_epsilon(cfg.target_delta))


def with_calibrated_noise(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with `noise_multiplier` calibrated to `dp.target_epsilon` (unchanged if unset)."""
    if cfg.dp.target_epsilon is None:  # the mechanisms that cannot be calibrated refuse it (their check)
        return cfg
    if cfg.dp.dp_level == "example":
        from dpfl_tff.privacy.example_level import calibrate_example_noise

        if not cfg.dp.record_counts:
            raise ConfigError(f"--target_epsilon={cfg.dp.target_epsilon} with --dp_level=example: the calibration "
                              "needs each client's record count (the task's data)")
        z = calibrate_example_noise(cfg, cfg.dp.target_epsilon)
        out = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, example_noise_multiplier=z)).validate()
        check_sampler_delta(out)
        return out
    from dpfl_tff.privacy import bands_auto

    z = calibrate_noise_multiplier(cfg, cfg.dp.target_epsilon)
    out = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_multiplier=z)).validate()
    out = bands_auto.with_run_calibration(out)
    check_sampler_delta(out)
    return out

