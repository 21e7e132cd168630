"""--model=package.module:function: validated before training with clear errors."""

import json
import warnings

import numpy as np
import pytest

from dpfl_tff import models, training
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task
from tests.conftest import run_driver

BATCHNORM = "tests.custom_models:with_batchnorm"
BATCHNORM_WARNING = f"WARNING: --model={BATCHNORM}: training updates bn/moving_mean, bn/moving_variance, which"


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


def test_batchnorm_warns_loudly_once():
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")  # returned for the run to print once, never also issued as a warning
        notes = models.validate_model(BATCHNORM, (8, 8, 1), 10)
    assert [str(w.message) for w in issued if "moving_mean" in str(w.message)] == []
    assert len(notes) == 1 and notes[0].startswith(BATCHNORM_WARNING)
    assert "keeps their initial values" in notes[0] and "GroupNormalization or LayerNormalization" in notes[0]


def test_any_state_training_updates_is_named_and_frozen_weights_are_not():
    notes = models.validate_model("tests.custom_models:with_counter", (8, 8, 1), 10)
    assert len(notes) == 1 and "training updates counter/seen, which" in notes[0]
    assert models.validate_model("tests.custom_models:with_frozen_layer", (8, 8, 1), 10) == []


def _driver(tmp_path, model):
    return run_driver(["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=2", "--eval_every=1",
                       f"--model={model}", f"--output_dir={tmp_path / 'run'}"])


def test_subclassed_models_validate_from_a_probe_call():
    """Subclassed models have no `output_shape`: a probe call gives it, and a wrong one is named."""
    assert models.validate_model("tests.custom_models:subclassed_with_branch", (8, 8, 1), 10) == []
    assert models.validate_model("tests.custom_models:subclassed_unbuilt", (8, 8, 1), 10) == []
    with pytest.raises(ConfigError) as e:
        models.validate_model("tests.custom_models:subclassed_wrong_output", (8, 8, 1), 10)
    assert str(e.value) == ("--model=tests.custom_models:subclassed_wrong_output: output shape is (None, 11); "
                            "must be (batch, 10) logits for this task")


def test_driver_trains_a_subclassed_model_and_its_folder_holds_it(tmp_path, capsys):
    import dpfl_tff

    run = tmp_path / "sub" / "run"
    assert _driver(tmp_path / "sub", "tests.custom_models:subclassed_unbuilt") == 0
    assert "done: 2 rounds" in capsys.readouterr().out
    model = dpfl_tff.load_model(str(run))
    final = json.loads(open(run / "metrics.jsonl").readlines()[-1])
    data = load_task(TaskConfig(task="digits", num_clients=20), 0)
    loss, accuracy = model.evaluate(data.test.x, data.test.y, verbose=0)
    assert abs(accuracy - final["test_accuracy"]) < 1e-6 and abs(loss - final["test_loss"]) < 1e-4


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


@pytest.mark.parametrize("impl", ["grouped", "tff"])
def test_batchnorm_moving_statistics_never_leave_the_clients(tff_context, tmp_path, impl):
    """Under DP the released model is the noised trainable weights and the *initial* non-trainable ones.

    A client's training step moves BatchNormalization's moving mean and variance (checked first, so that
    "unchanged" below means "not aggregated"), but neither the grouped process nor TFF's FedAvg sends them
    to the server: the client update is the trainable weights' delta, and the server step keeps
    `weights.non_trainable`. This is why epsilon covers such a model (docs/privacy.md, threat model).
    """
    cfg = ExperimentConfig(
        task=TaskConfig(task="digits", num_clients=20),
        train=TrainConfig(model=BATCHNORM, clients_per_round=5, fedavg_impl=impl),
        dp=DPConfig(mode="central", noise_multiplier=1.0), output_dir=str(tmp_path / "run"),
    ).validate()
    data = load_task(cfg.task, cfg.train.seed)
    local = training.keras_model(cfg, data)
    before = [v.numpy() for v in local.non_trainable_variables]
    local(data.clients[0].x[:20], training=True)
    assert before and all(not np.array_equal(b, v.numpy()) for b, v in zip(before, local.non_trainable_variables))

    with training.client_files(cfg, data) as files:
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)
        initial = process.get_model_weights(state)
        state = process.next(state, training.round_input(cfg, data, [0, 3, 5, 7, 9], 1, files)).state
        final = process.get_model_weights(state)
    assert len(final.non_trainable) == 2  # moving_mean, moving_variance
    assert all(np.array_equal(a, b) for a, b in zip(initial.non_trainable, final.non_trainable))
    assert any(not np.array_equal(a, b) for a, b in zip(initial.trainable, final.trainable))


def test_driver_trains_a_batchnorm_model_and_says_its_state_is_not_aggregated(tmp_path, capsys):
    """Central DP: the warning names the state, summary.json lists it, and the model stays covered by epsilon."""
    args = ["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=1", "--dp_mode=central",
            f"--model={BATCHNORM}", f"--output_dir={tmp_path / 'run'}"]
    assert run_driver(args) == 0
    assert BATCHNORM_WARNING in capsys.readouterr().out
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["model_state_not_aggregated"] == ["bn/moving_mean", "bn/moving_variance"]
    # The released model is the noised trainable weights and the initial rest: not listed as uncovered.
    assert not [f for f in summary["outputs_not_covered_by_epsilon"] if "model" in f]
    assert summary["status"] == "completed"


@pytest.mark.parametrize("mode", ["none", "local", "ftrl"])
def test_dry_run_of_a_batchnorm_model_warns_in_every_mode(tmp_path, capsys, mode):
    """The same model runs in every mode (nothing of its state leaves a client in any); the plan says so."""
    args = ["--task=digits", "--num_clients=20", "--clients_per_round=5", "--rounds=4", f"--dp_mode={mode}",
            f"--model={BATCHNORM}", f"--output_dir={tmp_path / 'run'}", "--dry_run"]
    assert run_driver(args) == 0
    out = capsys.readouterr().out
    assert BATCHNORM_WARNING in out and "dry run: nothing is trained" in out
    assert not (tmp_path / "run").exists()
