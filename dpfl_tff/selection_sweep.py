"""A sweep with --select=private|public: its candidates, their scores, its summary (selection.json, results.md).

`PrivateSelection` turns the grid (`sweep.expand`, one seed) and the drawn
state (`selection.load_or_draw`) into the candidates' runs, scores each
finished candidate once (`selection_score.private_score`, saved to the state
file before it is printed) and writes the procedure's summary. The math and
the guarantee are in `selection`; `public_summary` is --select=public's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from dpfl_tff import config as C
from dpfl_tff import selection, sweep, sweep_results
from dpfl_tff.errors import ConfigError
from dpfl_tff.outputs import read_summary, replaced_atomically


def with_known_n(runs: list[sweep.Run], base: C.ExperimentConfig) -> list[sweep.Run]:
    """`runs` with N set (a task with its own client split: loaded once for its N)."""
    if base.task.n_is_known:
        return runs
    from dpfl_tff.tasks import load_task

    n = load_task(base.task, base.train.seed).num_clients
    return [dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, task=dataclasses.replace(
        r.cfg.task, num_clients=n, num_clients_known=True))) for r in runs]


def calibrated_by_setting(runs: list[sweep.Run]) -> dict[str, C.ExperimentConfig]:
    """One configuration per setting (N known), its noise calibrated to --target_epsilon if set."""
    from dpfl_tff.privacy import accounting

    out: dict[str, C.ExperimentConfig] = {}
    for r in runs:
        if r.setting not in out:
            out[r.setting] = accounting.with_calibrated_noise(r.cfg)
    return out


def write_json(folder: str, name: str, obj: dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    with replaced_atomically(os.path.join(folder, name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()},
                  f, indent=1)


def plain_composition(grid: sweep.SweepPlan, base: C.ExperimentConfig) -> float | None:
    """RDP epsilon of all the grid's runs composed (None when it has no one figure or N is not known yet)."""
    if not base.task.n_is_known:
        return None
    by_setting = calibrated_by_setting(grid.runs)
    return selection.plain_composition([by_setting[r.setting] for r in grid.runs])


class PrivateSelection:
    """--select=private over the grid `grid` (one run per setting, seed --seed) around `base`."""

    def __init__(self, grid: sweep.SweepPlan, base: C.ExperimentConfig, sel: selection.SelectionConfig,
                 write: bool = True):
        self.grid, self.base, self.sel, self.folder = grid, base, sel, base.output_dir
        known = with_known_n(grid.runs, base)
        self.cfgs = calibrated_by_setting(known)  # per setting, for the accounting
        self.candidates = {s: selection.candidate_for(s, c, sel) for s, c in self.cfgs.items()}
        self.planned = selection.procedure_privacy(list(self.candidates.values()), sel, base.target_delta)
        rng = np.random.default_rng(base.dp.noise_seed)  # None: OS entropy (a --noise_seed: tests only)
        self.state, self.drawn_now = selection.load_or_draw(self.folder, grid.settings, sel, base.train.seed,
                                                            base.train.rounds, rng, write=write)
        by_setting = {r.setting: r for r in grid.runs}
        runs = []
        for c in self.state["candidates"]:
            r0 = by_setting[c["setting"]]
            run = dataclasses.replace(r0, seed=int(c["seed"]))
            runs.append(dataclasses.replace(run, cfg=dataclasses.replace(
                sweep.with_flag(r0.cfg, "seed", run.seed), output_dir=os.path.join(self.folder, run.name))))
        self.plan = sweep.SweepPlan(runs, grid.keys, sorted({r.seed for r in runs}), [])
        self._index = {r.name: i for i, r in enumerate(runs)}

    def privacy_line(self) -> str:
        """What the whole sweep may spend, said before training."""
        p = self.planned
        drawn = [self.candidates[c["setting"]] for c in self.state["candidates"]]
        comp = selection.procedure_privacy(list(self.candidates.values()), self.sel, self.base.target_delta,
                                           drawn)["plain_composition_epsilon"]
        return (f"privacy: the whole sweep may spend epsilon {p['procedure_epsilon']:.4g} at delta {p['delta']:.3g} "
                f"for the released best run ({p['neighboring_relation'].replace('_', '-')}, RDP, RepeatAndSelect "
                f"with K {p['repetitions_distribution']}); one candidate: epsilon {p['per_run_epsilon']:.4g} "
                f"training, {p['per_run_epsilon_with_score']:.4g} with its score; publishing all "
                f"{len(drawn)} candidates drawn would spend {comp:.4g} (plain composition)")

    def draw_line(self) -> str:
        k = self.state["count"]
        how = "drawn now" if self.drawn_now else f"drawn earlier ({selection.STATE_FILE})"
        return (f"private selection: K = {k} candidate(s) {how}, each a setting drawn uniformly from the "
                f"{len(self.grid.settings)} of the grid (internal: K is not released)")

    def score(self, run: sweep.Run, result: Any, log: Callable[[str], None]) -> None:
        """Scores a finished candidate once (saved before printed); a scored one is left as it is."""
        from dpfl_tff import selection_score

        c = self.state["candidates"][self._index[run.name]]
        summary = result.summary if result is not None else (read_summary(run.cfg.output_dir) or {})
        if c["score"] is not None or summary.get("status") not in sweep_results.FINISHED:
            return
        seed = None if self.base.dp.noise_seed is None else self.base.dp.noise_seed + 1 + c["index"]
        try:
            figures = selection_score.private_score(run.cfg, self.sel, op_seed=seed)
        except ValueError as e:
            raise ConfigError(f"cannot score: {e}") from e
        c.update(score=figures["score"], score_noise_std=figures["score_noise_std"],
                 rounds_accounted=int(summary.get("rounds_accounted") or summary.get("rounds") or 0))
        selection.save_state(self.folder, self.state)  # released only once saved
        log(f"candidate {c['index']}: private score {c['score']:.4f} (noise std {c['score_noise_std']:.3g})")

    def summary(self) -> dict[str, Any]:
        """selection.json: the procedure's figures with the runs actually trained, the selected run."""
        planned_rounds = self.base.train.rounds
        cands = list(self.candidates.values())
        trained = []
        for c in self.state["candidates"]:
            if c["score"] is None:
                continue
            rounds = max(planned_rounds, int(c.get("rounds_accounted") or 0))
            cand = (self.candidates[c["setting"]] if rounds == planned_rounds else
                    selection.candidate_for(c["setting"], self.cfgs[c["setting"]], self.sel, rounds))
            trained.append(cand)
            if rounds != planned_rounds:
                cands.append(cand)  # a resume re-ran rounds: the bound must cover this repetition too
        out = {"select": "private", **selection.procedure_privacy(cands, self.sel, self.base.target_delta, trained)}
        best = selection.selected(self.state)
        out.update(count=self.state["count"], scored=len(trained), selected_run=None, selected_setting=None,
                   selected_score=None, score_noise_std=None, selected_test_accuracy=None,
                   selected_run_epsilon=None)
        if best is not None:
            run = self.plan.runs[best["index"]]
            s = read_summary(run.cfg.output_dir) or {}
            out.update(selected_run=run.name, selected_setting=run.setting or "(base)",
                       selected_score=best["score"], score_noise_std=best["score_noise_std"],
                       selected_test_accuracy=s.get("final_test_accuracy"), selected_run_epsilon=s.get("epsilon"))
        elif self.state["candidates"]:
            c0 = self.state["candidates"][0]
            out["score_noise_std"] = c0.get("score_noise_std")
        out["internal_not_released"] = {"count": self.state["count"], "candidates": self.state["candidates"]}
        return out

    def section(self) -> str:
        s = self.summary()
        if s["score_noise_std"] is None:
            s["score_noise_std"] = math.nan
        return selection.markdown(s)

    def finish(self) -> dict[str, Any]:
        out = self.summary()
        write_json(self.folder, selection.SUMMARY_FILE, out)
        sweep_results.write_all(self.plan, self.folder, self.section())
        return out


def public_summary(grid: sweep.SweepPlan, base: C.ExperimentConfig) -> tuple[dict[str, Any], str]:
    """--select=public: (selection.json, results.md's section): the setting of best mean test accuracy."""
    table, _ = sweep_results.rows(grid)
    scored = [r for r in table if r["test_accuracy_mean"] is not None]
    best = max(scored, key=lambda r: r["test_accuracy_mean"]) if scored else None
    comp = plain_composition(grid, base)
    out = {"select": "public", "selected_setting": best["setting"] if best else None,
           "selected_test_accuracy_mean": best["test_accuracy_mean"] if best else None,
           "composition_epsilon": comp, "delta": base.target_delta, "accountant": "rdp",
           "covered_by": "the composition of every run (selection on the server's test set is post-processing "
                         "of all runs; the test set itself is not protected)"}
    return out, selection.public_markdown(out["selected_setting"], out["selected_test_accuracy_mean"], comp)
