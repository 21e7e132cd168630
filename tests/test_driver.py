"""experiments.run_federated end to end: files, fields, epsilon, bad flags, signals, no orphan worker."""

import json
import os
import signal
import subprocess
import sys
import time

import dp_accounting
import pytest
from absl import flags
from absl.testing import flagsaver
from dp_accounting.rdp import RdpAccountant

from tests.conftest import worker_pids
from experiments import run_federated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=1",
]
ROUND_FIELDS = {
    "round", "train_loss", "train_accuracy", "epsilon", "delta", "clip_norm", "clients_this_round",
    "round_seconds", "test_loss", "test_accuracy", "accountant", "neighboring_relation", "client_sampling",
}
SUMMARY_FIELDS = {"final_test_accuracy", "epsilon", "delta", "rounds", "wall_seconds", "noise_seeded", "status"}


def _driver(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run_federated", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


def test_main_two_rounds_writes_every_file_and_field(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run_federated", *SMALL, "--rounds=2", f"--output_dir={out}", "--target_delta=1e-4"]
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        run_federated.main(argv[:1])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in printed if line.startswith("round ")] == ["round 1/2", "round 2/2"]
    assert printed[-1].startswith("done: 2 rounds, test accuracy")
    assert {"hparams.json", "metrics.jsonl", "summary.json", "worker.log"} <= set(os.listdir(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert ROUND_FIELDS <= set(r), ROUND_FIELDS - set(r)
        # Epsilon after r rounds, from dp-accounting directly: Poisson q = 5/20, z = 1.1.
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.1)), r["round"])
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
        # The stated delta: --target_delta plus the noise sampler's term (privacy.truncation; 2^-92 delta here).
        assert r["delta"] == pytest.approx(1e-4, rel=1e-11) and r["delta"] == 1e-4 + r["delta_sampler"]
        assert r["clip_norm"] == 0.5
        assert r["neighboring_relation"] == "add_or_remove_one" and r["client_sampling"] == "poisson"
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "completed" and summary["rounds"] == 2 and summary["noise_seeded"] is False
    assert summary["epsilon"] == rows[-1]["epsilon"]
    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams["dp"]["noise_multiplier"] == 1.1 and hparams["train"]["clients_per_round"] == 5


def test_subprocess_run_through_a_pipe_ends_and_leaves_no_worker(tmp_path):
    out = tmp_path / "run"
    before = set(worker_pids())
    proc = _driver([*SMALL, "--rounds=2", f"--output_dir={out}", "--noise_seed=3", "--dp_mode=central"])
    # communicate() reads to EOF: a worker holding our stdout pipe open would hang it.
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "WARNING: DP noise is seeded" in stdout
    assert json.loads((out / "summary.json").read_text())["noise_seeded"] is True
    deadline = time.monotonic() + 15
    while set(worker_pids()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(worker_pids()) - before == set()  # the run's own worker is gone


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--noise_multiplier=-1", "error: --noise_multiplier=-1.0: must be >= 0"),
        ("--clients_per_round=50", "error: --clients_per_round=50: must be <= --num_clients=20"),
        ("--task=imagenet", "error: --task=imagenet: must be one of digits, synthetic"),
        ("--noise_multiplier=0", "error: --noise_multiplier=0 with --dp_mode=central"),
    ],
)
def test_bad_flag_fails_before_training_with_one_line(tmp_path, capsys, flag, message):
    # In-process (the entry point's own exit code 2 is checked once, in test_driver_usability).
    out = tmp_path / "run"
    argv = ["run_federated", *SMALL, flag, f"--output_dir={out}"]
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        run_federated.main(argv[:1])
    assert e.value.code == 2
    stdout, stderr = capsys.readouterr()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), stderr
    assert stdout == "" and not out.exists()


def _children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _start_and_wait_for_round(tmp_path):
    out = tmp_path / "run"
    proc = _driver([*SMALL, "--rounds=100000", "--eval_every=0", f"--output_dir={out}"])
    line = ""
    deadline = time.monotonic() + 180
    while not line.startswith("round 2/") and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    workers = [p for p in _children_of(proc.pid) if p in worker_pids()]
    assert len(workers) == 1
    return proc, workers[0], out


def _gone(pid, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in worker_pids():
            return True
        time.sleep(0.1)
    return False


def test_sigint_exits_nonzero_with_checkpoint_summary_and_no_worker(tmp_path):
    # SIGINT (Ctrl-C) here; SIGTERM, also delivered twice, in test_signals; SIGKILL of the driver in test_resume.
    proc, worker, out = _start_and_wait_for_round(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)  # also drains the pipe the driver writes to
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGINT: last completed round checkpointed")
    assert _gone(worker)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("stopped") and summary["rounds"] >= 2
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, len(rounds) + 1)) and summary["rounds"] == len(rounds)
    assert (out / "checkpoints" / f"ckpt_{len(rounds):06d}").is_dir()  # written on the way out
