"""A client whose update is NaN/Inf is zeroed before DP clipping, counted (not under local DP, where no
flag leaves a client), and the model stays finite."""

import numpy as np
import pytest

from dpfl_tff import training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task


@pytest.mark.parametrize("impl", ["grouped", "tff"])
@pytest.mark.parametrize("dp", [DPConfig(noise_multiplier=0.5, clip_norm=1.0),
                                DPConfig(mode="local", noise_multiplier=0.5, clip_norm=1.0),
                                DPConfig(mode="none", noise_multiplier=0.0)])
def test_nan_client_is_zeroed_and_counted(tff_context, tmp_path, dp, impl):
    cfg = ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=4, synthetic_examples_per_client=8, synthetic_input_dim=6),
        train=TrainConfig(model="logistic", clients_per_round=3, client_batch_size=8, client_learning_rate=0.5,
                          fedavg_impl=impl),
        dp=dp, output_dir=str(tmp_path),
    ).validate()
    data = load_task(cfg.task, 0)
    data.clients[1].x[0, 0] = np.nan  # client 1 diverges: its gradient, hence its update, is NaN
    data.clients[2].x[0, 0] = np.inf
    with training.client_files(cfg, data) as files:
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)
        out = process.next(state, training.round_input(cfg, data, (0, 1, 2, 3), 1, files))
    if dp.mode == "local":
        assert "nonfinite_clients" not in out.metrics["aggregator"]
    else:
        assert int(out.metrics["aggregator"]["nonfinite_clients"]) == 2
    weights = process.get_model_weights(out.state).trainable
    assert all(np.all(np.isfinite(np.asarray(w))) for w in weights)
    assert not np.allclose(np.asarray(weights[0]), np.asarray(process.get_model_weights(state).trainable[0]))
