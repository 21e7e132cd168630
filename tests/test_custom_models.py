"""--model=package.module:function: validated before training with clear errors."""

import json

import pytest

from dpfl_tff import models
from dpfl_tff.config import ConfigError
from tests.conftest import run_driver


def test_good_custom_model_validates():
    assert models.validate_model("tests.custom_models:tiny_mlp", (8, 8, 1), 10) == []


@pytest.mark.parametrize(
    "name, words",
    [
        ("tests.custom_models:wrong_output_size", "output shape is (None, 11); must be (batch, 10)"),
        ("tests.custom_models:no_arguments", "must take (input_shape, num_classes)"),
        ("tests.custom_models:not_a_model", "returned str, not a tf.keras.Model"),
        ("tests.custom_models:missing", "tests.custom_models has no function missing"),
        ("tests.no_such_module:fn", "cannot import tests.no_such_module (ModuleNotFoundError"),
        ("resnet1000", "must be one of"),
        ("tests.custom_models:ends_in_softmax", "outputs probabilities"),
    ],
)
def test_bad_custom_models_fail_clearly(name, words):
    with pytest.raises(ConfigError) as e:
        models.validate_model(name, (8, 8, 1), 10)
    assert f"--model={name}" in str(e.value) and words in str(e.value)


def test_batchnorm_warns_loudly():
    with pytest.warns(UserWarning, match="BatchNormalization"):
        notes = models.validate_model("tests.custom_models:with_batchnorm", (8, 8, 1), 10)
    assert notes and "privacy leak" in notes[0]


def _driver(tmp_path, model):
    return run_driver(["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=2", "--eval_every=1",
                       f"--model={model}", f"--output_dir={tmp_path / 'run'}"])


def test_driver_trains_a_custom_model_and_rejects_a_wrong_one(tmp_path, capsys):
    assert _driver(tmp_path / "ok", "tests.custom_models:tiny_mlp") == 0
    rows = [json.loads(line) for line in open(tmp_path / "ok" / "run" / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [1, 2]
    capsys.readouterr()
    assert _driver(tmp_path / "bad", "tests.custom_models:wrong_output_size") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --model=tests.custom_models:wrong_output_size: output shape is (None, 11); "
        "must be (batch, 10) logits for this task"
    )
    assert not (tmp_path / "bad" / "run" / "metrics.jsonl").exists()  # failed before training
