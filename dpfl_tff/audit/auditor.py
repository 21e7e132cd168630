"""The canary audit of a run: cosines of the model deltas with the canaries, the estimates, audit.json.

`CanaryAuditor` is a round-loop observer (`observers.Observer`). It holds the
directions of the K inserted canaries (indices 0..K-1, clients N..N+K-1) and
of K held-out ones (K..2K-1, never inserted), and measures, for each:

* final model: cos(direction, w_0 - w_T), w_0 the initial and w_T the final
  trainable weights (the sign of a client's update: `initial - trained`);
  the null is N(0, 1/d) (the exact mean and variance of the cosine of a random
  direction, Gaussian in shape for d >= 1000; below, the held-out canaries'
  fit is the null);
* all iterates: max over rounds t of cos(direction, w_{t-1} - w_t), for the
  inserted and the held-out canaries (the null is the held-out fit: the
  maximum has no closed form). Kept only while the directions fit in memory
  (2K d <= MAX_KEPT_FLOATS). It survives a resume from a checkpoint whose round
  the auditor's state was saved with (`checkpoints/canaries.json`, written at
  every checkpoint); otherwise it is reported as unavailable, never made up.

Each part reports the point estimate (`epsilon`, two fitted Gaussians: not a
bound, biased upward at finite K) and a lower confidence bound
(`epsilon_lower_bound` at `lower_bound_confidence`, 95%: the threshold test of
`estimate.lower_bound`, inserted against held-out canaries). Only the lower
bound may be compared with the run's epsilon.

The secret canary seed lives in `checkpoints/canaries.json` (with the running
maxima), not in any released file: whoever knows it knows the canaries. The
released audit.json holds cosines only: post-processing of the released
models, covered by the run's epsilon (canaries are clients like any other).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from dpfl_tff import observers
from dpfl_tff.audit import canaries, estimate
from dpfl_tff.config import ExperimentConfig

AUDIT_JSON = "audit.json"
AUDIT_PNG = "audit.png"
SECRET_FILE = "canaries.json"  # inside checkpoints/
MAX_KEPT_FLOATS = 25_000_000  # directions kept in memory for the per-round cosines (100 MB of float32)


def load_or_create_seed(ckpt_dir: str) -> tuple[int, bool]:
    """(the run's secret canary seed, whether it was created now): read from `ckpt_dir/canaries.json`, or drawn
    and written there before the first round."""
    path = os.path.join(ckpt_dir, SECRET_FILE)
    saved = _read(path)
    if saved is not None:
        return int(saved["seed"]), False
    seed = canaries.new_seed()
    _write(path, {"seed": seed, "round": None})
    return seed, True


def run_seed(cfg: ExperimentConfig, ckpt_dir: str, releases: int, log: Callable[[str], None]) -> tuple[int | None, bool]:
    """(the canary seed of `cfg`'s run or None without canaries, whether it was lost).

    Lost: the run has released rounds (`releases` in its ledger) but no seed
    file, so the earlier rounds' canaries are unknown (the audit is then not
    computed; the run itself goes on).
    """
    if not cfg.canary_clients:
        return None, False
    seed, created = load_or_create_seed(ckpt_dir)
    lost = bool(created and releases)
    if lost:
        log(f"WARNING: the canary seed of this run is missing ({SECRET_FILE} in {ckpt_dir}): the audit of the "
            "resumed run is not computed (the earlier rounds' canaries are unknown)")
    return seed, lost


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
        return out if isinstance(out, dict) and "seed" in out else None
    except (OSError, ValueError):
        return None


def _write(path: str, obj: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat(trainable) -> np.ndarray:
    return np.concatenate([np.asarray(t, np.float64).ravel() for t in trainable])


def cosines(unit_rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """cos(row, vector) for unit rows; zeros if the vector is 0."""
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        return np.zeros(len(unit_rows))
    return unit_rows.astype(np.float64) @ vector / norm


class CanaryAuditor(observers.Observer):
    """Measures the canaries' cosines every round and the estimates after the last (see the module docstring)."""

    def __init__(self, k: int, seed: int, initial_trainable, delta: float, ckpt_dir: str, checkpoint_every: int,
                 lost_seed: bool = False):
        """`lost_seed`: a resumed run whose seed file was missing, so earlier rounds' canaries are unknown."""
        self.k, self.seed, self.delta, self.lost_seed = k, seed, delta, lost_seed
        self.shapes = [tuple(np.shape(t)) for t in initial_trainable]
        self.dim = int(sum(np.prod(s) for s in self.shapes))
        self.path, self.every = os.path.join(ckpt_dir, SECRET_FILE), checkpoint_every
        self.w0 = _flat(initial_trainable)
        self.prev = self.w0
        kept = 2 * k * self.dim <= MAX_KEPT_FLOATS
        self.dirs = canaries.directions(seed, range(2 * k), self.shapes) if kept else None
        self.max_cos = np.full(2 * k, -np.inf) if kept else None
        self.all_rounds_note = None if kept else f"not computed: {2 * k} directions of d={self.dim} exceed memory cap"
        self.results: dict[str, Any] | None = None

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, seed: int, initial_trainable, ckpt_dir: str,
                lost_seed: bool) -> CanaryAuditor:
        return cls(cfg.canary_clients, seed, initial_trainable, cfg.target_delta, ckpt_dir,
                   cfg.train.checkpoint_every, lost_seed)

    def on_resume(self, done: int, trainable) -> None:
        """After `training` restored round `done`: the running maxima if saved with that round, else none."""
        self.prev = _flat(trainable)
        if done == 0 or self.max_cos is None:
            return
        saved = _read(self.path) or {}
        if saved.get("round") == done and len(saved.get("max_cosines") or []) == 2 * self.k:
            self.max_cos = np.asarray(saved["max_cosines"], np.float64)
        else:
            self.max_cos = None
            self.all_rounds_note = f"not computed: resumed from round {done}, whose per-round maxima were not saved"

    def on_round(self, record, state, last, stopping):
        w = _flat(state.global_model_weights.trainable)
        if self.max_cos is not None:
            self.max_cos = np.maximum(self.max_cos, cosines(self.dirs, self.prev - w))
        self.prev = w
        r = record["round"]
        if last or stopping or (self.every and r % self.every == 0):  # as observers.Checkpointer
            saved = _read(self.path) or {"seed": self.seed}
            saved.update(round=r, max_cosines=None if self.max_cos is None else self.max_cos.tolist())
            _write(self.path, saved)
        if last:
            # The stated delta of the run (the accountant's plus the noise sampler's term), which the epsilon
            # bound holds at: the figures are computed at it (a larger delta, a smaller lower bound).
            self.delta = float(record.get("delta", self.delta))
            self.results = self._finish(self.w0 - w)

    def _final_cosines(self, delta_w: np.ndarray) -> np.ndarray:
        if self.dirs is not None:
            return cosines(self.dirs, delta_w)
        return np.concatenate([cosines(canaries.directions(self.seed, [i], self.shapes), delta_w)
                               for i in range(2 * self.k)])

    def _finish(self, delta_w: np.ndarray) -> dict[str, Any]:
        """The estimates and the samples they come from (audit.json)."""
        k = self.k
        if self.lost_seed:
            return {"canary_clients": k, "delta": self.delta, "final_model": None, "all_rounds": None,
                    "all_rounds_note": f"not computed: {SECRET_FILE} (the canary seed) was missing when the run "
                                       "resumed, so the canaries of the earlier rounds are unknown"}
        final = self._final_cosines(delta_w)
        analytic = estimate.cosine_null(self.dim) if self.dim >= 1000 else None
        out: dict[str, Any] = {
            "canary_clients": k, "held_out_canaries": k, "model_dimension": self.dim, "delta": self.delta,
            "final_model": {
                **estimate.estimate(final[:k], self.delta, null=analytic, held_out=final[k:]),
                "held_out_null_epsilon": estimate.epsilon_two_gaussians(
                    estimate.fit(final[k:]), estimate.fit(final[:k]), self.delta),
                "inserted_cosines": final[:k].tolist(), "held_out_cosines": final[k:].tolist(),
            },
            "all_rounds": None, "all_rounds_note": self.all_rounds_note,
        }
        if self.max_cos is not None:
            out["all_rounds"] = {
                **estimate.estimate(self.max_cos[:k], self.delta, held_out=self.max_cos[k:]),
                "inserted_max_cosines": self.max_cos[:k].tolist(), "held_out_max_cosines": self.max_cos[k:].tolist(),
            }
        return out

    def on_end(self, summary: dict[str, Any], out) -> None:
        """The estimates into the summary, the samples into audit.json (nothing if the last round did not run)."""
        if self.results is not None:
            summary.update(self.summary_fields())
            out.write_json(AUDIT_JSON, self.results)

    def write_plots(self, out) -> list[str]:
        if (self.results or {}).get("final_model") is None:
            return []
        plot(self.results, out.file(AUDIT_PNG))
        return [AUDIT_PNG]

    def summary_fields(self) -> dict[str, Any]:
        r = self.results
        if r is None or r["final_model"] is None:
            return {}
        all_rounds = r["all_rounds"] or {}
        return {"empirical_epsilon": r["final_model"]["epsilon"],
                "empirical_epsilon_all_rounds": all_rounds.get("epsilon"),
                "empirical_epsilon_no_signal_level": r["final_model"]["no_signal_level_95"],
                "empirical_epsilon_lower_bound": r["final_model"]["epsilon_lower_bound"],
                "empirical_epsilon_lower_bound_all_rounds": all_rounds.get("epsilon_lower_bound"),
                "empirical_epsilon_lower_bound_confidence": r["final_model"]["lower_bound_confidence"]}


def plot(audit: dict[str, Any], path: str) -> str:
    """audit.png: histograms of inserted vs held-out cosines (final model; all rounds' maxima if computed)."""
    from dpfl_tff.plots import pyplot

    plt = pyplot()

    if audit.get("final_model") is None:
        raise ValueError(audit.get("all_rounds_note", "no estimate"))
    panels = [("final model: cos(canary, w_0 - w_T)", audit["final_model"], "inserted_cosines", "held_out_cosines")]
    if audit.get("all_rounds"):
        panels.append(("all rounds: max_t cos(canary, w_{t-1} - w_t)", audit["all_rounds"],
                       "inserted_max_cosines", "held_out_max_cosines"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, part, ins, out) in zip(axes[0], panels):
        bins = np.histogram_bin_edges(np.concatenate([part[ins], part[out]]), bins=30)
        ax.hist(part[out], bins=bins, alpha=0.6, label="held out (never inserted)", color="tab:gray")
        ax.hist(part[ins], bins=bins, alpha=0.6, label="inserted canaries", color="tab:red")
        lb = part.get("epsilon_lower_bound")
        bound = "" if lb is None else f"; lower bound {lb:.3g} ({100 * part['lower_bound_confidence']:.4g}%)"
        ax.set_title(f"{title}\nestimate eps {part['epsilon']:.3g}{bound} at delta {audit['delta']:.2g}", fontsize=9)
        ax.set_xlabel("cosine")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
