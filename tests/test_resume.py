"""Checkpoint/resume with the privacy ledger; crashes, signals, corrupt checkpoints, plots."""

import json
import os
import subprocess
import sys
import time

import dp_accounting
import pytest

from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import accounting, events
from dpfl_tff.sampling import CohortSampler
from tests.conftest import run_driver, worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 12
ARGS = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=4",
    f"--rounds={ROUNDS}", "--target_delta=1e-4",
]


def _cmd(out, *extra):
    return [sys.executable, "-m", "experiments.run_federated", *ARGS, f"--output_dir={out}", *extra]


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _uninterrupted_epsilon(rounds):
    cfg = ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=20),
        train=TrainConfig(clients_per_round=5, rounds=rounds),
        dp=DPConfig(noise_multiplier=1.1, target_delta=1e-4),
    ).validate()
    return events.EpsilonTracker(accounting.round_privacy(cfg), 1e-4, "rdp").epsilon(rounds)


def _kill_after_round(out, k, *extra):
    """Starts the driver, SIGKILLs it once round k's metrics line is on disk; returns its worker pids."""
    before = set(worker_pids())
    # A SIGKILLed driver cannot remove its client-files folder: it goes beside `out`, not in /tmp.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), "driver_tmp")
    os.makedirs(tmp, exist_ok=True)
    proc = subprocess.Popen(_cmd(out, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": tmp})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if os.path.exists(os.path.join(out, "metrics.jsonl")) and len(_rows(out)) >= k:
                break
            assert proc.poll() is None, "driver ended before it could be killed"
            time.sleep(0.02)
        workers = set(worker_pids()) - before
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return workers


def _wait_gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(worker_pids()) & set(pids):
        time.sleep(0.1)
    return not set(worker_pids()) & set(pids)


def _ledger(out):
    return [json.loads(line) for line in open(os.path.join(out, "ledger.jsonl"))]


def test_sigkill_between_checkpoints_then_resume_charges_every_execution_with_fresh_cohorts(tmp_path, capsys):
    out = str(tmp_path / "run")
    # (--eval_every=0: no background evaluation delays the checkpoints, so the kill usually lands after
    # checkpoint 4 and before checkpoint 8; the newest checkpoint on disk is what the rerun must resume from.)
    flags = ("--checkpoint_every=4", "--log_cohorts", "--sampling_seed=3", "--eval_every=0")
    workers = _kill_after_round(out, 6, *flags)
    assert workers and _wait_gone(workers)  # PR_SET_PDEATHSIG took the worker down with the driver
    released_before = len(_ledger(out))
    assert released_before >= 6
    ckpt = max(int(d.split("_")[1]) for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("ckpt_"))
    assert ckpt in (4, 8)
    assert run_driver([*ARGS, f"--output_dir={out}", *flags]) == 0  # the same command, in-process
    assert f"resuming {out} from round {ckpt}" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))  # no duplicate, no gap
    ledger = _ledger(out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    # Every execution is in the ledger: the rounds after checkpoint 4 ran twice and are charged twice.
    assert len(ledger) == released_before + (ROUNDS - ckpt) == summary["rounds_accounted"] == rows[-1]["rounds_accounted"]
    # --log_cohorts: the amplified figure (every execution an independently sampled round) is labelled
    # epsilon_if_cohorts_secret; epsilon, for a reader of the folder, composes the unamplified Gaussian over
    # the worst client's executions, which that reader counts from ledger.jsonl.
    secret = rows[-1]["epsilon_if_cohorts_secret"]
    assert secret == pytest.approx(_uninterrupted_epsilon(len(ledger)), rel=1e-12)
    assert secret > _uninterrupted_epsilon(ROUNDS)  # the ledger is never behind
    counts = {}
    for e in ledger:
        for c in e["cohort"]:
            counts[c] = counts.get(c, 0) + 1
    known = events.epsilon_after(events.RoundPrivacy(
        dp_accounting.GaussianDpEvent(1.1), events.ADD_OR_REMOVE_ONE, 1.1, "Poisson, cohorts known"),
        max(counts.values()), 1e-4, "rdp")
    assert rows[-1]["epsilon"] == pytest.approx(known, rel=1e-12) == summary["epsilon"]
    assert summary["epsilon_amplified_by_sampling"] is False and summary["cohorts_in_folder"] is True
    # A re-run round draws a fresh cohort: execution k of round r is the sampler's draw (r, k), never
    # the first execution's cohort again.
    sampler = CohortSampler("poisson", 20, 5, sampling_seed=3)
    rerun = [e for e in ledger if e["execution"] == 2]
    assert sorted(e["round"] for e in rerun) == list(range(ckpt + 1, released_before + 1))
    for e in ledger:
        assert e["cohort"] == sampler.cohort(e["round"], e["execution"]).tolist()
    for e in rerun:
        first = next(f for f in ledger if f["round"] == e["round"] and f["execution"] == 1)
        assert e["cohort"] != first["cohort"]
    assert summary["sampling_seeded"] is True and summary["resumed_from_round"] == ckpt


def test_resume_with_changed_privacy_flag_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_driver([*ARGS, f"--output_dir={out}", "--rounds=2"]) == 0
    capsys.readouterr()
    assert run_driver([*ARGS, f"--output_dir={out}", "--rounds=3", "--noise_multiplier=0.5", "--clip_norm=0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume" in err and "--noise_multiplier: was 1.1, now 0.5" in err and "--clip_norm: was 0.5" in err
    assert "--rounds" not in err  # more rounds is a resumable change
    assert run_driver([*ARGS, f"--output_dir={out}", "--fresh"]) == 2
    err = capsys.readouterr().err
    assert "--fresh" in err and "--overwrite" in err


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path):
    from dpfl_tff import training

    out = str(tmp_path / "run")
    cfg = ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=20, synthetic_examples_per_client=10, synthetic_input_dim=8),
        train=TrainConfig(clients_per_round=5, rounds=6, checkpoint_every=3, eval_every=3),
        dp=DPConfig(noise_multiplier=1.1, clip_norm=0.5), output_dir=out,
    )
    training.run(cfg, log=lambda s: None)
    with open(os.path.join(out, "checkpoints", "ckpt_000006", "state.npz"), "r+b") as f:
        f.seek(100)
        f.write(b"corrupted!")
    import dataclasses

    lines = []
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=8))
    result = training.run(more, log=lines.append)
    assert any("ckpt_000006 is unreadable" in line and "falling back" in line for line in lines)
    assert result.summary["resumed_from_round"] == 3
    assert [r["round"] for r in _rows(out)] == list(range(1, 9))
    assert result.summary["rounds_accounted"] == 6 + 5  # rounds 4-6 were released before and re-run


def test_budget_guard_holds_across_resume(tmp_path):
    out = str(tmp_path / "run")
    eps4 = _uninterrupted_epsilon(4)
    budget = (eps4 + _uninterrupted_epsilon(5)) / 2
    assert run_driver([*ARGS, f"--output_dir={out}", "--rounds=3", f"--max_epsilon={budget}"]) == 0
    assert run_driver([*ARGS, f"--output_dir={out}", "--rounds=10", f"--max_epsilon={budget}"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["rounds"] == 4 and summary["status"] == "stopped_at_budget"
    assert summary["epsilon"] == pytest.approx(eps4) and summary["epsilon"] <= budget


def test_unwritable_output_dir_is_a_clear_error(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/dpfl_tff_cannot_write_here"  # root ignores permissions; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    assert run_driver([*ARGS, f"--output_dir={target}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output_dir={target}: cannot create the folder")


def test_plot_scripts_make_pngs_from_real_runs(tmp_path):
    from dpfl_tff import training

    dirs = []
    for z in (0.8, 2.0):
        out = str(tmp_path / f"z{z}")
        training.run(ExperimentConfig(
            task=TaskConfig(task="synthetic", num_clients=20), train=TrainConfig(clients_per_round=5, rounds=3,
                                                                                 eval_every=1),
            dp=DPConfig(noise_multiplier=z), output_dir=out), log=lambda s: None)
        dirs.append(out)
        assert os.path.getsize(os.path.join(out, "run.png")) > 1000  # the driver's own plot
        assert os.listdir(os.path.join(out, "tensorboard"))
    one = subprocess.run([sys.executable, "scripts/plot_run.py", dirs[0], f"--out={tmp_path / 'one.png'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout.strip().splitlines()[-1])["png"] == str(tmp_path / "one.png")
    many = subprocess.run([sys.executable, "scripts/plot_runs.py", *dirs, f"--out={tmp_path / 'cmp.png'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert many.returncode == 0, many.stderr
    for png in ("one.png", "cmp.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_full_disk_on_checkpoint_write_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from dpfl_tff.checkpoints import CheckpointManager
    from dpfl_tff.release_log import LedgerLog

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(OSError) as e:
        mgr.save(7, [np.zeros(3)], {"round": 7}, LedgerLog(str(tmp_path)))
    msg = str(e.value)
    assert "checkpoint of round 7" in msg and "No space left on device" in msg and "disk full" in msg
    assert mgr.rounds() == [] and not any(n.startswith(".tmp") for n in os.listdir(mgr.dir))  # nothing half-written
