"""A full (or read-only) disk under any file a run writes: one line, the exit code, nothing else; resumable."""

import builtins
import errno
import gc
import json
import os
import sys

import pytest

from dpfl_tff.checkpoints import CheckpointManager
from dpfl_tff.release_log import LedgerLog, check_ledger_covers
from tests.conftest import run_driver

ROUNDS = 3
ARGS = [
    "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=10", "--synthetic_input_dim=8",
    "--clients_per_round=5", "--noise_multiplier=1.1", "--clip_norm=0.5", "--eval_every=0", "--target_delta=1e-4",
    "--checkpoint_every=1", f"--rounds={ROUNDS}",
]
NO_SPACE = os.strerror(errno.ENOSPC)


class _FullDisk:
    """Files opened with a name in `names` accept `allow` write calls in all, then fail with ENOSPC."""

    def __init__(self, names, allow):
        self.names, self.allow, self.writes = names, allow, 0

    def _fail(self):
        self.writes += 1
        if self.writes > self.allow:
            raise OSError(errno.ENOSPC, NO_SPACE)

    def open(self, real_open):
        disk = self

        class File:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                disk._fail()
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __iter__(self):
                return iter(self._f)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            name = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
            if any(m in mode for m in "wax") and any(name.startswith(n) for n in self.names):
                return File(f)
            return f

        return fake_open


def _tensorboard_full(monkeypatch, allow):
    """The event file writer's flush fails as TensorFlow reports ENOSPC, after `allow` flushes (the file
    version's, then one a round)."""
    import tensorflow as tf

    real_flush, calls = tf.io.TFRecordWriter.flush, []

    def flush(self):
        calls.append(1)
        if len(calls) > allow:
            raise tf.errors.ResourceExhaustedError(None, None, f"tensorboard/events.out.tfevents.1; {NO_SPACE}")
        return real_flush(self)

    monkeypatch.setattr(tf.io.TFRecordWriter, "flush", flush)


# target -> (file names that fill the disk, writes allowed first, the error line (None: a WARNING, exit 0))
CASES = {
    "ledger": (("ledger.jsonl",), 1, "error: ledger.jsonl could not be written to {out} ({why}); is the disk full or "
                                     "the folder read-only?"),
    "metrics": (("metrics.jsonl",), 1, "error: metrics.jsonl could not be written to {out} ({why}); is the disk "
                                       "full or the folder read-only?"),
    "checkpoint": (("state.npz",), 1, "error: checkpoint of round 2 could not be written to {out}/checkpoints "
                                      "({why}); is the disk full or the folder read-only?"),
    "summary": (("summary.json",), 0, "error: summary.json could not be written to {out} ({why}); is the disk full "
                                      "or the folder read-only?"),
    "tensorboard": (None, 1, "error: tensorboard/ could not be written to {out}/tensorboard ({tb}); is the disk "
                             "full or the folder read-only?"),
    "plot": (("run.png",), 0, None),
}


@pytest.mark.parametrize("target", list(CASES))
def test_a_full_disk_is_one_line_and_the_exit_code_and_the_folder_resumes(target, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    names, allow, line = CASES[target]
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with monkeypatch.context() as m:
        if names is None:
            _tensorboard_full(m, allow)
        else:
            m.setattr(builtins, "open", _FullDisk(names, allow).open(builtins.open))
        code = run_driver([*ARGS, f"--output_dir={out}"])
    gc.collect()  # a half-written file object left behind would complain now ("Exception ignored in ...")
    captured = capsys.readouterr()
    assert not unraisable, [(u.exc_value, u.object) for u in unraisable]
    if line is None:  # a plot never fails a finished run: one warning
        assert code == 0 and captured.err == ""
        warnings = [x for x in captured.out.splitlines() if x.startswith("WARNING")]
        assert len(warnings) == 1 and NO_SPACE in warnings[0], captured.out
        assert not os.path.exists(os.path.join(out, "run.png"))  # nothing half-written under the final name
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
        return
    assert code == 2
    expected = line.format(out=out, why=NO_SPACE, tb=f"tensorboard/events.out.tfevents.1; {NO_SPACE}")
    assert captured.err.splitlines() == [expected]
    ledger = LedgerLog(out)
    ledger.load(needs_cohorts=False)  # intact: every line whole and chained
    ckpts = CheckpointManager(out)
    # ... and covering every release the checkpoints, metrics and summary record (what a resume checks)
    check_ledger_covers(ledger, out, ckpts.dir)
    assert ckpts.rounds() and ckpts._readable(ckpts.rounds()[-1])  # the newest checkpoint: whole, checksum right
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    if target != "checkpoint":
        return
    # Space again: the same command resumes from the last checkpoint and finishes.
    assert run_driver([*ARGS, f"--output_dir={out}"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert json.load(open(os.path.join(out, "summary.json")))["status"] == "completed"
