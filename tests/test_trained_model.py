"""The trained model out of a run folder (final_model.keras, dpfl_tff.load_model) and named checkpoint arrays."""

import hashlib
import io
import json
import os

import numpy as np
import pytest

import dpfl_tff
from dpfl_tff import training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task
from tests.conftest import run_driver

ARGS = ["--task=digits", "--num_clients=20", "--clients_per_round=5", "--eval_every=1", "--checkpoint_every=1"]


def _checkpoint(run, round_num):
    path = os.path.join(run, "checkpoints", f"ckpt_{round_num:06d}")
    meta = json.load(open(os.path.join(path, "meta.json")))
    with np.load(os.path.join(path, "state.npz")) as z:
        return path, meta, {k: z[k] for k in z.files}


def test_a_finished_run_holds_its_model_and_names_its_checkpoint_arrays(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert run_driver([*ARGS, "--rounds=2", f"--output_dir={run}"]) == 0
    model = dpfl_tff.load_model(run)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["final_model"] == "final_model.keras" and summary["final_model_round"] == 2
    # The loaded model is the evaluated one: Keras' evaluate gives the run's last test figures.
    data = load_task(TaskConfig(task="digits", num_clients=20), 0)
    loss, accuracy = model.evaluate(data.test.x, data.test.y, verbose=0)
    last = json.loads(open(os.path.join(run, "metrics.jsonl")).readlines()[-1])
    assert abs(accuracy - last["test_accuracy"]) < 1e-6 and abs(loss - last["test_loss"]) < 1e-4
    # The checkpoint names the model's arrays after its variables (the quickstart MLP: two Dense layers).
    _, meta, arrays = _checkpoint(run, 2)
    names = meta["leaf_names"]
    assert names[:4] == ["global_model_weights/trainable/dense/kernel", "global_model_weights/trainable/dense/bias",
                         "global_model_weights/trainable/dense_1/kernel", "global_model_weights/trainable/dense_1/bias"]
    assert list(arrays) == names and len(set(names)) == len(names) == meta["num_leaves"]
    assert all(np.array_equal(a, arrays[n]) for a, n in zip(model.get_weights(), names[:4]))


def _to_unnamed(path, meta, arrays):
    """Rewrites a checkpoint as runs before named arrays wrote it: arr_0, arr_1, ... and no leaf_names."""
    npz = io.BytesIO()
    np.savez(npz, *[arrays[n] for n in meta.pop("leaf_names")])
    with open(os.path.join(path, "state.npz"), "wb") as f:
        f.write(npz.getvalue())
    meta["sha256"] = hashlib.sha256(npz.getvalue()).hexdigest()
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))


def test_a_checkpoint_with_unnamed_arrays_still_resumes(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert run_driver([*ARGS, "--rounds=2", f"--output_dir={run}"]) == 0
    path, meta, arrays = _checkpoint(run, 2)
    _to_unnamed(path, meta, arrays)
    with np.load(os.path.join(path, "state.npz")) as z:
        assert z.files[0] == "arr_0"
    capsys.readouterr()
    assert run_driver([*ARGS, "--rounds=3", f"--output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from round 2 (checkpoint)" in out and "done: 3 rounds" in out
    resumed = _checkpoint(run, 3)[1]
    assert resumed["leaf_names"][0] == "global_model_weights/trainable/dense/kernel"
    assert json.load(open(os.path.join(run, "final_model.json")))["round"] == 3


def test_a_stopped_run_holds_the_model_of_its_last_completed_round(tmp_path):
    """A stop request after round 1 of 3: the run raises RunInterrupted, and the folder holds round 1's model."""
    cfg = ExperimentConfig(
        task=TaskConfig(task="digits", num_clients=20),
        train=TrainConfig(clients_per_round=5, rounds=3, eval_every=1),
        dp=DPConfig(mode="central", noise_multiplier=1.0), output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(training.RunInterrupted):
        training.run(cfg, log=lambda line: None,
                     stop_requested=lambda: training.RunInterrupted("stopped by test", 143))
    run = cfg.output_dir
    assert json.load(open(os.path.join(run, "final_model.json")))["round"] == 1
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["status"].startswith("stopped") and summary["final_model_round"] == 1
    model = dpfl_tff.load_model(run)
    with np.load(os.path.join(run, "checkpoints", "ckpt_000001", "state.npz")) as z:
        assert np.array_equal(model.get_weights()[0], z["global_model_weights/trainable/dense/kernel"])


def test_a_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="final_model.keras: no such file"):
        dpfl_tff.load_model(str(tmp_path))
