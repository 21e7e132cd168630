"""The TFF learning process: DP off equals plain FedAvg traced by hand; noise is not seeded by --seed."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff import training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task


def _cfg(tmp_path, **dp):
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=4, synthetic_examples_per_client=6, synthetic_input_dim=5,
                        synthetic_num_classes=3),
        train=TrainConfig(model="logistic", rounds=2, clients_per_round=3, client_batch_size=6,
                          client_optimizer="sgd", client_learning_rate=0.5,
                          server_optimizer="sgd", server_learning_rate=1.0, eval_every=1, seed=4,
                          sampling_seed=4),
        dp=DPConfig(**dp),
        output_dir=str(tmp_path / "run"),
    ).validate()


@pytest.mark.parametrize("impl,use_files", [("grouped", True), ("grouped", False), ("tff", False)])
def test_dp_off_round_is_the_average_of_local_sgd_steps(tff_context, tmp_path, impl, use_files):
    cfg = _cfg(tmp_path, mode="none", noise_multiplier=0.0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fedavg_impl=impl, clients_per_call=2))
    data = load_task(cfg.task, cfg.train.seed)
    cohort = [0, 2, 3]
    with training.client_files(cfg, data) as files:
        assert (files is not None) == (impl == "grouped")
        files = files if use_files else None
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)
        w0 = [np.asarray(v) for v in process.get_model_weights(state).trainable]
        # One local step per client: each client's 6 examples form one batch.
        out = process.next(state, training.round_input(cfg, data, cohort, 1, files))
    got = [np.asarray(v) for v in process.get_model_weights(out.state).trainable]

    # By hand: w_i = w0 - lr * grad of the client's mean loss at w0; server: w0 + mean(w_i - w0).
    model = training.keras_model(cfg, data)
    deltas = []
    for c in cohort:
        model.set_weights(w0)
        x, y = data.clients[c].x, data.clients[c].y
        with tf.GradientTape() as tape:
            loss = tf.keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        deltas.append([-0.5 * g.numpy() for g in grads])
    expected = [w + np.mean([d[i] for d in deltas], axis=0) for i, w in enumerate(w0)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], w0[0])  # the round did move the model


def test_initial_weights_follow_seed(tff_context, tmp_path):
    cfg = _cfg(tmp_path, mode="none", noise_multiplier=0.0)
    data = load_task(cfg.task, cfg.train.seed)
    process = training.build_learning_process(cfg, data)

    def w(c):
        return np.asarray(process.get_model_weights(training.initial_state(process, c, data)).trainable[0])

    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5))
    np.testing.assert_array_equal(w(cfg), w(cfg))
    assert not np.array_equal(w(cfg), w(other))


def _final_test_loss(cfg, name):
    cfg = dataclasses.replace(cfg, output_dir=cfg.output_dir + name)
    return training.run(cfg, log=lambda s: None).records[-1]["test_loss"]


def test_same_seed_gets_different_noise_unless_noise_seed_given(tmp_path):
    cfg = _cfg(tmp_path, noise_multiplier=5.0, clip_norm=1.0)
    a, b = _final_test_loss(cfg, "a"), _final_test_loss(cfg, "b")
    # Same --seed and --sampling_seed (data, cohorts, init), fresh noise of std 5C on every coordinate: two
    # runs end with bit-identical test losses with probability ~0 (< 1e-30).
    assert a != b
    seeded = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, noise_seed=11))
    c, d = _final_test_loss(seeded, "c"), _final_test_loss(seeded, "d")
    assert c == d  # the noise seed is the only difference left
    dp_off = dataclasses.replace(cfg, dp=DPConfig(mode="none", noise_multiplier=0.0))
    assert _final_test_loss(dp_off, "e") == pytest.approx(_final_test_loss(dp_off, "f"), abs=0)


def test_budget_guard_stops_before_the_round_that_would_exceed(tmp_path):
    from dpfl_tff.privacy import accounting, events

    cfg = _cfg(tmp_path, noise_multiplier=1.0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=50))
    tracker = events.EpsilonTracker(accounting.round_privacy(cfg), cfg.target_delta, "rdp")
    budget = (tracker.epsilon(3) + tracker.epsilon(4)) / 2  # allows exactly 3 rounds
    guarded = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, max_epsilon=budget))
    result = training.run(guarded, log=lambda s: None)
    assert [r["round"] for r in result.records] == [1, 2, 3]
    assert result.records[-1]["epsilon"] <= budget < tracker.epsilon(4)
    assert result.summary["status"] == "stopped_at_budget" and "round 4" in result.summary["stop_reason"]
    assert result.summary["final_test_accuracy"] is not None  # the last allowed round is evaluated


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_evaluator_gives_keras_evaluate_figures(model):
    """The batched evaluation (no Keras `evaluate` set-up) reports the same loss and accuracy, over 2+ batches."""
    import tensorflow_federated as tff

    from dpfl_tff.process import Evaluator, keras_model
    from dpfl_tff.tasks.base import ClientArrays, FederatedData

    shape = (64,) if model == "mlp" else (8, 8, 1)
    rng = np.random.default_rng(0)
    n = Evaluator.EVAL_BATCH + 300  # a full batch and a partial one
    test = ClientArrays(rng.random((n, *shape), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32))
    data = FederatedData([test], test, shape, 10, "random")
    cfg = ExperimentConfig(task=TaskConfig(task="synthetic", num_clients=1),
                           train=TrainConfig(model=model, clients_per_round=1)).validate()
    weights = tff.learning.models.ModelWeights.from_model(keras_model(cfg, data))
    ours = Evaluator(cfg, data)(weights)
    reference = keras_model(cfg, data)
    weights.assign_weights_to(reference)
    reference.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
    loss, acc = reference.evaluate(test.x, test.y, batch_size=512, verbose=0)
    assert ours["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert ours["test_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_a_later_run_reuses_an_evaluator_only_for_the_same_registered_model_and_test_set(monkeypatch):
    """`evaluator_for`: the same object for an equal test set and model (its figures those of a fresh one on
    other weights); a new one when the test set, the model or its shapes differ; the last few are kept."""
    import tensorflow_federated as tff

    from dpfl_tff import process
    from dpfl_tff.process import Evaluator, evaluator_for, keras_model
    from dpfl_tff.tasks.base import ClientArrays, FederatedData

    monkeypatch.setattr(process, "_EVALUATORS", [])
    monkeypatch.setattr(process, "_EVALUATORS_KEPT", 2)
    rng = np.random.default_rng(1)
    test = ClientArrays(rng.random((50, 64), dtype=np.float32), rng.integers(0, 10, 50).astype(np.int32))
    data = FederatedData([test], test, (64,), 10, "random")
    cfg = ExperimentConfig(task=TaskConfig(task="synthetic", num_clients=1),
                           train=TrainConfig(model="mlp", clients_per_round=1)).validate()
    first = evaluator_for(cfg, data)
    copy = ClientArrays(test.x.copy(), test.y.copy())  # equal, not the same arrays (a run loads its own)
    again = evaluator_for(cfg, FederatedData([copy], copy, (64,), 10, "random"))
    assert again is first
    for seed in (2, 3):  # other weights each time: the reused evaluator assigns them all
        tf.keras.utils.set_random_seed(seed)
        weights = tff.learning.models.ModelWeights.from_model(keras_model(cfg, data))
        assert again(weights) == Evaluator(cfg, data)(weights)
    other_y = ClientArrays(test.x, (test.y + 1) % 10)
    other = evaluator_for(cfg, FederatedData([other_y], other_y, (64,), 10, "random"))
    assert other is not first
    assert evaluator_for(cfg, data) is first  # two kept: both are found again
    cnn = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="cnn"))
    image = ClientArrays(test.x.reshape(50, 8, 8, 1), test.y)
    image_data = FederatedData([image], image, (8, 8, 1), 10, "random")
    third = evaluator_for(cnn, image_data)
    assert third is not first and third is not other
    assert evaluator_for(cnn, image_data) is third
    assert evaluator_for(cfg, data) is first  # used after `other`: `other` was dropped for the third
    assert evaluator_for(cfg, FederatedData([other_y], other_y, (64,), 10, "random")) is not other
    monkeypatch.setattr(process, "_EVALUATOR_BYTES", 1)  # past the bytes cap only the newest is kept
    other_x = ClientArrays(test.x + 1, test.y)
    newest = evaluator_for(cfg, FederatedData([other_x], other_x, (64,), 10, "random"))
    assert [e for _, e in process._EVALUATORS] == [newest]
