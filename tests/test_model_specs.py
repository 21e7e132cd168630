"""model_specs.json: the built-in models' facts a dry run reads instead of building them, equal to the Keras models'."""

import json
import os
import subprocess
import sys

from dpfl_tff import model_specs, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_stored_spec_is_what_the_keras_model_gives():
    """Rebuilt from the models (a changed model without `python -m dpfl_tff.model_specs --write` fails here)."""
    with open(model_specs.SPEC_FILE, encoding="utf-8") as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(model_specs.all_specs()))


def test_the_offline_tasks_registered_models_are_stored():
    (shape, classes, labels), = model_specs.OFFLINE_SHAPES
    for name in ("mlp", "cnn", "logistic", "emnist_2nn"):
        assert name in models.MODELS
        spec = model_specs.lookup(name, shape, classes, labels)
        assert spec is not None and spec["parameters"] == sum(
            int(__import__("math").prod(s)) for s, _ in spec["weights"])
    assert model_specs.lookup("mlp", (28, 28, 1), 10) is None  # another shape: built, not looked up
    assert model_specs.lookup("tests.custom_models:good", shape, classes, labels) is None


def test_a_dry_run_on_the_offline_task_imports_no_tensorflow(tmp_path):
    code = ("import runpy, sys\n"
            f"sys.argv = ['run_federated', '--flagfile=configs/quickstart.cfg', '--dry_run', "
            f"'--output_dir={tmp_path / 'run'}']\n"
            "try:\n    runpy.run_module('experiments.run_federated', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('tensorflow' in sys.modules, 'tensorflow_federated' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "model: mlp, 4,810 parameters" in lines and "epsilon after 100 rounds: 5.799" in proc.stdout
    assert lines[-1] == "False False", proc.stdout
    assert not (tmp_path / "run").exists()
