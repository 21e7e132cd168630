"""The matrix-factorization study: DP-FedAvg, tree DP-FTRL, banded MF and BLT on digits at equal epsilon.

  uv run python scripts/mf_study.py --seeds=5 --output_dir=runs/mf_study

For every mode it runs, one after another (one process at a time), the sweep driver

  python -m experiments.sweep --flagfile=configs/digits_mf_study.cfg --dp_mode=M --client_sampling=S \
      [--bands=auto] --grid=target_epsilon=2,8 --seeds=N --output_dir=<output_dir>/M

with M/S = central/poisson (DP-FedAvg), ftrl/shuffle (tree DP-FTRL), bandmf/banded (--bands, default auto)
and blt/cyclic: the same task, model, clients, optimizers and schedule (the flagfile), the noise of each run
calibrated to its --target_epsilon. A finished run is skipped (the sweep's rule), so rerunning continues.
Then it reads every run's summary.json (and strategy.json) and writes --json (one entry per mode and
epsilon: final test accuracy mean, sample std and per seed, epsilon reached, noise multiplier, wall time,
and the expected squared error of the noise on the prefix sums) and --plot, and prints the JSON.

Expected error (`prefix_error`): the mean over the T rounds of the expected squared error, per coordinate and
in units of clip_norm^2, of the noise added to the prefix sums of the rounds' clipped sums (what the model
of server SGD carries; all modes then divide by the same m):
  central: z^2 (T + 1) / 2 (independent noise); bandmf: z^2 ||A C^-1||_F^2 / T (summary's strategy_loss);
  blt: z^2 ||A C^-1||_F^2 / T = (z / sensitivity)^2 x strategy.json's loss_value (which carries the
  sensitivity^2); ftrl: z^2 x the tree's prefix variance (`tree_query.prefix_noise_variance`, Honaker's
  estimator) of the completed epochs' trees plus the current one's.
--modes, --rounds and --seeds make the short timing runs (e.g. --rounds=10 --seeds=1).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {  # dp_mode: (client_sampling, label)
    "central": ("poisson", "DP-FedAvg (Poisson)"),
    "ftrl": ("shuffle", "DP-FTRL tree (shuffle)"),
    "bandmf": ("banded", "banded MF (amplified)"),
    "blt": ("cyclic", "BLT-DP-FTRL (cyclic)"),
}

_MODES = flags.DEFINE_list("modes", list(MODES), "Privacy modes to run, in this order: " + ", ".join(MODES))
_EPSILONS = flags.DEFINE_list("epsilons", ["2", "8"], "The --target_epsilon values (every mode runs each).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per mode and epsilon (--seed 0 .. seeds-1).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Override the flagfile's --rounds (timing runs).")
_BANDS = flags.DEFINE_string("bands", "auto", "--bands of the bandmf runs (an integer, or auto).")
_FLAGFILE = flags.DEFINE_string("flagfile_base", os.path.join(ROOT, "configs", "digits_mf_study.cfg"),
                                "The flags every run shares.")
_OUTPUT = flags.DEFINE_string("output_dir", "runs/mf_study", "One sweep folder per mode under this.")
_JSON = flags.DEFINE_string("json", os.path.join(ROOT, "docs", "images", "mf_study.json"), "Results JSON.")
_PLOT = flags.DEFINE_string("plot", os.path.join(ROOT, "docs", "images", "mf_study.png"), "Results plot (PNG).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Do not run anything: collect and plot what is there.")


def sweep_command(mode: str) -> list[str]:
    sampling = MODES[mode][0]
    cmd = [sys.executable, "-m", "experiments.sweep", f"--flagfile={_FLAGFILE.value}", f"--dp_mode={mode}",
           f"--client_sampling={sampling}", f"--grid=target_epsilon={','.join(_EPSILONS.value)}",
           f"--seeds={_SEEDS.value}", f"--output_dir={os.path.join(_OUTPUT.value, mode)}"]
    if mode == "bandmf":
        cmd.append(f"--bands={_BANDS.value}")
    if _ROUNDS.value is not None:
        cmd.append(f"--rounds={_ROUNDS.value}")
    return cmd


def tree_prefix_error(z: float, rounds: int, rounds_per_epoch: int) -> float:
    """Mean over rounds t of the tree noise variance of the prefix sum [1, t] (one tree per epoch), z^2 units."""
    from dpfl_tff.privacy.tree_query import prefix_noise_variance

    full = prefix_noise_variance(rounds_per_epoch, z)
    total = 0.0
    for t in range(1, rounds + 1):
        epochs, within = divmod(t, rounds_per_epoch)
        total += epochs * full + (prefix_noise_variance(within, z) if within else 0.0)
    return total / rounds


def prefix_error(summary: dict, run_dir: str) -> float | None:
    z, mode, rounds = summary.get("noise_multiplier"), summary.get("dp_mode"), summary.get("rounds_planned")
    if not z or not rounds:
        return None
    if mode == "central":
        return z * z * (rounds + 1) / 2
    if mode == "bandmf":
        return z * z * summary["strategy_loss"]
    if mode == "blt":
        with open(os.path.join(run_dir, "strategy.json")) as f:
            s = json.load(f)
        return (z / s["sensitivity"]) ** 2 * s["loss_value"]
    if mode == "ftrl":
        with open(os.path.join(run_dir, "hparams.json")) as f:
            h = json.load(f)
        return tree_prefix_error(z, rounds, h["task"]["num_clients"] // h["train"]["clients_per_round"])
    return None


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect() -> list[dict]:
    out = []
    for mode in _MODES.value:
        folder = os.path.join(_OUTPUT.value, mode)
        for eps in _EPSILONS.value:
            runs = []
            for seed in range(_SEEDS.value):
                run_dir = os.path.join(folder, f"target_epsilon={eps},seed={seed}")
                path = os.path.join(run_dir, "summary.json")
                if not os.path.exists(path):
                    continue
                with open(path) as f:
                    s = json.load(f)
                if s.get("status") != "completed":
                    continue
                runs.append((seed, s, prefix_error(s, run_dir)))
            if not runs:
                continue
            acc = [s["final_test_accuracy"] for _, s, _ in runs]
            first = runs[0][1]
            entry = {
                "dp_mode": mode, "client_sampling": MODES[mode][0], "label": MODES[mode][1],
                "target_epsilon": float(eps), "seeds": [seed for seed, _, _ in runs],
                "rounds": first["rounds"], "accuracy_mean": sum(acc) / len(acc), "accuracy_std": _std(acc),
                "accuracy_per_seed": acc,
                "epsilon_reached_max": max(s["epsilon"] for _, s, _ in runs),
                "delta": first["delta"], "neighboring_relation": first["neighboring_relation"],
                "accountant": first["accountant"],
                "noise_multiplier": first["noise_multiplier"],
                "prefix_error": runs[0][2],
                "wall_seconds_mean": sum(s["wall_seconds"] for _, s, _ in runs) / len(runs),
            }
            if mode == "bandmf":
                entry["bands"] = first.get("bands")
                entry["bands_chosen"] = first.get("bands_chosen")
            out.append(entry)
    return out


def plot(results: list[dict], path: str) -> None:
    from dpfl_tff.plots import pyplot

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(_MODES.value):
        rows = sorted((r for r in results if r["dp_mode"] == mode), key=lambda r: r["target_epsilon"])
        if not rows:
            continue
        x = [r["target_epsilon"] * (1 + 0.03 * (i - 1.5)) for r in rows]  # a small offset: error bars apart
        ax.errorbar(x, [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] or 0 for r in rows],
                    marker="o", capsize=3, label=MODES[mode][1])
        ax2.plot([r["target_epsilon"] for r in rows], [r["prefix_error"] for r in rows], marker="o",
                 label=MODES[mode][1])
    seeds = max((len(r["seeds"]) for r in results), default=0)
    rounds = results[0]["rounds"] if results else "?"
    eps = sorted({r["target_epsilon"] for r in results})
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(eps, [f"{e:g}" for e in eps])
        a.minorticks_off()
    ax.set_xlabel("epsilon (delta 7.4e-4)")
    ax.set_ylabel(f"final test accuracy (mean ± std, {seeds} seeds)")
    ax.set_title(f"digits, {rounds} rounds, 70 of 700 clients per round")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("epsilon")
    ax2.set_ylabel("expected squared prefix-sum noise error (clip^2)")
    ax2.set_title("noise on the prefix sums, mean over rounds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    unknown = [m for m in _MODES.value if m not in MODES]
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    timings = {}
    if not _REPORT_ONLY.value:
        for mode in _MODES.value:
            cmd = sweep_command(mode)
            print("running: " + " ".join(cmd), flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT)
            timings[mode] = time.perf_counter() - start
            print(f"{mode}: exit {rc}, {timings[mode]:.0f} s", flush=True)
            if rc != 0:
                sys.exit(rc)
    results = collect()
    report = {"command": "uv run python scripts/mf_study.py " + " ".join(sys.argv[1:]),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "flagfile": os.path.relpath(_FLAGFILE.value, ROOT), "sweep_seconds": timings, "results": results}
    if _JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)
    if _PLOT.value and results:
        plot(results, _PLOT.value)
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
