"""A sweep's table and plot: one row per setting, aggregated over its seeds.

`rows(sweep)` reads each finished run's summary.json (status `completed` or
`stopped_at_budget`; unfinished runs are left out and counted) and groups the
runs by setting. Per setting:

* epsilon: the largest over its seeds (identical unless the noise was
  calibrated per run; `epsilon_differs` says when they are not), and under
  local DP also the largest `local_epsilon`; delta, neighbouring relation and
  accountant (each seed's, joined with `/` if they differ);
* test accuracy: the mean over seeds and the sample standard deviation
  (n - 1 in the denominator; empty for a single seed);
* rounds: `k` or `min-max` over the seeds; wall time: the mean over seeds of
  each run's `wall_seconds` (the session that finished the run: a resumed
  run's earlier sessions are not included).

`write_tables` writes results.csv and results.md, `plot` privacy_utility.png:
test accuracy against epsilon (log scale), one line per setting without its
noise level (e.g. one per `dp_mode`), error bars of one standard deviation
over seeds; runs without DP (epsilon infinite) are horizontal lines.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Any

from dpfl_tff.outputs import read_summary, replaced_atomically
from dpfl_tff.sweep import Run, SweepPlan, value_text

RESULTS_CSV, RESULTS_MD, PRIVACY_UTILITY_PNG = "results.csv", "results.md", "privacy_utility.png"
FINISHED = ("completed", "stopped_at_budget")
# Grid keys that move a run along the epsilon axis: the plot draws one line per setting without them.
NOISE_KEYS = ("noise_multiplier", "target_epsilon")
COLUMNS = ("setting", "dp_mode", "noise_multiplier", "seeds_finished", "seeds", "epsilon", "epsilon_differs",
           "local_epsilon", "delta", "neighboring_relation", "accountant", "test_accuracy_mean",
           "test_accuracy_std", "test_accuracy_n", "rounds", "wall_seconds_mean", "record_epsilon")


def _joined(values: list[Any]) -> Any:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "/".join(map(str, distinct))


def _row(setting: str, runs: list[Run], summaries: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """One table row from the finished runs' summaries of one setting (at least one)."""
    settings = dict(runs[0].settings)
    eps = [float(s["epsilon"]) for s in summaries]
    local = [float(s["local_epsilon"]) for s in summaries if s.get("local_epsilon") is not None]
    record = [float(s["record_epsilon"]) for s in summaries if s.get("record_epsilon") is not None]
    acc = [s["final_test_accuracy"] for s in summaries if s.get("final_test_accuracy") is not None]
    rounds = [s["rounds"] for s in summaries]
    walls = [s["wall_seconds"] for s in summaries if "wall_seconds" in s]
    return {
        "setting": setting or "(base)",
        **{k: value_text(settings[k]) if k in settings else "" for k in keys},
        "dp_mode": _joined([s["dp_mode"] for s in summaries]),
        "noise_multiplier": _joined([s["noise_multiplier"] for s in summaries]),
        "seeds_finished": len(summaries),
        "seeds": len(runs),
        "epsilon": max(eps),
        "epsilon_differs": len(set(eps)) > 1,
        "local_epsilon": max(local) if local else None,
        "delta": _joined([s["delta"] for s in summaries]),
        "neighboring_relation": _joined([s["neighboring_relation"] for s in summaries]),
        "accountant": _joined([s["accountant"] for s in summaries]),
        "test_accuracy_mean": statistics.fmean(acc) if acc else None,
        "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
        "test_accuracy_n": len(acc),
        "rounds": str(min(rounds)) if min(rounds) == max(rounds) else f"{min(rounds)}-{max(rounds)}",
        "wall_seconds_mean": statistics.fmean(walls) if walls else None,
        "record_epsilon": max(record) if record else None,  # --dp_level=example: the max over clients and seeds
    }


def rows(sweep: SweepPlan) -> tuple[list[dict[str, Any]], int]:
    """(one row per setting with at least one finished run, the number of runs not finished)."""
    by_setting: dict[str, list[Run]] = {}
    for run in sweep.runs:
        by_setting.setdefault(run.setting, []).append(run)
    out, unfinished = [], 0
    for setting, runs in by_setting.items():
        summaries = [read_summary(r.cfg.output_dir) or {} for r in runs]
        done = [s for s in summaries if s.get("status") in FINISHED]
        unfinished += len(runs) - len(done)
        if done:
            out.append(_row(setting, runs, done, sweep.keys))
    return out, unfinished


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _epsilon_text(row: dict[str, Any]) -> str:
    if row.get("record_epsilon") is not None:
        return "inf (client level)"
    if math.isinf(row["epsilon"]):
        return "inf (no DP)"
    return f"{row['epsilon']:.4g}" + (" (max; differs over seeds)" if row["epsilon_differs"] else "")


def _accuracy_text(row: dict[str, Any]) -> str:
    if row["test_accuracy_mean"] is None:
        return "n/a"
    std = "" if row["test_accuracy_std"] is None else f" ± {row['test_accuracy_std']:.4f}"
    return f"{row['test_accuracy_mean']:.4f}{std} (n={row['test_accuracy_n']})"


def markdown(table: list[dict[str, Any]], unfinished: int, selection: str | None = None) -> str:
    """results.md: the table, what its columns mean, and what the selection is covered by.

    `selection`: the selection's section (`--select=private|public`); None: a plain sweep's label,
    "not covered by epsilon" (`selection.PLAIN_LABEL`).
    """
    has_local = any(r["local_epsilon"] is not None for r in table)
    # With local DP rows, each epsilon column says which view it is (docs/privacy.md#local-dp).
    views = ["epsilon (central view)", "local epsilon (against the server)"] if has_local else ["epsilon"]
    has_record = any(r.get("record_epsilon") is not None for r in table)
    if has_record:  # --dp_level=example rows: the record-level guarantee (docs/privacy.md#record-level-dp-example-level-dp-sgd)
        views.append("record epsilon (max over clients)")
    head = ["setting", *views,
            "delta", "relation", "accountant",
            "test accuracy (mean ± std, n seeds)", "rounds", "wall s (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [f"`{r['setting']}`", _epsilon_text(r)]
        if has_local:
            cells.append(_fmt(r["local_epsilon"], ".4g"))
        record = r.get("record_epsilon")
        if has_record:
            cells.append(_fmt(record, ".4g"))
        relation = (r["neighboring_relation"] or "none (no DP)").replace("_", "-")
        if record is not None:
            relation = "add-or-remove-one record"
        cells += [f"{r['delta']:.3g}" if isinstance(r["delta"], float) else str(r["delta"]), relation,
                  str(r["accountant"]).upper() if not math.isinf(r["epsilon"]) or record is not None else "-",
                  _accuracy_text(r), r["rounds"], _fmt(r["wall_seconds_mean"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "std: sample standard deviation over seeds (n - 1). epsilon: the largest over the seeds, at the "
             "row's delta; wall s: mean over seeds."]
    if unfinished:
        notes.append(f"{unfinished} run(s) not finished yet are left out.")
    if selection is None:
        from dpfl_tff.selection import PLAIN_LABEL

        notes += ["", PLAIN_LABEL + "."]
    else:
        notes.append(selection.rstrip("\n"))
    return "\n".join(lines + notes) + "\n"


def write_tables(sweep: SweepPlan, folder: str, selection: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Writes results.csv and results.md (`selection`: see `markdown`) into `folder`; returns (rows, unfinished)."""
    table, unfinished = rows(sweep)
    columns = ["setting", *sweep.keys, *[c for c in COLUMNS if c != "setting" and c not in sweep.keys]]
    # Atomically: a second sweep on the same folder may write them at the same time.
    with replaced_atomically(os.path.join(folder, RESULTS_CSV)) as tmp, \
            open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in table:
            writer.writerow({k: _csv_value(r.get(k)) for k in columns})
    with replaced_atomically(os.path.join(folder, RESULTS_MD)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown(table, unfinished, selection))
    return table, unfinished


def _line_label(run_settings: dict[str, Any]) -> str:
    rest = {k: v for k, v in run_settings.items() if k not in NOISE_KEYS}
    return ",".join(f"{k}={value_text(v)}" for k, v in sorted(rest.items())) or "runs"


def plot(sweep: SweepPlan, table: list[dict[str, Any]], path: str) -> str | None:
    """privacy_utility.png (see the module docstring); None when no row has a test accuracy."""
    from dpfl_tff.plots import pyplot

    plt = pyplot()

    settings = {r.setting or "(base)": dict(r.settings) for r in sweep.runs}
    # --dp_level=example rows are drawn at their record epsilon (their client-level epsilon is inf).
    points = [{**r, "epsilon": r["record_epsilon"], "neighboring_relation": "record-level add_or_remove_one_record"}
              if r.get("record_epsilon") is not None else r for r in table if r["test_accuracy_mean"] is not None]
    if not points:
        return None
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        lines.setdefault(_line_label(settings[r["setting"]]), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [r["epsilon"] for r in points if not math.isinf(r["epsilon"])]
    for label, line in lines.items():
        dp = sorted((r for r in line if not math.isinf(r["epsilon"])), key=lambda r: r["epsilon"])
        if dp:
            first = dp[0]
            relation = str(first["neighboring_relation"]).replace("_", "-")
            local = [r for r in dp if r.get("local_epsilon") is not None]
            view = "epsilon: central view, " if local else ""
            bar = ax.errorbar([r["epsilon"] for r in dp], [r["test_accuracy_mean"] for r in dp],
                              yerr=[r["test_accuracy_std"] or 0.0 for r in dp], marker="o", capsize=3,
                              label=f"{label} ({view}{relation}, delta={first['delta']:.2g})")
            if local:  # local DP: the same runs at each client's epsilon against the server, labelled
                local.sort(key=lambda r: r["local_epsilon"])
                ax.plot([r["local_epsilon"] for r in local], [r["test_accuracy_mean"] for r in local],
                        marker="o", markerfacecolor="none", linestyle=":", color=bar[0].get_color(),
                        label=f"{label} (local epsilon: each client against the server)")
                finite += [r["local_epsilon"] for r in local]
        for r in line:
            if math.isinf(r["epsilon"]):
                s = r["test_accuracy_std"] or 0.0
                mean = r["test_accuracy_mean"]
                ax.axhline(mean, linestyle="--", color="gray", label=f"{label} (no DP): {mean:.3f}")
                if s:
                    ax.axhspan(mean - s, mean + s, color="gray", alpha=0.15)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("epsilon after the run (largest over seeds)\nlocal DP: both views, see the legend; record-level "
                  "DP: record epsilon")  # two lines: one is wider than the figure
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def write_all(sweep: SweepPlan, folder: str, selection: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """results.csv, results.md and privacy_utility.png in `folder`; returns (rows, unfinished runs)."""
    table, unfinished = write_tables(sweep, folder, selection)
    plot(sweep, table, os.path.join(folder, PRIVACY_UTILITY_PNG))
    return table, unfinished
