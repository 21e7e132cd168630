"""emnist / cifar100 / cifar10 through the real loaders on tiny files written in their exact formats."""

import json
import os

import numpy as np
import pytest

from dpfl_tff import training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import DataMissingError, load_task
from tests.conftest import run_driver
from tests.data_fixtures import write_cifar10_batches, write_cifar100_sqlite, write_emnist_sqlite

# One xdist worker runs this module (`--dist loadgroup`): its module fixture writes the task files, set up once.
pytestmark = pytest.mark.xdist_group("benchmark_tasks")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_emnist_sqlite(str(d), num_clients=4, examples_per_client=6)
    write_cifar100_sqlite(str(d), num_clients=4, examples_per_client=6)
    write_cifar10_batches(str(d), examples_per_batch=12)
    return str(d)


@pytest.mark.parametrize("only_digits, classes", [(True, 10), (False, 62)])
def test_emnist_loads_through_tff_loader(data_dir, only_digits, classes):
    data = load_task(TaskConfig(task="emnist", data_dir=data_dir, emnist_only_digits=only_digits), seed=0)
    assert data.num_clients == 4 and data.input_shape == (28, 28, 1) and data.num_classes == classes
    c = data.clients[2]
    assert c.x.shape == (6, 28, 28, 1) and c.x.dtype == np.float32 and c.y.dtype == np.int32
    assert data.clients[2] is c  # cached: loaded once
    assert len(data.test) == 4 * 6 and data.test.y.max() < classes


def test_cifar100_loads_with_crop_and_standardisation(data_dir):
    data = load_task(TaskConfig(task="cifar100", data_dir=data_dir), seed=0)
    assert data.num_clients == 4 and data.input_shape == (24, 24, 3) and data.num_classes == 100
    x = data.clients[0].x
    assert x.shape == (6, 24, 24, 3)
    # per_image_standardization: each image has mean 0 and std 1.
    np.testing.assert_allclose(x.reshape(6, -1).mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(x.reshape(6, -1).std(axis=1), 1, atol=1e-2)


def test_cifar10_dirichlet_split(data_dir):
    data = load_task(TaskConfig(task="cifar10", data_dir=data_dir, num_clients=5, partition="dirichlet",
                                dirichlet_alpha=0.5), seed=0)
    assert data.num_clients == 5 and data.input_shape == (32, 32, 3) and len(data.test) == 12
    assert sum(len(c) for c in data.clients) == 5 * 12


@pytest.mark.parametrize(
    "task, missing",
    [("emnist", "emnist_all.sqlite"), ("cifar100", "cifar100.sqlite"), ("cifar10", "cifar-10-batches-py")],
)
def test_missing_file_fails_fast_naming_file_and_folder(tmp_path, monkeypatch, task, missing):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"the loader tried the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # TFF's and Keras' downloads connect here
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataMissingError) as e:
        load_task(TaskConfig(task=task, data_dir=str(tmp_path)), seed=0)
    msg = str(e.value)
    assert missing in msg and str(tmp_path) in msg and f"--task={task}" in msg and "--data_dir" in msg


@pytest.mark.parametrize(
    "task, model, extra",
    [
        ("emnist", "emnist_cnn_dropout", {}),
        ("emnist", "emnist_2nn", {"emnist_only_digits": False}),
        ("cifar100", "cifar_cnn", {}),
        ("cifar10", "cifar_cnn", {"num_clients": 6, "partition": "dirichlet"}),
    ],
)
def test_two_rounds_on_each_task(data_dir, tmp_path, task, model, extra):
    cfg = ExperimentConfig(
        task=TaskConfig(task=task, data_dir=data_dir, **extra),
        train=TrainConfig(model=model, rounds=2, clients_per_round=2, client_sampling="uniform",
                          client_batch_size=4, eval_every=1),
        dp=DPConfig(noise_multiplier=0.5, clip_norm=1.0),
        output_dir=str(tmp_path / "run"),
    )
    result = training.run(cfg, log=lambda s: None)
    assert [r["round"] for r in result.records] == [1, 2]
    assert all(np.isfinite(r["test_loss"]) for r in result.records)
    hparams = json.load(open(tmp_path / "run" / "hparams.json"))
    if task != "cifar10":  # the data's own N, not --num_clients, is what was accounted
        assert hparams["task"]["num_clients"] == 4 and result.summary["rounds"] == 2
        assert result.records[0]["clients_this_round"] == 2


def test_driver_missing_data_is_one_line_and_fast(tmp_path, capsys):
    code = run_driver(["--task=emnist", f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'run'}",
                       "--clients_per_round=2"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --task=emnist: emnist_all.sqlite not found in --data_dir=")
    assert not (tmp_path / "run").exists()


def test_tutorial_flagfile_with_command_line_overrides(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_driver([f"--flagfile={ROOT}/configs/tff_dp_tutorial.cfg", f"--data_dir={data_dir}", "--rounds=2",
                       "--clients_per_round=2", "--noise_multiplier=0.15", f"--output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    hparams = json.load(open(out / "hparams.json"))
    # From the flagfile ...
    assert hparams["train"]["model"] == "emnist_2nn" and hparams["dp"]["adaptive_clipping"] is True
    assert hparams["train"]["client_shuffle_buffer"] == 418 and hparams["dp"]["target_delta"] == 1e-5
    # ... overridden on the command line; N is the data's (4 clients), not the flagfile's 3383.
    assert hparams["train"]["rounds"] == 2 and hparams["dp"]["noise_multiplier"] == 0.15
    assert hparams["task"]["num_clients"] == 4
    assert "has its own client split: N = 4 clients" in capsys.readouterr().out
