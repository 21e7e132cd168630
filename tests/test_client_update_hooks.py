"""Client-update hooks (`client_hooks.py`): the seam where a client's delta is replaced or transformed before
the mechanism's `preprocess_record`; the canaries (`audit.canaries.CanaryHook`) are one."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff import config as C
from dpfl_tff import training
from dpfl_tff.client_hooks import ClientUpdateHook
from dpfl_tff.tasks import load_task

A, B = 3, 11  # two real clients of the 20


class SignHook(ClientUpdateHook):
    """Client c submits sign[c] x its trained delta; sign 0: the client has no data and is not trained."""

    def __init__(self, signs: dict[int, float]):
        self.signs = signs

    def group_fields(self):
        return [("sign", tff.TensorType(np.float32, (None,)))]

    def group_entries(self, client_ids):
        return {"sign": np.asarray([self.signs[int(c)] for c in client_ids], np.float32)}

    def has_data(self, client_id):
        return self.signs[int(client_id)] != 0

    def client_update(self, weights, group, i, train, stats):
        s = group["sign"][i]

        def trained():
            delta, new_stats = train()
            return [s * d for d in delta], new_stats

        return tf.cond(tf.not_equal(s, 0.0), trained, lambda: ([tf.zeros_like(w) for w in weights.trainable], stats))


def _cfg(tmp_path) -> C.ExperimentConfig:
    return C.ExperimentConfig(
        task=C.TaskConfig(task="digits", num_clients=20),
        train=C.TrainConfig(model="logistic", clients_per_round=2, client_sampling="uniform", client_epochs=1,
                            server_optimizer="sgd", server_learning_rate=1.0, seed=5),
        dp=C.DPConfig(mode="none"), output_dir=str(tmp_path / "run"),
    ).validate()


def _flat(process, state) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in process.get_model_weights(state).trainable])


def test_a_hook_replaces_or_transforms_each_clients_delta_and_adds_its_fields(tff_context, tmp_path):
    """No DP, server SGD at rate 1: a round moves the model by -mean(records). With f = that map (linear in the
    records): identity-by-hook == no hook; signs (1, -1) give D = f(x_A - x_B); (2, 2) give 2 S; (1, 0), where B
    has no data and submits zeros, gives f(x_A) = (S + D) / 2. A hook that did nothing would fail the D and 2 S
    checks; one that ran B's training anyway would fail the last."""
    cfg = _cfg(tmp_path)
    data = load_task(cfg.task, cfg.train.seed)
    plain = training.build_learning_process(cfg, data, None)
    state = training.initial_state(plain, cfg, data)
    w0 = _flat(plain, state)
    s = _flat(plain, plain.next(state, training.round_input(cfg, data, [A, B], 1)).state) - w0

    hook = SignHook({A: 1.0, B: 1.0})
    hooked = training.build_learning_process(cfg, data, None, client_hook=hook)
    state = training.initial_state(hooked, cfg, data)

    def move(signs):
        h = SignHook(signs)
        out = hooked.next(state, training.round_input(cfg, data, [A, B], 1, None, h))
        return _flat(hooked, out.state) - w0, out.metrics

    same, _ = move({A: 1.0, B: 1.0})
    diff, _ = move({A: 1.0, B: -1.0})
    double, _ = move({A: 2.0, B: 2.0})
    only_a, metrics = move({A: 1.0, B: 0.0})
    assert np.abs(s).max() > 1e-3  # the round moved the model
    np.testing.assert_allclose(same, s, atol=1e-6)
    np.testing.assert_allclose(double, 2 * s, atol=1e-6)
    assert np.abs(diff - s).max() > 1e-3
    np.testing.assert_allclose(only_a, (s + diff) / 2, atol=1e-6)
    assert int(metrics["client_work"]["train"]["num_examples"]) == len(data.client_order(A, 1, 0))
