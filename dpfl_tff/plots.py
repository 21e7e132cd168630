"""Plots of experiment folders (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dpfl_tff.outputs import read_metrics, read_summary, replaced_atomically

RUN_PNG = "run.png"


def pyplot():
    """matplotlib.pyplot with the Agg backend, imported on first use (0.4 s: not at a run's start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _eps(v) -> float:
    return float(v) if not isinstance(v, str) else float("inf")


def plot_run(output_dir: str, path: str | None = None) -> str:
    """Test accuracy and epsilon per round of one run; returns the PNG's path."""
    rows = read_metrics(output_dir)
    if not rows:
        raise ValueError(f"{output_dir} has no metrics.jsonl rows to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    evals = [r for r in rows if "test_accuracy" in r]
    ax.plot([r["round"] for r in evals], [r["test_accuracy"] for r in evals], "o-", color="tab:blue")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([r["round"] for r in rows], [_eps(r["epsilon"]) for r in rows], color="tab:red")
    last = rows[-1]
    ax2.set_ylabel(f"epsilon (delta={last['delta']:.2g}, {last.get('neighboring_relation') or 'no DP'})", color="tab:red")
    ax.set_title(os.path.basename(os.path.abspath(output_dir)))
    # Fixed margins (room for both y labels at figsize 7x4): tight_layout would draw the figure once more to
    # measure its texts, a third of this function's time, after every run.
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.12, top=0.9)
    path = path or os.path.join(output_dir, RUN_PNG)
    try:
        with replaced_atomically(path) as tmp:  # a failed write (disk full) leaves the previous plot
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def privacy_of(output_dir: str) -> tuple[float | None, str | None]:
    """(delta, neighbouring relation) of a run folder: its summary.json, else its last metrics row."""
    summary = read_summary(output_dir)
    if summary is None:
        rows = read_metrics(output_dir)
        summary = rows[-1] if rows else {}
    return summary.get("delta"), summary.get("neighboring_relation")


def comparable(output_dirs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits runs into those whose epsilons can share one axis and those that cannot.

    Epsilons are comparable only at the same delta under the same neighbouring
    relation. The reference is the (delta, relation) most DP runs share (the
    first such run's on a tie); DP runs that differ from it are returned with
    the reason, not plotted. Runs without DP (relation None, epsilon
    infinite) are kept: they are drawn as horizontal baselines.

    Returns:
      (runs to plot, [(excluded run, why)]).
    """
    privacy = {d: privacy_of(d) for d in output_dirs}
    dp = [p for p in privacy.values() if p[1] is not None]
    if not dp:
        return list(output_dirs), []
    reference = max(dict.fromkeys(dp), key=dp.count)
    kept, excluded = [], []
    for d, (delta, relation) in privacy.items():
        if relation is None or (delta, relation) == reference:
            kept.append(d)
        else:
            excluded.append((d, f"delta {delta:.3g}, {relation} differs from delta {reference[0]:.3g}, "
                                f"{reference[1]} of the others"))
    return kept, excluded


def plot_runs(output_dirs: Sequence[str], path: str) -> str:
    """Accuracy against epsilon for several runs, one line each (runs without DP: a horizontal line at their
    last test accuracy); returns the PNG's path. Give runs of one delta and relation (`comparable`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in output_dirs:
        evals = [r for r in read_metrics(d) if "test_accuracy" in r]
        if not evals:
            raise ValueError(f"{d} has no evaluated rounds to plot")
        label = os.path.basename(os.path.abspath(d))
        if evals[-1].get("neighboring_relation") is None:
            ax.axhline(evals[-1]["test_accuracy"], linestyle="--", color="gray", label=f"{label} (no DP)")
            continue
        ax.plot([_eps(r["epsilon"]) for r in evals], [r["test_accuracy"] for r in evals], "o-", label=label)
    delta, relation = next((p for p in map(privacy_of, output_dirs) if p[1] is not None), (None, None))
    where = f" (delta={delta:.2g}, {relation})" if relation else ""
    ax.set_xlabel(f"epsilon spent{where}")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
