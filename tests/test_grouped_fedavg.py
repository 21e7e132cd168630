"""grouped_fedavg: the same algorithm as TFF's FedAvg with our aggregators, whatever the grouping."""

import dataclasses
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff import grouped_fedavg, training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task


def _cfg(tmp_path, dp: DPConfig, **train) -> ExperimentConfig:
    base = dict(model="mlp", clients_per_round=5, client_sampling="uniform", client_epochs=2, client_batch_size=7,
                client_optimizer="sgdm", client_learning_rate=0.05, server_optimizer="sgdm",
                server_learning_rate=1.0, client_shuffle_buffer=5, client_max_examples=40, seed=3)
    base.update(train)
    return ExperimentConfig(
        task=TaskConfig(task="digits", num_clients=20), train=TrainConfig(**base), dp=dp,
        output_dir=str(tmp_path / "run"),
    ).validate()


def _train(cfg, data, rounds, cohorts):
    """Weights and per-round metrics after `rounds` rounds of `cfg`'s process."""
    metrics = []
    with training.client_files(cfg, data) as files:
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)
        for r in range(1, rounds + 1):
            out = process.next(state, training.round_input(cfg, data, cohorts[r - 1], r, files))
            state = out.state
            metrics.append(out.metrics)
        return [np.asarray(w) for w in process.get_model_weights(state).trainable], metrics


def _impl(cfg, impl, clients_per_call=0):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fedavg_impl=impl,
                                                              clients_per_call=clients_per_call))


COHORTS = [[0, 3, 5, 7, 9], [1, 2, 3, 11, 19], [4, 8, 12, 16, 18]]


@pytest.mark.parametrize(
    "dp",
    [
        DPConfig(mode="none", noise_multiplier=0.0),
        # Clipping binds (the deltas are larger than C); z = 1e-6 makes the noise negligible.
        DPConfig(mode="central", noise_multiplier=1e-6, clip_norm=0.05),
        DPConfig(mode="local", noise_multiplier=1e-6, clip_norm=0.05),
        DPConfig(mode="local", local_mechanism="laplace", noise_multiplier=1e-6, clip_norm=0.05),
    ],
    ids=["none", "central-clip", "local-gaussian-clip", "local-laplace-clip"],
)
def test_grouped_equals_tff_fedavg(tff_context, tmp_path, dp):
    """Three rounds, client and server momentum, 2 epochs with batches spanning them, a shuffle buffer."""
    cfg = _cfg(tmp_path, dp)
    data = load_task(cfg.task, cfg.train.seed)
    w_tff, m_tff = _train(_impl(cfg, "tff"), data, 3, COHORTS)
    w_grp, m_grp = _train(_impl(cfg, "grouped", clients_per_call=2), data, 3, COHORTS)
    assert not np.allclose(w_tff[0], _train(cfg, data, 0, [])[0][0])  # training moved the model
    for a, b in zip(w_tff, w_grp):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(m_tff, m_grp):
        ta, tb = a["client_work"]["train"], b["client_work"]["train"]
        if dp.mode == "local":
            # Local DP: no client statistic leaves a client in either implementation.
            assert len(ta) == len(tb) == 0
            # The query's metrics are its settings only (noise std or Laplace scale), nothing of the data.
            key = "noise_std" if dp.local_mechanism == "gaussian" else "laplace_scale"
            qa, qb = a["aggregator"]["dp_query_metrics"], b["aggregator"]["inner"]["dp_query_metrics"]
            assert set(qa) == set(qb) == {key} and float(qa[key]) == float(qb[key]) == pytest.approx(1e-6 * 0.05)
            assert "nonfinite_clients" not in a["aggregator"] and "nonfinite_clients" not in b["aggregator"]
            continue
        assert int(ta["num_examples"]) == int(tb["num_examples"]) == 5 * 2 * 40
        assert int(ta["num_batches"]) == int(tb["num_batches"]) == 5 * math.ceil(80 / 7)
        np.testing.assert_allclose(float(tb["loss"]), float(ta["loss"]), rtol=1e-4)
        np.testing.assert_allclose(float(tb["accuracy"]), float(ta["accuracy"]), rtol=1e-4)


def test_adaptive_clip_follows_the_same_path(tff_context, tmp_path):
    """Adaptive clipping with seeded noise: the same clip norms and model as TFF's DifferentiallyPrivateFactory."""
    dp = DPConfig(mode="central", noise_multiplier=0.3, clip_norm=0.05, adaptive_clipping=True,
                  clipped_count_stddev=1.0, noise_seed=7)
    cfg = _cfg(tmp_path, dp)
    data = load_task(cfg.task, cfg.train.seed)
    w_tff, m_tff = _train(_impl(cfg, "tff"), data, 3, COHORTS)
    w_grp, m_grp = _train(_impl(cfg, "grouped", clients_per_call=3), data, 3, COHORTS)
    clips_tff = [float(m["aggregator"]["inner"]["dp_query_metrics"]["clip"]) for m in m_tff]
    clips_grp = [float(m["aggregator"]["inner"]["dp_query_metrics"]["clip"]) for m in m_grp]
    np.testing.assert_allclose(clips_grp, clips_tff, rtol=1e-5)
    assert len(set(clips_grp)) == 3  # the clip did adapt
    for a, b in zip(w_tff, w_grp):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_grouping_does_not_change_the_result(tff_context, tmp_path):
    # Seeded noise: every grouping draws the same noise, so the results differ only by float summation
    # order. (Unseeded noise of std ~5e-8 against atol 1e-7 once failed 1 of 4,874 elements here.)
    cfg = _cfg(tmp_path, DPConfig(mode="central", noise_multiplier=1e-6, clip_norm=0.05, noise_seed=5))
    data = load_task(cfg.task, cfg.train.seed)
    results = [_train(_impl(cfg, "grouped", k), data, 2, COHORTS)[0] for k in (0, 1, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_noise_is_added_once_per_round_or_once_per_client(tff_context, tmp_path, mode):
    """m = 10 clients in 10 one-client groups, server SGD(lr=1), z = 30.

    central: the model moves by (sum of clipped updates + N(0, (zC)^2 I)) / m: std zC/m
    per coordinate (noise per group would make it sqrt(10) times larger). local: each
    client adds N(0, (zC)^2 I): std zC/sqrt(m). The signal is <= C/sqrt(d) per coordinate.
    """
    z, clip, m = 30.0, 0.05, 10
    cfg = _cfg(tmp_path, DPConfig(mode=mode, noise_multiplier=z, clip_norm=clip), clients_per_round=m,
               server_optimizer="sgd", clients_per_call=1)
    data = load_task(cfg.task, cfg.train.seed)
    before, _ = _train(cfg, data, 0, [])
    after, _ = _train(cfg, data, 1, [list(range(m))])
    move = np.concatenate([(b - a).ravel() for a, b in zip(before, after)])
    d = move.size
    expected = z * clip / (m if mode == "central" else math.sqrt(m))
    measured = float(np.sqrt(np.mean(move**2)))
    # Unseeded. Sample RMS of d normals: relative s.e. 1/sqrt(2d) (~0.5% for d ~ 4,800); 8 s.e. plus the
    # signal's share: failure probability P(|Z| > 8) < 1.3e-15 per case.
    tol = 8 / math.sqrt(2 * d) + (clip / math.sqrt(d)) / expected
    assert abs(measured / expected - 1) < tol, (measured, expected, tol)
    assert tol < 0.1  # far below the sqrt(10) of noise per group


def test_empty_round_leaves_the_model_and_reports_no_examples(tff_context, tmp_path):
    cfg = _cfg(tmp_path, DPConfig(mode="none", noise_multiplier=0.0), server_optimizer="sgd")
    data = load_task(cfg.task, cfg.train.seed)
    before, _ = _train(cfg, data, 0, [])
    after, metrics = _train(cfg, data, 1, [[]])
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(metrics[0]["client_work"]["train"]["num_examples"]) == 0
    assert int(metrics[0]["aggregator"]["nonfinite_clients"]) == 0


def test_split_groups():
    assert grouped_fedavg.split_groups(10, 0, 2) == [slice(0, 5), slice(5, 10)]
    assert grouped_fedavg.split_groups(10, 3, 2) == [slice(0, 2), slice(2, 5), slice(5, 8), slice(8, 10)]
    assert sorted(g.stop - g.start for g in grouped_fedavg.split_groups(1, 0, 2)) == [0, 1]
    assert grouped_fedavg.split_groups(0, 0, 2) == [slice(0, 0), slice(0, 0)]


def test_make_groups_pads_orders_and_writes_each_client_once(tmp_path):
    data = load_task(TaskConfig(task="synthetic", num_clients=4, synthetic_examples_per_client=6,
                                synthetic_input_dim=3), seed=0)
    orders = [np.array([2, 0, 1], np.int32), np.arange(5, dtype=np.int32)]
    files = grouped_fedavg.ClientFiles(data, str(tmp_path))
    (g,) = grouped_fedavg.make_groups(data, [3, 1], orders, [slice(0, 2)], files)
    assert g["client_ids"].tolist() == [3, 1] and g["lengths"].tolist() == [3, 5]
    assert g["orders"].tolist() == [[2, 0, 1, 0, 0], [0, 1, 2, 3, 4]]
    x, y = grouped_fedavg.client_arrays(tf.io.read_file(str(tmp_path / "3")), (3,))
    np.testing.assert_array_equal(x.numpy(), data.clients[3].x)
    np.testing.assert_array_equal(y.numpy(), data.clients[3].y)
    assert sorted(os.listdir(tmp_path)) == ["1", "3"]  # one file per client, only the cohort's
    (shipped,) = grouped_fedavg.make_groups(data, [3, 1], orders, [slice(0, 2)], None)
    assert shipped["x"].shape == (2, 6, 3) and "client_ids" not in shipped
    np.testing.assert_array_equal(shipped["x"][1], data.clients[1].x)


def _built(model_fn):
    """(model, number of model_fn calls, its variables' values) of `_overwritten_model`, in a graph as TFF traces it."""
    calls = []

    def counted():
        calls.append(1)
        return model_fn()

    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = grouped_fedavg._overwritten_model(counted)  # noqa: SLF001
        sess.run(tf.compat.v1.global_variables_initializer())
        return model, len(calls), sess.run(model.variables)


def test_a_group_calls_model_starts_at_zeros_unless_it_has_variables_a_client_does_not_overwrite():
    def dense():
        return tf.keras.Sequential([tf.keras.layers.Dense(4, input_shape=(3,)), tf.keras.layers.Dense(2)])

    _, calls, values = _built(dense)
    assert calls == 1 and len(values) == 4 and all(not v.any() for v in values)  # zeros, never drawn

    def with_a_stray_variable():
        tf.Variable(3.0, name="not_a_weight")  # not among the model's weights: a client would not overwrite it
        return dense()

    _, calls, values = _built(with_a_stray_variable)
    assert calls == 2  # built again as model_fn builds it: random initial values
    assert any(v.any() for v in values)


def test_the_state_a_round_returned_is_not_sent_back_unless_it_changed(tff_context, tmp_path, monkeypatch):
    import tensorflow_federated as tff

    from dpfl_tff import serialization

    cfg = _cfg(tmp_path, DPConfig(mode="none", noise_multiplier=0.0), server_optimizer="sgd")
    data = load_task(cfg.task, cfg.train.seed)
    sent = []
    serialize_into = serialization.serialize_into

    def counting(value, type_spec, target):
        if isinstance(type_spec, tff.FederatedType) and hasattr(value, "global_model_weights"):
            sent.append(value)  # a LearningAlgorithmState sent to the worker (at SERVER)
        return serialize_into(value, type_spec, target)

    monkeypatch.setattr(serialization, "serialize_into", counting)
    with training.client_files(cfg, data) as files:
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)

        def step(state, r):
            return process.next(state, training.round_input(cfg, data, COHORTS[r % 3], r, files)).state

        for r in range(1, 4):
            state = step(state, r)
            process.get_model_weights(state)  # other calls in between (evaluation rounds) do not matter
        assert len(sent) == 1  # the initial state; rounds 2 and 3 used the worker's copy
        kernel = state.global_model_weights.trainable[0]
        with pytest.raises(ValueError):
            kernel[0, 0] = 1.0  # read-only: it cannot change in place unnoticed
        zeroed = state.global_model_weights.trainable.copy()
        zeroed[0] = np.zeros_like(kernel)
        changed = state._replace(global_model_weights=state.global_model_weights._replace(trainable=zeroed))
        expected = process.set_model_weights(state, process.get_model_weights(changed))  # the same values, sent
        after_change = step(changed, 4)
        assert len(sent) == 2 and not sent[-1].global_model_weights.trainable[0].any()  # the changed state was sent
        after_expected = step(expected, 4)
        for a, b in zip(after_change.global_model_weights.trainable, after_expected.global_model_weights.trainable):
            np.testing.assert_array_equal(a, b)
        n = len(sent)
        state.global_model_weights.trainable[0] = np.full_like(kernel, 2.0)  # a leaf replaced in the same object
        step(state, 5)
        assert len(sent) == n + 1 and (sent[-1].global_model_weights.trainable[0] == 2.0).all()  # sent too


def test_a_python_if_in_a_subclassed_models_call_still_trains(tff_context, tmp_path):
    # The training loop is traced without autograph; Keras converts a subclassed model's `call` itself.
    cfg = _cfg(tmp_path, DPConfig(mode="none", noise_multiplier=0.0), model="tests.custom_models:subclassed_with_branch")
    data = load_task(cfg.task, cfg.train.seed)
    before, _ = _train(cfg, data, 0, [])
    after, metrics = _train(cfg, data, 1, COHORTS[:1])
    assert int(metrics[0]["client_work"]["train"]["num_examples"]) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_calls_per_round_follow_the_local_workers_cores(monkeypatch):
    import os

    for cores, calls in [({0}, 1), ({0, 1}, 2), (set(range(8)), 2)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: c)
        assert grouped_fedavg.calls_per_round(0) == calls
        assert grouped_fedavg.calls_per_round(3) == 3 * grouped_fedavg.CALLS_PER_WORKER  # remote: their cores unknown
