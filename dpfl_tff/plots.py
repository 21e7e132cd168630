"""Plots of experiment folders (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpfl_tff.outputs import read_metrics  # noqa: E402

RUN_PNG = "run.png"


def _eps(v) -> float:
    return float(v) if not isinstance(v, str) else float("inf")


def plot_run(output_dir: str, path: str | None = None) -> str:
    """Test accuracy and epsilon per round of one run; returns the PNG's path."""
    rows = read_metrics(output_dir)
    if not rows:
        raise ValueError(f"{output_dir} has no metrics.jsonl rows to plot")
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
    fig.tight_layout()
    path = path or os.path.join(output_dir, RUN_PNG)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(output_dirs: Sequence[str], path: str) -> str:
    """Accuracy against epsilon for several runs, one line each; returns the PNG's path."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in output_dirs:
        evals = [r for r in read_metrics(d) if "test_accuracy" in r]
        if not evals:
            raise ValueError(f"{d} has no evaluated rounds to plot")
        ax.plot([_eps(r["epsilon"]) for r in evals], [r["test_accuracy"] for r in evals], "o-",
                label=os.path.basename(os.path.abspath(d)))
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
