"""The private local worker: its death mid-run fails the run fast, naming it; a rerun resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 60
ARGS = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=0",
    f"--rounds={ROUNDS}", "--checkpoint_every=1000",  # the only mid-run checkpoint is the one of the failure
]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_killed_local_worker_fails_the_run_within_seconds_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run_federated", *ARGS, f"--output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("round 3/"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        (worker,) = [p for p in _children(proc.pid) if p in worker_pids()]
        os.kill(worker, signal.SIGKILL)
        t = time.monotonic()
        _, stderr = proc.communicate(timeout=40)  # before: TFF retried the dead worker forever, silently
        took = time.monotonic() - t
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert took < 30
    errors = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    error = errors[0]
    assert f"(pid {worker})" in error and "localhost:" in error and "killed by SIGKILL" in error, error
    assert str(out / "worker.log") in error, error
    failed = int(re.match(r"error: round (\d+) failed: ", error).group(1))
    done = failed - 1
    assert done >= 3 and f"round {done} is checkpointed" in error, error
    assert [json.loads(s)["round"] for s in open(out / "metrics.jsonl")] == list(range(1, done + 1))
    assert os.path.isdir(out / "checkpoints" / f"ckpt_{done:06d}")  # written on the way out
    assert json.loads((out / "summary.json").read_text())["status"].startswith("stopped: RoundFailed")

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {out} from round {done} (checkpoint)" in again.stdout
    assert [json.loads(s)["round"] for s in open(out / "metrics.jsonl")] == list(range(1, ROUNDS + 1))
