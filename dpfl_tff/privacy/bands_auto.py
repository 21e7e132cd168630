"""`--bands=auto`: banded MF's number of bands B, chosen for the smallest expected error at the target epsilon.

Choquette-Choo et al. (NeurIPS 2023, arXiv:2306.08153, Section 5) choose the
bands by the expected error at the privacy budget: more bands correlate the
noise over more rounds (a smaller strategy loss) but sample each client less
often from a smaller pool (q = m B / N, ceil(T / B) participations), so the
noise multiplier that reaches the same epsilon grows. This module makes the
same trade for the run's own T, N, m, delta and accountant:

* feasible B: 1 <= B <= min(T, floor(N' / m), MAX_AUTO_BANDS) (q <= 1, N' =
  N + canaries as the sampler's), and, when the model's size is known (a run;
  not `compute_epsilon`), the B - 1 float64 noise buffers within
  `bandmf.MAX_BUFFER_SHARE` of the machine's memory (the limit a banded run
  refuses beyond);
* for each, z_B = the noise multiplier calibrated to --target_epsilon on the
  banded event with B bands (`accounting.calibrate_noise_multiplier`) with
  RDP at dp-accounting's integer orders (`events.integer_orders`: ~15x
  faster than all the default orders at q ~ 0.5; a minimum over fewer
  orders, so z_B is at or a little above the run's own, 0.1% on
  configs/digits_bandmf.cfg) and the B-banded strategy of
  `banded_strategy.optimize_banded(T, B)` (cached);
* expected error(B) = z_B^2 ||A C_B^-1||_F^2 / T: the mean over the T rounds
  of the expected squared error of the noise on the prefix sums, per
  coordinate, in units of clip_norm^2 (A: lower-triangular ones);
* the chosen B minimizes it (a tie: the smaller B); the run then calibrates
  its z with its own accountant (as for an integer --bands), and that z
  replaces the chosen candidate's z and error (`with_run_calibration`; both
  only lower, so it stays the minimum).

It needs --target_epsilon: at a fixed --noise_multiplier every B reaches a
different epsilon, so the errors would not compare like with like
(`bandmf.BandedMatrixFactorization.check` refuses that). Pure Python, NumPy,
SciPy and dp-accounting: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from dpfl_tff import config as C
from dpfl_tff.errors import ConfigError

# Largest B tried: each B costs one integer-order RDP calibration (0.1-1 s), the chosen B one more with the
# run's accountant.
MAX_AUTO_BANDS = 32


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One feasible B: its calibrated noise multiplier, strategy loss and expected error z^2 * loss."""

    bands: int
    noise_multiplier: float
    loss: float  # ||A C_B^-1||_F^2 / T (`banded_strategy.BandedStrategy.loss`)
    error: float  # noise_multiplier^2 * loss


def buffer_bytes(bands: int, model_parameters: int) -> int:
    """Bytes of banded MF's noise buffers: B - 1 float64 copies of the model."""
    return (int(bands) - 1) * int(model_parameters) * 8


def memory_bytes() -> int | None:
    """The machine's physical memory in bytes (None if the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def buffers_fit(bands: int, model_parameters: int | None) -> bool:
    """Whether B's buffers fit (`bandmf`'s limit); True when the model's size or the memory is unknown."""
    from dpfl_tff.privacy.bandmf import MAX_BUFFER_SHARE

    total = memory_bytes()
    if model_parameters is None or total is None:
        return True
    return buffer_bytes(bands, model_parameters) <= MAX_BUFFER_SHARE * total


def feasible_bands(cfg: C.ExperimentConfig, model_parameters: int | None = None) -> list[int]:
    """The B's `--bands=auto` chooses from (see the module docstring); `cfg` with N known."""
    top = min(cfg.train.rounds, cfg.population // cfg.train.clients_per_round, MAX_AUTO_BANDS)
    return [b for b in range(1, top + 1) if buffers_fit(b, model_parameters)]


def _accounting_key(cfg: C.ExperimentConfig, bands: int) -> C.ExperimentConfig:
    """`cfg` at B = `bands` with what the calibration does not read set to defaults (one cache entry per sweep)."""
    train = cfg.train  # the accountant reads the rounds, the cohort and the sampling; the rest set to defaults
    return dataclasses.replace(
        cfg, output_dir=C.ExperimentConfig.output_dir,
        train=dataclasses.replace(C.TrainConfig(), rounds=train.rounds, clients_per_round=train.clients_per_round,
                                  client_sampling=train.client_sampling),
        task=dataclasses.replace(C.TaskConfig(), num_clients=cfg.task.num_clients,
                                 num_clients_known=cfg.task.num_clients_known),
        dp=dataclasses.replace(cfg.dp, bands=int(bands), bands_auto=None, noise_multiplier=1.0,
                               clip_norm=cfg.dp.clip_norm if cfg.dp.adaptive_clipping else C.DPConfig.clip_norm),
    )


@functools.lru_cache(maxsize=256)
def _candidate(key: C.ExperimentConfig) -> Candidate:
    """B = key.dp.bands's candidate, its z calibrated by RDP at integer orders."""
    from dpfl_tff.privacy import accounting, banded_strategy, events

    z = accounting.calibrate_noise_multiplier(key, key.dp.target_epsilon, rdp_orders=events.integer_orders())
    loss = banded_strategy.optimize_banded(key.train.rounds, key.dp.bands).loss
    return Candidate(key.dp.bands, z, loss, z * z * loss)


def candidates(cfg: C.ExperimentConfig, model_parameters: int | None = None) -> tuple[Candidate, ...]:
    """Every feasible B's z (integer-order RDP), loss and expected error (cached by the accounting's inputs).

    Raises:
      ConfigError: no B is feasible, or no B's noise reaches --target_epsilon.
    """
    if cfg.dp.target_epsilon is None:
        raise ConfigError(f"--bands={C.BANDS_AUTO}: needs --target_epsilon")
    bands = feasible_bands(cfg, model_parameters)
    if not bands:
        raise ConfigError(f"--bands={C.BANDS_AUTO}: no B is feasible (even B=1's noise buffers do not fit)")
    out, failures = [], []
    for b in bands:
        try:
            out.append(_candidate(_accounting_key(cfg, b)))
        except ConfigError as e:
            failures.append(f"B={b}: {e}")
    if not out:
        raise ConfigError(f"--bands={C.BANDS_AUTO}: no B reaches --target_epsilon={cfg.dp.target_epsilon:g} "
                          f"({failures[0]})")
    return tuple(out)


def best(found: tuple[Candidate, ...]) -> Candidate:
    """The candidate of the smallest expected error (a tie: the smaller B)."""
    return min(found, key=lambda c: (c.error, c.bands))


def resolved(cfg: C.ExperimentConfig, model_parameters: int | None = None) -> C.ExperimentConfig:
    """`cfg` with --bands=auto replaced by the chosen B and `dp.bands_auto` holding every candidate.

    `cfg` unchanged if --bands is an integer. N must be known.
    """
    if cfg.dp.bands != C.BANDS_AUTO:
        return cfg
    found = candidates(cfg, model_parameters)
    chosen = best(found)
    return dataclasses.replace(cfg, dp=dataclasses.replace(
        cfg.dp, bands=chosen.bands,
        bands_auto=tuple((c.bands, c.noise_multiplier, c.loss, c.error) for c in found)))


def with_run_calibration(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """A resolved auto `cfg` whose noise multiplier the run calibrated: the chosen candidate takes that z.

    `cfg` unchanged unless --bands was auto. The candidates were ranked by z at integer orders; the run's z
    (its own accountant, more orders or PLD) is at most that, so the chosen B's error only falls.
    """
    if cfg.dp.bands_auto is None:
        return cfg
    z = cfg.dp.noise_multiplier
    entries = tuple((b, z, loss, z * z * loss) if b == cfg.dp.bands else (b, zb, loss, e)
                    for b, zb, loss, e in cfg.dp.bands_auto)
    return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, bands_auto=entries))


def choice_text(cfg: C.ExperimentConfig) -> str | None:
    """`bands: auto -> B=4 (expected error 162 vs 203 for B=1, 169 for B=10)` for a resolved auto run, else None."""
    if cfg.dp.bands_auto is None:
        return None
    errors = {b: e for b, _, _, e in cfg.dp.bands_auto}
    chosen = cfg.dp.bands
    others = [b for b in (min(errors), max(errors)) if b != chosen]
    vs = " and ".join(dict.fromkeys(f"{errors[b]:.4g} for B={b}" for b in others))
    return (f"bands: {C.BANDS_AUTO} -> B={chosen} (expected prefix-sum error z^2*loss {errors[chosen]:.4g}"
            + (f" vs {vs}" if vs else "") + f"; {len(errors)} feasible B tried, each calibrated to "
            f"--target_epsilon={cfg.dp.target_epsilon:g} by RDP at integer orders, B={chosen} by the run's accountant)")


def summary_fields(cfg: C.ExperimentConfig) -> dict:
    """summary.json's fields of a resolved auto run: the chosen B and every B's z, loss and error ({} otherwise)."""
    if cfg.dp.bands_auto is None:
        return {}
    return {"bands_requested": C.BANDS_AUTO, "bands_chosen": cfg.dp.bands,
            "bands_auto_candidates": [{"bands": b, "noise_multiplier": z, "strategy_loss": loss,
                                       "expected_error": e} for b, z, loss, e in cfg.dp.bands_auto]}
