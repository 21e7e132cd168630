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

from dpfl_tff import folder_lock, plots, sweep, sweep_results
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from experiments import sweep as sweep_app
from tests.conftest import run_app

BASE = ExperimentConfig(task=TaskConfig(task="digits", num_clients=20),
                        train=TrainConfig(clients_per_round=5, rounds=2, client_sampling="poisson", seed=3),
                        dp=DPConfig(noise_multiplier=1.0), output_dir="/tmp/sw")
# A tiny sweep: 2 rounds of all 10 digits clients (Poisson q = 1: the accountant's cheapest case), 20 examples
# each, noise {0, 1} x 2 seeds = 4 runs (z=0 is the no-DP baseline).
TINY = ["--task=digits", "--num_clients=10", "--clients_per_round=10", "--rounds=2", "--eval_every=0",
        "--checkpoint_every=1", "--model=logistic", "--client_max_examples=20"]
TINY_GRID = ["--grid=noise_multiplier=0,1", "--seeds=2"]


def _main(args: list[str]) -> int:
    """experiments.sweep's main in this process (the session's TFF worker); its exit code."""
    return run_app(sweep_app, "sweep", args)


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
    with pytest.raises(ConfigError, match="--grid=noise_multiplier with --target_epsilon: the noise is calibrated"):
        sweep.expand(calibrated, [sweep.Axis("noise_multiplier", (1.0, 2.0))], 1)
    with pytest.raises(ConfigError, match="--grid=noise_multiplier with --target_epsilon"):
        sweep.expand(BASE, [sweep.Axis("noise_multiplier", (1.0,)), sweep.Axis("target_epsilon", (1.0, 2.0))], 1)
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


# --- the driver: a tiny sweep in this process ------------------------------------------------------------------------

def _mtimes(folder) -> dict[str, int]:
    """mtime of every file in the run folders under `folder` (not the sweep's own files, nor the folder locks)."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) if d != str(folder) for f in files if f != folder_lock.LOCK_FILE}


def test_sweep_interrupted_resumed_then_skipped(tmp_path, monkeypatch, capfd, own_signals):
    """Ctrl-C in the 2nd run stops it after its round (exit 130, checkpointed, results of the rest written);
    the rerun resumes it and trains the others; a third run trains nothing and changes no run folder."""
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    out = tmp_path / "sw"
    args = [*TINY, *TINY_GRID, f"--output_dir={out}"]
    lines: list[str] = []

    def log(line):  # the user's Ctrl-C, while round 1 of the 2nd run is reported
        lines.append(line)
        if line.startswith("round 1/2") and sum(x.startswith("[2/4] ") for x in lines) == 1:
            # To this (main) thread, which holds it while the round is written: handled as that ends, before
            # the run asks whether to go on. (os.kill could land in another thread, handled a round later.)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(sweep_app, "_log", log)
    assert _main(args) == 130
    assert "stopped by SIGINT: run dp_mode=none,seed=1: last completed round checkpointed" in capfd.readouterr().err
    names = sorted(os.listdir(out))
    assert names == ["dp_mode=none,seed=0", "dp_mode=none,seed=1", "privacy_utility.png", "results.csv", "results.md",
                     "worker.log"]
    stopped = json.loads((out / "dp_mode=none,seed=1" / "summary.json").read_text())
    assert stopped["status"].startswith("stopped") and stopped["rounds"] == 1
    assert "3 run(s) not finished yet" in (out / "results.md").read_text()  # the stopped one, two not started

    lines.clear()
    assert _main(args) == 0
    assert any(x.startswith("already complete: 2 rounds") for x in lines)  # dp_mode=none,seed=0
    assert any(x.startswith(f"resuming {out / 'dp_mode=none,seed=1'} from round 1") for x in lines)
    assert lines[-1].startswith("sweep done: 4 runs (3 trained now, 1 already complete)")
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["seeds_finished"]) for r in rows] == [("dp_mode=none", "2"), ("noise_multiplier=1", "2")]
    for r in rows:
        assert r["rounds"] == "2" and 0 <= float(r["test_accuracy_mean"]) <= 1 and float(r["test_accuracy_std"]) >= 0
    assert rows[0]["epsilon"] == "inf" and 0 < float(rows[1]["epsilon"]) < math.inf
    assert (out / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The shared worker holds no executor (no run's values) after the runs.
    assert not context_stack_impl.context_stack.current.executor_factory._executors

    before = _mtimes(out)
    assert len(before) > 4 * 5
    lines.clear()
    assert _main(args) == 0
    assert lines[-1].startswith("sweep done: 4 runs (0 trained now, 4 already complete)")
    assert _mtimes(out) == before


def test_bad_grid_exits_2_with_one_line(tmp_path, capsys):
    for grid, message in (("--grid=noise_multipler=1,2", "unknown flag --noise_multipler"),
                          ("--grid=noise_multiplier=1,x", "'x' is not a valid --noise_multiplier"),
                          ("--grid=clip_norm=1,-1", "run clip_norm=-1,seed=0: --clip_norm=-1.0: must be > 0")):
        assert _main([*TINY, grid, f"--output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --grid") and message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_dry_run_lists_runs_and_epsilons_and_trains_nothing(tmp_path, capsys):
    from dpfl_tff.privacy import accounting

    out = tmp_path / "sw"
    assert _main([*TINY, "--grid=dp_mode=central,local", *TINY_GRID, f"--output_dir={out}", "--dry_run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    runs = [x for x in printed if x.startswith("dp_mode=")]
    assert len(runs) == 6 and all(x.endswith("; new") for x in runs)
    assert runs[0].startswith("dp_mode=none,seed=0: epsilon inf (no DP) after 2 rounds")
    central = dataclasses.replace(BASE, task=dataclasses.replace(BASE.task, num_clients=10), train=dataclasses.replace(
        BASE.train, clients_per_round=10, rounds=2))
    eps = accounting.make_ledger(central).planned(2)["epsilon"]
    assert f"dp_mode=central,noise_multiplier=1,seed=1: epsilon {eps:.4g} at delta" in "\n".join(runs)
    assert "dp_mode=local,noise_multiplier=1,seed=1: epsilon" in "\n".join(runs)
    assert not out.exists()


def test_a_run_folder_held_by_another_process_is_skipped_and_reported(tmp_path, capsys, own_signals):
    """Two sweeps on one --output_dir share its runs: a run another process holds (its folder lock) is
    skipped, named, and left untouched; the others run."""
    out = tmp_path / "sw"
    held = out / "dp_mode=none,seed=0"
    lock = folder_lock.acquire(str(held))  # as the other sweep's process would hold it (a second flock here)
    try:
        assert _main([*TINY, "--grid=noise_multiplier=0", "--seeds=2", f"--output_dir={out}"]) == 0
    finally:
        lock.release()
    printed = capsys.readouterr().out.splitlines()
    assert f"[1/2] dp_mode=none,seed=0: skipped, in use by another run (pid {os.getpid()} on host " in "\n".join(printed)
    assert printed[-1].startswith("sweep done: 2 runs (1 trained now, 0 already complete, 1 skipped: run by another "
                                  "process now"), printed[-1]
    assert sorted(os.listdir(held)) == [folder_lock.LOCK_FILE]  # nothing of the held run was written
    assert json.loads((out / "dp_mode=none,seed=1" / "summary.json").read_text())["status"] == "completed"
    assert "1 run(s) not finished yet" in (out / "results.md").read_text()


def test_folder_status_names_the_process_holding_a_run_folder(tmp_path):
    cfg = dataclasses.replace(BASE, output_dir=str(tmp_path / "run"))
    assert sweep.folder_status(cfg) == "new"
    with folder_lock.acquire(cfg.output_dir):
        assert sweep.folder_status(cfg).startswith(f"in use by another run (pid {os.getpid()} on host ")
    assert sweep.folder_status(cfg) == "new"  # the lock file alone is no run
