"""The Python API (docs/python.md): make_config, run, epsilon without TensorFlow, load_model; its example script."""

import json
import os
import subprocess
import sys

import pytest

import dpfl_tff
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_epsilon_imports_no_tensorflow_and_matches_the_documented_figure():
    """README's compute_epsilon example (epsilon 1.986, RDP) through the API, in a fresh process."""
    code = ("import sys, json, dpfl_tff; r = dpfl_tff.epsilon(num_clients=3383, clients_per_round=120, "
            "noise_multiplier=1.2, rounds=100, target_delta=1e-5); "
            "print(json.dumps([r['epsilon'], 'tensorflow' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    eps, tf_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert not tf_imported and round(eps, 3) == 1.986


def test_keyword_flags_win_over_the_flagfile_and_build_the_drivers_config():
    cfg = dpfl_tff.make_config(flagfile="configs/quickstart.cfg", rounds=7, dp_mode="local",
                               client_sampling="uniform", output_dir="runs/x")
    assert (cfg.train.rounds, cfg.dp.mode, cfg.train.client_sampling, cfg.task.num_clients) == (
        7, "local", "uniform", 700)
    # The privacy mode's default sampling applies when no one sets --client_sampling (as in the driver).
    assert dpfl_tff.make_config(task="digits", dp_mode="ftrl").train.client_sampling == "shuffle"
    # epsilon of keyword flags = epsilon of the same configuration built by hand.
    by_hand = ExperimentConfig(task=TaskConfig(task="digits", num_clients=700),
                               train=TrainConfig(clients_per_round=70, rounds=30),
                               dp=DPConfig(mode="central", noise_multiplier=1.0))
    assert dpfl_tff.epsilon(by_hand)["epsilon"] == dpfl_tff.epsilon(
        num_clients=700, clients_per_round=70, rounds=30, noise_multiplier=1.0)["epsilon"]


@pytest.mark.parametrize("flags, words", [
    ({"roundz": 3}, "roundz=3: no such flag (did you mean rounds?)"),
    ({"rounds": 0}, "--rounds=0: must be"),
    ({"target_epsilon": 5, "dp_mode": "local", "client_sampling": "uniform"},
     "calibration supports --dp_mode=central, --dp_mode=ftrl, --dp_mode=bandmf and --dp_mode=blt"),
])
def test_bad_flags_are_one_line_config_errors(flags, words):
    with pytest.raises(ConfigError) as e:
        dpfl_tff.make_config(task="digits", **flags)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_example_script_runs_and_its_model_is_the_runs(tmp_path):
    """scripts/python_api_example.py as docs/python.md shows it: quiet (no TensorFlow INFO lines), the loaded
    model evaluates to the run's final test accuracy, the epsilon spent is the one planned."""
    out = subprocess.run([sys.executable, "scripts/python_api_example.py", "--rounds=2",
                          f"--output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if " I " in line or "INFO" in line], out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(result["loaded_model_test_accuracy"] - result["final_test_accuracy"]) < 1e-6
    assert result["epsilon"] == pytest.approx(result["epsilon_planned"], rel=1e-9)
    assert os.path.exists(tmp_path / "run" / "final_model.keras")
