"""One run per folder (the folder lock), and outputs that agree after a SIGKILL and a resume."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dpfl_tff import folder_lock
from dpfl_tff.release_log import LedgerLog
from tests.conftest import run_driver, worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=0", "--target_delta=1e-4",
    "--checkpoint_every=2",
]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _checkpoints(out):
    return sorted(int(d[5:]) for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("ckpt_"))


def _tensorboard_points(logdir, tag):
    """(step, value) of `tag` as written in every event file (no purge applied), file by file in name order."""
    import tensorflow as tf

    points = []
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for v in event.summary.value:
                if v.tag == tag:
                    points.append((event.step, float(tf.make_ndarray(v.tensor))))
    return points


def test_second_run_on_a_folder_is_refused_and_a_sigkilled_run_resumes_with_each_round_once(tmp_path, capsys):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.run_federated", *ARGS, "--rounds=100000", f"--output_dir={out}"]
    before = set(worker_pids())
    # A SIGKILLed driver cannot remove its client-files folder: it goes under tmp_path, not /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 240
        while not line.startswith("round 5/") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the first run ended early"
        ledger_before = open(os.path.join(out, "ledger.jsonl"), "rb").read()
        # The same command again, and with --overwrite, and a dry run: each refused at once, naming the holder.
        for extra in ([], ["--overwrite"], ["--dry_run"]):
            assert run_driver([*ARGS, "--rounds=3", f"--output_dir={out}", *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith(f"error: --output_dir={out}: in use by another run (pid {proc.pid} on host "
                                     f"{socket.gethostname()}, since "), err
        assert proc.poll() is None
        # Nothing was deleted or rewritten: the first run's ledger only grew.
        assert open(os.path.join(out, "ledger.jsonl"), "rb").read().startswith(ledger_before)
        assert _checkpoints(out)
        workers = set(worker_pids()) - before
        proc.kill()  # SIGKILL: the kernel drops the lock with the process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    deadline = time.monotonic() + 15
    while workers & set(worker_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workers & set(worker_pids())
    lost = len(_rows(out))
    # Resume from the older of the two kept checkpoints, so that rounds after it were run and are lost.
    ckpts = _checkpoints(out)
    resume_from, rounds = ckpts[-2], lost + 2
    assert lost > resume_from
    shutil.rmtree(os.path.join(out, "checkpoints", f"ckpt_{ckpts[-1]:06d}"))
    assert run_driver([*ARGS, f"--rounds={rounds}", f"--output_dir={out}"]) == 0  # no stale lock
    assert f"resuming {out} from round {resume_from}" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    LedgerLog(out).load(needs_cohorts=False)  # intact
    logdir = os.path.join(out, "tensorboard")
    # As written: every round once, and the value of its last execution (the one metrics.jsonl keeps). A
    # round whose Poisson cohort was empty (p = 0.75^20 = 0.3% a round: a long first run has some) has no
    # train_loss (None), so no point; epsilon has one every round.
    for tag in ("train_loss", "epsilon"):
        points = _tensorboard_points(logdir, tag)
        written = [r for r in rows if r[tag] is not None]
        assert tag == "train_loss" or len(written) == rounds
        assert all(r["clients_this_round"] == 0 for r in rows if r[tag] is None), tag
        assert [s for s, _ in points] == [r["round"] for r in written], tag
        assert [v for _, v in points] == pytest.approx([r[tag] for r in written], rel=1e-6), tag
    # As TensorBoard's own loader reads the folder.
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    steps = [e.step for e in acc.Tensors("train_loss")]
    assert steps == [r["round"] for r in rows if r["train_loss"] is not None]  # (no point for an empty cohort)
    assert [e.step for e in acc.Tensors("epsilon")] == list(range(1, rounds + 1))


def test_lock_is_exclusive_named_and_released(tmp_path):
    path = str(tmp_path / "run")
    lock = folder_lock.acquire(path)
    with open(os.path.join(path, folder_lock.LOCK_FILE)) as f:
        assert f.read().startswith(f"pid={os.getpid()} host={socket.gethostname()} since=")
    with pytest.raises(folder_lock.FolderInUse, match=rf"in use by another run \(pid {os.getpid()} on host "):
        folder_lock.acquire(path)
    with pytest.raises(folder_lock.FolderInUse):
        with folder_lock.probe(path):
            pass
    lock.release()
    with folder_lock.probe(path):  # a dry run's shared lock: a run starting meanwhile is told so
        with pytest.raises(folder_lock.FolderInUse, match="in use by a --dry_run reading it"):
            folder_lock.acquire(path)
    folder_lock.acquire(path).release()
    with folder_lock.probe(str(tmp_path / "absent")):  # never locked: nothing to wait for, nothing created
        pass
    assert not os.path.exists(tmp_path / "absent")


def test_a_closed_stdout_never_ends_a_run_it_trains_on_and_logs_to_its_files(tmp_path, monkeypatch, capsys):
    """`run_federated ... | head -1`: once the reader is gone, every print fails with EPIPE (Python ignores
    SIGPIPE). The run goes on to the end, checkpointed, and says so once on stderr."""
    out = str(tmp_path / "run")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `head` has exited
    closed = open(write_end, "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        code = run_driver([*ARGS, "--rounds=3", f"--output_dir={out}"])
    finally:
        monkeypatch.undo()
        closed.close()  # to /dev/null by now: closing flushes nothing that could fail
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("stdout is closed (BrokenPipeError): the run goes on"), err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert [r["round"] for r in _rows(out)] == [1, 2, 3] and _checkpoints(out)[-1] == 3


def test_tensorboard_writes_each_round_as_tf_summary_scalar_would(tmp_path):
    """One event per round; each finite scalar a float32 scalar tensor for the scalars plugin (beyond float32:
    +-inf, as the cast gives); non-finite and missing fields left out."""
    import numpy as np
    import tensorflow as tf

    from dpfl_tff import outputs

    tb = outputs.TensorBoard(str(tmp_path))
    keys = outputs.TensorBoard.KEYS
    tb.write({"round": 1, keys[0]: 0.1, keys[1]: 1e40, keys[2]: float("nan"), keys[3]: -1e40, keys[4]: 7})
    tb.close()
    (name,) = [n for n in os.listdir(tmp_path) if "tfevents" in n]
    events = [e for e in tf.compat.v1.train.summary_iterator(os.path.join(tmp_path, name)) if e.summary.value]
    assert [e.step for e in events] == [1]
    values = {v.tag: v for v in events[0].summary.value}
    assert sorted(values) == sorted([keys[0], keys[1], keys[3], keys[4]])
    expected = {keys[0]: np.float32(0.1), keys[1]: np.float32(np.inf), keys[3]: np.float32(-np.inf),
                keys[4]: np.float32(7)}
    for tag, v in values.items():
        assert v.metadata.plugin_data.plugin_name == "scalars"
        got = tf.make_ndarray(v.tensor)
        assert got.dtype == np.float32 and got.shape == () and got == expected[tag], tag
