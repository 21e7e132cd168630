"""experiments.sweep and dpfl_tff.sweep / sweep_results: grid rules, names, tables, plot, skip, resume, Ctrl-C."""

import csv
import dataclasses
import json
import math
import os
import re
import signal
import statistics

import pytest
from absl import flags
from absl.testing import flagsaver

from dpfl_tff import plots, sweep, sweep_results
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from experiments import sweep as sweep_app

BASE = ExperimentConfig(task=TaskConfig(task="digits", num_clients=20),
                        train=TrainConfig(clients_per_round=5, rounds=2, client_sampling="poisson", seed=3),
                        dp=DPConfig(noise_multiplier=1.0), output_dir="/tmp/sw")
# A tiny sweep: 2 rounds of 5 of 20 digits clients; 2 modes x noise {0, 1} x 2 seeds = 6 runs (z=0 is the
# no-DP baseline, shared by both modes).
TINY = ["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=2",
        "--eval_every=0", "--checkpoint_every=1", "--model=logistic", "--client_max_examples=20"]
TINY_GRID = ["--grid=dp_mode=central,local", "--grid=noise_multiplier=0,1", "--seeds=2"]


def _main(args: list[str]) -> int:
    """experiments.sweep's main in this process (the session's TFF worker); its exit code."""
    argv = ["sweep", *args]
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        try:
            sweep_app.main(argv[:1])
        except SystemExit as e:
            return int(e.code or 0)
    return 0


@pytest.fixture
def own_signals():
    """The sweep installs SIGINT/SIGTERM handlers: pytest's are restored afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# --- the grid and its rules (pure) -----------------------------------------------------------------------------------

def test_zero_noise_is_the_no_dp_baseline_and_runs_once_per_seed():
    plan = sweep.expand(BASE, [sweep.Axis("dp_mode", ("central", "local", "none")),
                               sweep.Axis("noise_multiplier", (0.0, 0.5, 1.0))], seeds=2)
    assert plan.settings == ["dp_mode=none", "dp_mode=central,noise_multiplier=0.5",
                             "dp_mode=central,noise_multiplier=1", "dp_mode=local,noise_multiplier=0.5",
                             "dp_mode=local,noise_multiplier=1"]
    assert plan.seeds == [3, 4]  # --seed=3, --seeds=2
    assert [r.name for r in plan.runs[:3]] == ["dp_mode=none,seed=3", "dp_mode=none,seed=4",
                                               "dp_mode=central,noise_multiplier=0.5,seed=3"]
    none = plan.runs[0].cfg
    assert (none.dp.mode, none.dp.noise_multiplier, none.train.seed) == ("none", 0.0, 3)
    assert none.output_dir == os.path.join("/tmp/sw", "dp_mode=none,seed=3")
    local = plan.runs[-1].cfg
    assert (local.dp.mode, local.dp.noise_multiplier, local.train.seed) == ("local", 1.0, 4)
    assert any("noise_multiplier=0 with a DP mode runs as dp_mode=none" in n for n in plan.notes)
    assert any(n.startswith("5 grid combinations are the same run dp_mode=none") for n in plan.notes)


def test_run_names_are_stable_sorted_and_safe():
    a = sweep.expand(BASE, [sweep.Axis("noise_multiplier", (1.0, 2.5)), sweep.Axis("clip_norm", (1e-05,))], 1)
    b = sweep.expand(BASE, [sweep.Axis("clip_norm", (0.00001,)), sweep.Axis("noise_multiplier", (1, 2.5))], 1)
    assert [r.name for r in a.runs] == [r.name for r in b.runs] == [
        "clip_norm=1e-05,noise_multiplier=1,seed=3", "clip_norm=1e-05,noise_multiplier=2.5,seed=3"]
    assert sweep.value_text(0.1 + 0.2) == "0.30000000000000004" and sweep.value_text(True) == "true"
    assert sweep.safe_name("model=pkg.mod:fn/x y") == "model=pkg.mod_fn_x_y"


@pytest.mark.parametrize("spec,message", [
    ("noise_multiplier", "must be flag=value1,value2"),
    ("noise_multiplier=", "must be flag=value1,value2"),
    ("noise_multiplier=1,,2", "must be flag=value1,value2"),
    ("noise_multiplier=1,1", "a value is repeated"),
])
def test_malformed_grid_entries_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        sweep.split_spec(spec)


@pytest.mark.parametrize("key,message", [
    ("noise_multipler", "unknown flag --noise_multipler (did you mean noise_multiplier?)"),
    ("overwrite", "unknown flag --overwrite"),
    ("seed", "use --seeds"),
    ("output_dir", "it is the sweep's folder"),
    ("workers", "list flag"),
])
def test_grid_keys_must_be_configuration_flags(key, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sweep.check_key(key, f"{key}=1")


def test_combinations_a_run_would_refuse_are_refused_naming_the_run():
    with pytest.raises(ConfigError, match=r"^--grid: run clients_per_round=30,seed=3: --clients_per_round=30: must be"):
        sweep.expand(BASE, [sweep.Axis("clients_per_round", (5, 30))], 1)
    calibrated = ExperimentConfig(task=BASE.task, train=BASE.train, dp=DPConfig(target_epsilon=2.0))
    with pytest.raises(ConfigError, match="--target_epsilon=2: the noise is calibrated"):
        sweep.expand(calibrated, [sweep.Axis("noise_multiplier", (1.0, 2.0))], 1)
    with pytest.raises(ConfigError, match="a flag is given twice"):
        sweep.expand(BASE, [sweep.Axis("rounds", (1,)), sweep.Axis("rounds", (2,))], 1)
    with pytest.raises(ConfigError, match="--seeds=0"):
        sweep.expand(BASE, [], 0)


# --- tables and plots from run folders (pure) ------------------------------------------------------------------------

def _finished(plan, tmp_path, accuracies: dict[str, list[float | None]]):
    """Writes a summary.json per run of `plan` as a finished run would (None: unfinished)."""
    plan.runs = [dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, output_dir=str(tmp_path / r.name)))
                 for r in plan.runs]
    for run in plan.runs:
        acc = accuracies[run.setting][plan.seeds.index(run.seed)]
        os.makedirs(run.cfg.output_dir)
        dp = run.cfg.dp.mode != "none"
        summary = {"status": "completed" if acc is not None else "stopped: RunInterrupted", "rounds": 2,
                   "dp_mode": run.cfg.dp.mode, "noise_multiplier": run.cfg.dp.noise_multiplier,
                   "epsilon": 2.0 / run.cfg.dp.noise_multiplier if dp else math.inf, "delta": 1e-3,
                   "neighboring_relation": "replace_one" if dp else None, "accountant": "rdp",
                   "final_test_accuracy": acc, "wall_seconds": 10.0 + run.seed}
        with open(os.path.join(run.cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, allow_nan=True)


def test_results_rows_mean_sample_std_and_unfinished_runs(tmp_path):
    plan = sweep.expand(BASE, [sweep.Axis("dp_mode", ("central",)), sweep.Axis("noise_multiplier", (0.0, 0.5, 2.0))],
                        seeds=3)
    _finished(plan, tmp_path, {"dp_mode=none": [0.9, 0.92, 0.94], "dp_mode=central,noise_multiplier=0.5": [
        0.5, 0.7, None], "dp_mode=central,noise_multiplier=2": [None, None, None]})
    table, unfinished = sweep_results.write_all(plan, str(tmp_path))
    assert unfinished == 4 and [r["setting"] for r in table] == ["dp_mode=none", "dp_mode=central,noise_multiplier=0.5"]
    none, central = table
    assert none["test_accuracy_mean"] == pytest.approx(0.92)
    assert none["test_accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.92, 0.94]))  # = 0.02 (n - 1)
    assert none["test_accuracy_std"] == pytest.approx(0.02)
    assert central["test_accuracy_mean"] == pytest.approx(0.6) and central["test_accuracy_std"] == pytest.approx(
        math.sqrt(0.02))
    assert (central["epsilon"], central["seeds_finished"], central["seeds"]) == (4.0, 2, 3)
    assert central["wall_seconds_mean"] == pytest.approx(13.5)  # seeds 3 and 4 finished: 13 s and 14 s
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["epsilon"] == "inf" and rows[1]["noise_multiplier"] == "0.5" and rows[1]["epsilon"] == "4.0"
    md = (tmp_path / "results.md").read_text()
    assert "| `dp_mode=central,noise_multiplier=0.5` | 4 | 0.001 | replace-one | RDP | 0.6000 ± 0.1414 (n=2) |" in md
    assert "inf (no DP)" in md and "4 run(s) not finished yet are left out" in md
    assert (tmp_path / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_sets_aside_runs_of_another_delta_or_relation(tmp_path):
    def folder(name, delta, relation):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump({"delta": delta, "neighboring_relation": relation}, f)
        return str(tmp_path / name)

    a, b = folder("a", 1e-3, "replace_one"), folder("b", 1e-3, "replace_one")
    c, d, e = folder("c", 1e-5, "replace_one"), folder("d", 1e-3, "add_or_remove_one"), folder("e", 1e-3, None)
    kept, excluded = plots.comparable([c, a, d, b, e])
    assert kept == [a, b, e]  # e: no DP, a baseline
    assert [x for x, _ in excluded] == [c, d]
    assert "delta 1e-05, replace_one differs from delta 0.001, replace_one" in excluded[0][1]
