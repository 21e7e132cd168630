"""Private hyperparameter selection: the sweep's chosen run covered by one epsilon (Papernot and Steinke 2022).

Why: choosing the best of K runs by a score computed on the clients' data
releases more than one run's epsilon (by composition up to K times it). The
procedure of Papernot and Steinke ("Hyperparameter tuning with Renyi
differential privacy", ICLR 2022, arXiv:2110.03620), `--select=private`:

1. Draw a number of repetitions K from a distribution fixed in advance:
   Poisson(mean) (`--repetitions=poisson`) or the truncated negative
   binomial of shape eta and that mean (`--repetitions=negative_binomial`,
   `--repetitions_shape`: 0 logarithmic, 1 geometric). K and the draws below
   are independent of the data.
2. K times: draw a setting uniformly at random from the grid (with
   replacement), train it as its own DP run (its own seed, --seed + i), and
   compute its private score (`selection_score`): each client of a Poisson
   sample (rate `--score_sampling_rate`) adds its accuracy on its own
   examples (in [0, 1]: sensitivity 1), plus Gaussian noise of std
   `--score_noise_multiplier` (float64, `privacy.sampler`), divided by the
   expected sample size q N.
3. Release the run with the best noisy score: its setting, model and score.

Guarantee (`procedure_privacy`): dp-accounting's RDP of
`RepeatAndSelectDpEvent(candidate, mean, shape)`, where `candidate` is one
repetition's event, training then score (`privacy.events.scored_candidate`).
A repetition draws its setting at random, so its RDP at every order is at
most the largest over the grid's settings (a data-independent mixture): when
one setting's curve is the largest at every order its event is used as is,
otherwise dp-accounting's RepeatAndSelect bound is applied to the pointwise
largest curve. The guarantee covers the released best run only: K, the
other candidates' scores and run folders are the procedure's internal state
(publishing them is covered by `plain_composition_epsilon` instead). With
Poisson K = 0 is possible (probability e^-mean): nothing is trained or
released. The truncated negative binomial is sampled with the gamma that
dp-accounting computes from the mean, and accounted at that gamma's exact
mean (never below `--repetitions_mean`), so the accounted event is the one
sampled.

Resume: the draws (K, the settings, the seeds) are written to
selection_state.json before the first run, and each score is written there
before it is printed; a rerun reads them and never draws again (fresh
draws on resume would make K the maximum of several draws, a distribution
the bound does not cover). A score lost with a killed process was never
released, so computing it again is a first release. A candidate whose run
re-ran rounds after a kill is accounted with all its rounds
(`rounds_accounted`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpfl_tff import config as C
from dpfl_tff.errors import ConfigError
from dpfl_tff.outputs import replaced_atomically
from dpfl_tff.privacy import events, registry, truncation

SELECT_MODES = ("plain", "private", "public")
DISTRIBUTIONS = ("poisson", "negative_binomial")
STATE_FILE, SUMMARY_FILE = "selection_state.json", "selection.json"
PLAIN_LABEL = ("selection: not covered by epsilon. Each row's epsilon is that run's alone; picking the best row "
               "by its test accuracy is covered only by the composition of every run shown (the privacy line "
               "before training prints it); --select=private selects under one epsilon (docs/privacy.md)")


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """The sweep's selection flags (docs/privacy.md#private-hyperparameter-selection)."""

    select: str = "plain"
    repetitions: str = "negative_binomial"
    repetitions_mean: float = 4.0
    repetitions_shape: float = 1.0
    score_noise_multiplier: float = 10.0
    score_sampling_rate: float = 1.0

    def validate(self) -> SelectionConfig:
        """Raises ConfigError naming the flag and its range."""
        if self.select not in SELECT_MODES:
            raise ConfigError(f"--select={self.select}: must be one of {', '.join(SELECT_MODES)}")
        if self.repetitions not in DISTRIBUTIONS:
            raise ConfigError(f"--repetitions={self.repetitions}: must be one of {', '.join(DISTRIBUTIONS)}")
        if not (math.isfinite(self.repetitions_mean) and 1 <= self.repetitions_mean <= 1e4):
            raise ConfigError(f"--repetitions_mean={self.repetitions_mean}: must be in [1, 10000]")
        if not (math.isfinite(self.repetitions_shape) and 0 <= self.repetitions_shape <= 1e3):
            raise ConfigError(f"--repetitions_shape={self.repetitions_shape}: must be in [0, 1000] "
                              "(0 logarithmic, 1 geometric; --repetitions=poisson is the limit of large shapes)")
        if not (math.isfinite(self.score_noise_multiplier) and self.score_noise_multiplier > 0):
            raise ConfigError(f"--score_noise_multiplier={self.score_noise_multiplier}: must be > 0 (the score's "
                              "noise std, in units of its sensitivity 1)")
        if not 0 < self.score_sampling_rate <= 1:
            raise ConfigError(f"--score_sampling_rate={self.score_sampling_rate}: must be in (0, 1]")
        return self

    @property
    def shape(self) -> float:
        """dp-accounting's shape: inf for Poisson."""
        return math.inf if self.repetitions == "poisson" else float(self.repetitions_shape)


# --- the number of repetitions -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CountDistribution:
    """K's law: Poisson(mean) (shape inf) or truncated negative binomial (shape, gamma), support >= 1."""

    shape: float
    gamma: float | None  # None for Poisson
    mean: float  # the exact mean of this law (what the accountant is given)

    def describe(self) -> str:
        if self.gamma is None:
            return f"Poisson with mean {self.mean:.6g} (K = 0 with probability {math.exp(-self.mean):.3g})"
        name = {0.0: "logarithmic", 1.0: "geometric"}.get(self.shape, "truncated negative binomial")
        return f"{name} (shape {self.shape:g}, gamma {self.gamma:.6g}) with mean {self.mean:.6g}"

    def pmf(self, k_max: int) -> np.ndarray:
        """P(K = k) for k = 0 .. k_max (Papernot and Steinke, Definition 1; Poisson's for shape inf)."""
        from scipy import special, stats

        k = np.arange(k_max + 1, dtype=np.float64)
        if self.gamma is None:
            return stats.poisson.pmf(k, self.mean)
        g, eta = self.gamma, self.shape
        out = np.zeros(k_max + 1)
        if g >= 1:  # mean 1: K = 1
            out[1:2] = 1.0
            return out
        i = k[1:]
        if eta == 0:  # logarithmic: (1 - g)^k / (k ln(1/g))
            log_p = i * math.log1p(-g) - np.log(i) - math.log(-math.log(g))
        else:  # (1 - g)^k / (g^-eta - 1) prod_{l<k} (l + eta) / (l + 1)
            log_p = (i * math.log1p(-g) + special.gammaln(i + eta) - special.gammaln(eta) - special.gammaln(i + 1)
                     - math.log(math.expm1(-eta * math.log(g))))
        out[1:] = np.exp(log_p)
        return out

    @functools.cached_property
    def _cdf(self) -> np.ndarray:
        """The CDF over 0 .. k_max, k_max grown until the tail left out is below 1e-15 (float64 rounding)."""
        k_max = 64
        while True:
            cdf = np.cumsum(self.pmf(k_max))
            if cdf[-1] >= 1 - 1e-15 or k_max >= 2**24:
                return cdf
            k_max *= 4

    def sample(self, rng: np.random.Generator) -> int:
        """One K: NumPy's Poisson sampler, or the inverse CDF of `pmf` (float64; the tail beyond the table,
        below 1e-15, is given to its last value)."""
        if self.gamma is None:
            return int(rng.poisson(self.mean))
        cdf = self._cdf
        return int(max(1, min(np.searchsorted(cdf, rng.random(), side="right"), len(cdf) - 1)))


def count_distribution(sel: SelectionConfig) -> CountDistribution:
    """K's law for the flags: the truncated negative binomial's gamma as dp-accounting computes it from the mean.

    dp-accounting's `_gamma_truncated_negative_binomial` returns the gamma on the safe side (a mean at least
    the one asked for, within 1e-9); the law sampled is that gamma's, and its exact mean is what is accounted.
    """
    if sel.shape == math.inf:
        return CountDistribution(math.inf, None, float(sel.repetitions_mean))
    gamma = float(rdp_lib._gamma_truncated_negative_binomial(sel.shape, sel.repetitions_mean))  # noqa: SLF001
    mean = float(rdp_lib._truncated_negative_binomial_mean(gamma, sel.shape))  # noqa: SLF001
    return CountDistribution(sel.shape, gamma, max(mean, float(sel.repetitions_mean)))


# --- accounting --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting's accounted repetition: training event, score event, relation, delta terms."""

    setting: str
    training: dp_accounting.DpEvent
    score: dp_accounting.DpEvent
    relation: str
    training_sampler_delta: float  # the run's delta_sampler (privacy.truncation)

    @property
    def event(self) -> dp_accounting.DpEvent:
        return events.scored_candidate(self.training, self.score)


def candidate_for(setting: str, cfg: C.ExperimentConfig, sel: SelectionConfig, rounds: int | None = None
                  ) -> Candidate:
    """The accounted repetition of `cfg` (N known, noise calibrated) over `rounds` (default --rounds) rounds.

    Raises:
      ConfigError: a setting without DP, or a mode whose epsilon is not one planned event.
    """
    from dpfl_tff.privacy import accounting

    if rounds is not None and rounds != cfg.train.rounds:  # a candidate that re-ran rounds: all of them
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=rounds))
    mechanism = registry.mechanism_for(cfg)
    if not mechanism.provides_dp or cfg.dp.noise_multiplier == 0:
        raise ConfigError(f"--select=private: setting {setting or '(base)'} has no DP guarantee (dp_mode="
                          f"{cfg.dp.mode}, noise_multiplier={cfg.dp.noise_multiplier:g}): every candidate must be a "
                          "DP run; leave noise_multiplier=0 and dp_mode=none out of the grid")
    planned = mechanism.accounting.planned_event(cfg.train.rounds)
    if planned is None:
        raise ConfigError(f"--select=private: --dp_mode={cfg.dp.mode} has no single planned DpEvent to repeat; "
                          "use a central DP mode")
    training, relation = planned
    return Candidate(setting, training,
                     events.score_release(sel.score_noise_multiplier, sel.score_sampling_rate, relation), relation,
                     accounting.sampler_delta(cfg, mechanism=mechanism))


def _rdp(event: dp_accounting.DpEvent, relation: str, orders: Sequence[float]) -> np.ndarray:
    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders), neighboring_relation=events._RELATIONS[relation])  # noqa: SLF001
    acc.compose(event)
    return np.asarray(acc._rdp, dtype=np.float64)  # noqa: SLF001  (the accountant exposes no getter)


def score_out_of_reach(sel: SelectionConfig) -> float:
    """The score sampler's out-of-reach term (shift = sensitivity 1 / std), `privacy.truncation`."""
    return truncation.gaussian_out_of_reach(1.0 / sel.score_noise_multiplier)


def procedure_privacy(candidates: Sequence[Candidate], sel: SelectionConfig, target_delta: float,
                      trained: Sequence[Candidate] = ()) -> dict[str, Any]:
    """The whole procedure's epsilon (RepeatAndSelect, RDP) and its comparisons; see the module docstring.

    Args:
      candidates: one per setting of the grid (what a repetition may draw), and any trained candidate
        accounted with more rounds than planned (a resume that re-ran rounds).
      trained: the candidates trained so far (their plain composition is reported beside).

    Returns:
      `procedure_epsilon`, `delta` (the accountant's plus the samplers' terms, a union bound over the
      expected number of runs), `per_run_epsilon` (the worst setting's training alone, and with its score),
      `plain_composition_epsilon` of the `trained` runs with their scores, the distribution, `dominant_setting`.
    """
    relations = sorted({c.relation for c in candidates})
    if len(relations) > 1:
        raise ConfigError(f"--select=private: the grid's settings are accounted under different relations "
                          f"({', '.join(relations)}); sweep settings of one relation")
    relation = relations[0]
    law = count_distribution(sel)
    orders = rdp_lib.DEFAULT_RDP_ORDERS
    curves = [_rdp(c.event, relation, orders) for c in candidates]
    top = np.max(curves, axis=0)
    dominant = next((i for i, curve in enumerate(curves) if np.all(curve >= top)), None)
    if dominant is not None:  # one setting bounds every other at every order: dp-accounting's event as is
        acc = dp_accounting.rdp.RdpAccountant(orders=list(orders), neighboring_relation=events._RELATIONS[relation])  # noqa: SLF001
        acc.compose(events.repeat_and_select(candidates[dominant].event, law.mean, law.shape))
        eps = float(acc.get_epsilon(target_delta))
    else:
        rdp = rdp_lib._compute_rdp_repeat_and_select(orders, top, law.mean, law.shape)  # noqa: SLF001
        eps = float(rdp_lib.compute_epsilon(orders, rdp, target_delta)[0])
    worst = candidates[dominant] if dominant is not None else max(
        candidates, key=lambda c: _epsilon(c.event, relation, target_delta))
    per_run_sampler = max(c.training_sampler_delta for c in candidates) + score_out_of_reach(sel)
    sampler = truncation.delta_sampler(law.mean * per_run_sampler, target_delta)
    out = {
        "procedure_epsilon": eps,
        "delta": truncation.stated_delta(target_delta, sampler),
        "delta_accountant": target_delta,
        "delta_sampler": sampler,
        "accountant": "rdp",
        "neighboring_relation": relation,
        "per_run_epsilon": max(_epsilon(c.training, relation, target_delta) for c in candidates),
        "per_run_epsilon_with_score": max(_epsilon(c.event, relation, target_delta) for c in candidates),
        "score_epsilon": _epsilon(candidates[0].score, relation, target_delta),
        "worst_setting": worst.setting,
        "dominant_setting": candidates[dominant].setting if dominant is not None else None,
        "repetitions": "poisson" if law.gamma is None else "negative_binomial",
        "repetitions_shape": law.shape if law.gamma is not None else None,
        "repetitions_gamma": law.gamma,
        "repetitions_mean": law.mean,
        "repetitions_mean_requested": sel.repetitions_mean,
        "repetitions_distribution": law.describe(),
        "score_noise_multiplier": sel.score_noise_multiplier,
        "score_sensitivity": 1.0,
        "score_sampling_rate": sel.score_sampling_rate,
    }
    out["plain_composition_epsilon"] = (
        _epsilon(events.composed([c.event for c in trained]), relation, target_delta)
        if trained else 0.0)
    out["runs_composed"] = len(trained)
    return out


def _epsilon(event: dp_accounting.DpEvent, relation: str, delta: float) -> float:
    acc = events.make_accountant("rdp", relation)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def plain_composition(cfgs: Sequence[C.ExperimentConfig]) -> float | None:
    """RDP epsilon of every run of a plain sweep composed (what releasing them all, or picking among them, spends).

    None when a run has no single planned event; inf with a run without DP; runs of different relations or
    deltas: None (no one figure).
    """
    evs, relations, deltas = [], set(), set()
    for cfg in cfgs:
        mechanism = registry.mechanism_for(cfg)
        if not mechanism.provides_dp or cfg.dp.noise_multiplier == 0:
            return math.inf
        planned = mechanism.accounting.planned_event(cfg.train.rounds)
        if planned is None:
            return None
        evs.append(planned[0])
        relations.add(planned[1])
        deltas.add(cfg.target_delta)
    if not evs or len(relations) > 1 or len(deltas) > 1:
        return None
    return _epsilon(events.composed(evs), relations.pop(), deltas.pop())


# --- draws and their state file ----------------------------------------------------------------------------------

def grid_fingerprint(settings: Sequence[str], sel: SelectionConfig, rounds: int) -> str:
    """What the draws depend on: the grid's settings, the distribution's flags, the rounds."""
    text = json.dumps({"settings": list(settings), "repetitions": sel.repetitions, "mean": sel.repetitions_mean,
                       "shape": sel.repetitions_shape, "rounds": rounds})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def draw(settings: Sequence[str], sel: SelectionConfig, first_seed: int, rng: np.random.Generator,
         rounds: int) -> dict[str, Any]:
    """A fresh state: K from `count_distribution(sel)`, then K settings uniformly from `settings`, seeds first_seed+i."""
    k = count_distribution(sel).sample(rng)
    picks = rng.integers(0, len(settings), size=k)
    return {
        "fingerprint": grid_fingerprint(settings, sel, rounds),
        "settings": list(settings),
        "count": int(k),
        "candidates": [{"index": i, "setting": settings[j], "seed": first_seed + i, "score": None}
                       for i, j in enumerate(picks)],
    }


def load_or_draw(folder: str, settings: Sequence[str], sel: SelectionConfig, first_seed: int, rounds: int,
                 rng: np.random.Generator, write: bool = True) -> tuple[dict[str, Any], bool]:
    """(the procedure's state, whether it was drawn now): read from `folder`'s state file, else drawn (and
    written before anything is trained, unless `write` is False: a dry run).

    Raises:
      ConfigError: a state file of another grid or distribution, or a damaged one (a fresh draw would
        change the procedure; use a new --output_dir).
    """
    path = os.path.join(folder, STATE_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            fingerprint = state["fingerprint"]
            int(state["count"]), list(state["candidates"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is damaged ({e}): its draws cannot be recovered and drawing again would "
                              "change the procedure; use a new --output_dir") from e
        if fingerprint != grid_fingerprint(settings, sel, rounds):
            raise ConfigError(f"{path} holds the draws of another grid, --rounds or --repetitions* flags: rerun "
                              "with the same flags to continue it, or use a new --output_dir (drawing again "
                              "would change the procedure)")
        return state, False
    state = draw(settings, sel, first_seed, rng, rounds)
    if write:
        save_state(folder, state)
    return state, True


def save_state(folder: str, state: dict[str, Any]) -> None:
    """Writes the state file atomically (a score is released only once it is in the file)."""
    os.makedirs(folder, exist_ok=True)
    with replaced_atomically(os.path.join(folder, STATE_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def selected(state: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate with the best noisy score (the first of ties); None if K = 0 or a score is missing."""
    cands = state["candidates"]
    if not cands or any(c["score"] is None for c in cands):
        return None
    return max(cands, key=lambda c: (c["score"], -c["index"]))


def markdown(summary: dict[str, Any]) -> str:
    """results.md's selection section for --select=private."""
    p = summary
    lines = ["", "## Private selection (--select=private)", ""]
    best = p.get("selected_run")
    if best:
        acc = p.get("selected_test_accuracy")
        acc_text = "n/a" if acc is None else f"{acc:.4f}"
        lines.append(f"Released: run `{best}` (setting `{p['selected_setting']}`), private score "
                     f"{p['selected_score']:.4f} (noise std {p['score_noise_std']:.3g} in accuracy units), "
                     f"test accuracy {acc_text} (server test set, not covered).")
    elif p["count"] == 0:
        lines.append("K = 0 was drawn: nothing was trained or released.")
    else:
        lines.append(f"Not finished: {p['scored']} of the {p['count']} candidates scored; rerun to continue.")
    lines += [
        "",
        f"- procedure_epsilon {p['procedure_epsilon']:.4g} at delta {p['delta']:.3g} "
        f"({p['neighboring_relation'].replace('_', '-')}, RDP, RepeatAndSelectDpEvent): covers the released run "
        "only; K, the other candidates and their folders are internal.",
        "- the table above lists every candidate: it is the procedure's internal state, not covered by "
        "procedure_epsilon (publish the released run only).",
        f"- per run: epsilon {p['per_run_epsilon']:.4g} (training, worst setting `{p['worst_setting']}`), "
        f"{p['per_run_epsilon_with_score']:.4g} with its score (score alone {p['score_epsilon']:.4g}).",
        f"- plain composition of the {p['runs_composed']} runs trained, with their scores: epsilon "
        f"{p['plain_composition_epsilon']:.4g} (what publishing every candidate would spend).",
        f"- repetitions K: {p['repetitions_distribution']}; drawn K = {p['count']} (internal).",
        f"- score: accuracy of each client of a Poisson sample (rate {p['score_sampling_rate']:g}) on its own "
        f"examples, summed (sensitivity 1), Gaussian noise std {p['score_noise_multiplier']:g}, divided by the "
        "expected sample size.",
    ]
    return "\n".join(lines) + "\n"


def public_markdown(setting: str | None, accuracy: float | None, composition: float | None) -> str:
    """results.md's selection section for --select=public."""
    comp = "" if composition is None else f" {composition:.4g} (RDP)"
    head = ("No finished run has a test accuracy yet." if setting is None else
            f"Selected: setting `{setting}`, mean test accuracy {accuracy:.4f} over its seeds.")
    return ("\n## Public selection (--select=public)\n\n" + head + " Selected on the server's held-out test set, "
            "outside the clients' privacy (the test set is not protected). The selection is post-processing of "
            f"every run, so it is covered by the composition of all runs: epsilon{comp}, not by one row's.\n")
