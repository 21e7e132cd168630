"""experiments.sweep --parallel: the runs' shares, the cores, the exit code, Ctrl-C and the rerun (subprocess)."""

import csv
import os
import signal
import subprocess
import sys

import pytest

from dpfl_tff import parallel_sweep
from experiments import sweep as sweep_app
from tests.conftest import run_app, worker_pids
from tests.test_sweep import TINY, TINY_GRID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_run_goes_to_exactly_one_copy_and_cores_are_split():
    runs = list(range(7))
    shares = [parallel_sweep.share(runs, i, 3) for i in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == runs
    assert [parallel_sweep.cores_of(i, 2, [0, 1, 2, 3]) for i in range(2)] == [(0, 2), (1, 3)]
    assert parallel_sweep.cores_of(0, 1, [5, 7]) == (5, 7)
    with pytest.raises(ValueError):
        parallel_sweep.cores_of(0, 3, [0, 1])


def test_exit_code_puts_a_stop_before_a_failure_before_a_usage_error():
    assert parallel_sweep.exit_code([0, 0]) == 0
    assert parallel_sweep.exit_code([0, 2]) == 2
    assert parallel_sweep.exit_code([2, 1]) == 1
    assert parallel_sweep.exit_code([1, 130]) == 130
    assert parallel_sweep.exit_code([0, 143, 130]) == 143


def test_shard_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(parallel_sweep.SHARD_ENV, raising=False)
    assert parallel_sweep.shard() is None
    monkeypatch.setenv(parallel_sweep.SHARD_ENV, "1/2")
    assert parallel_sweep.shard() == (1, 2)
    for bad in ("2/2", "x", "1/2/3"):
        monkeypatch.setenv(parallel_sweep.SHARD_ENV, bad)
        with pytest.raises(ValueError, match=parallel_sweep.SHARD_ENV):
            parallel_sweep.shard()


def test_bad_parallel_values_exit_2_with_one_line(tmp_path, capsys):
    cores = len(parallel_sweep.usable_cores())
    for flag, message in ((["--parallel=0"], f"--parallel=0: must be between 1 and {cores}"),
                          ([f"--parallel={cores + 1}"], f"--parallel={cores + 1}: must be between 1 and {cores}")):
        assert run_app(sweep_app, "sweep", [*TINY, *TINY_GRID, *flag, f"--output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    if cores >= 2:
        assert run_app(sweep_app, "sweep", [*TINY, "--parallel=2", "--select=private",
                                            f"--output_dir={tmp_path}"]) == 2
        assert "--select=private scores each candidate" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(len(parallel_sweep.usable_cores()) < 2, reason="--parallel=2 needs 2 cores")
def test_parallel_sweep_stops_on_ctrl_c_and_a_rerun_finishes_it(tmp_path, monkeypatch, own_signals):
    """Two pinned copies; SIGINT to the sweep (as a terminal's Ctrl-C) while copy 1 trains its first run:
    exit 130, no TFF worker left; the same sweep again (without --parallel) finishes every run and writes the table."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "experiments.sweep", *TINY, *TINY_GRID, "--parallel=2", f"--output_dir={out}"]
    before = set(worker_pids())
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("p1: round 1/2"):  # copy 1 has this run's round 2 and a whole run to go
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text + err
    assert "SIGINT received: every run stops after its current round" in text
    cores = parallel_sweep.usable_cores()
    assert f"p1: 2 runs on core(s) {cores[0]}," in text and f"p2: 2 runs on core(s) {cores[1]}," in text, text
    assert "sweep stopped" in err and "rerun the same command to continue" in err, err
    assert set(worker_pids()) <= before

    # The rerun, here without --parallel (in this process, the session's worker): it finishes what is left.
    lines: list[str] = []
    monkeypatch.setattr(sweep_app, "_log", lines.append)
    assert run_app(sweep_app, "sweep", [*TINY, *TINY_GRID, f"--output_dir={out}"]) == 0
    assert lines[-1].startswith("sweep done: 4 runs"), lines[-3:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["seeds_finished"], r["rounds"]) for r in rows] == [
        ("dp_mode=none", "2", "2"), ("noise_multiplier=1", "2", "2")]
    assert {"worker-1.log", "worker-2.log"} <= set(os.listdir(out))
