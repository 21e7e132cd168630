"""shakespeare / stackoverflow: TFF's preprocessing, streamed clients, the paper models, file errors, a short run.

The files are written in TFF's exact schema (`tests/data_fixtures.py`); the
references are TFF 0.87's own loaders and baselines preprocessing run on them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.simulation.baselines.shakespeare import char_prediction_preprocessing
from tensorflow_federated.python.simulation.baselines.stackoverflow import word_prediction_preprocessing

from dpfl_tff import paper_models
from dpfl_tff.config import TaskConfig
from dpfl_tff.errors import ConfigError, DataFileError, DataMissingError
from dpfl_tff.tasks import load_task, sqlite_stream
from tests.conftest import run_driver
from tests.data_fixtures import write_shakespeare_sqlite, write_stackoverflow_sqlite

# One xdist worker runs this module (`--dist loadgroup`): its module fixture writes the task files, set up once.
pytestmark = pytest.mark.xdist_group("text_tasks")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    write_shakespeare_sqlite(str(d), num_clients=4, snippets_per_client=3)
    write_stackoverflow_sqlite(str(d), num_clients=5, sentences_per_client=4, test_clients=4)
    return str(d)


def _tff_batches(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_shakespeare_is_tffs_preprocessing(data_dir):
    data = load_task(TaskConfig(task="shakespeare", data_dir=data_dir), seed=0)
    train, test = tff.simulation.datasets.shakespeare.load_data(cache_dir=data_dir)
    spec = tff.simulation.baselines.ClientSpec(num_epochs=1, batch_size=1000, shuffle_buffer_size=1)
    preprocess = char_prediction_preprocessing.create_preprocess_fn(spec, sequence_length=80)
    assert data.num_clients == len(train.client_ids) == 4
    for i, cid in enumerate(train.client_ids):
        x, y = _tff_batches(preprocess(train.create_tf_dataset_for_client(cid)))
        np.testing.assert_array_equal(data.clients[i].x, x.astype(np.float32))
        np.testing.assert_array_equal(data.clients[i].y, y)
        assert data.clients.sizes[i] == len(y)  # the sizes known without reading the client
    x, y = _tff_batches(preprocess(test.create_tf_dataset_from_all_clients(seed=0)))
    np.testing.assert_array_equal(data.test.y, y)
    # TFF's constants: 86 characters, pad 0, oov 87, bos 88, eos 89; 90 logits; windows of 80.
    assert len(char_prediction_preprocessing.CHAR_VOCAB) == 86
    assert char_prediction_preprocessing.get_special_tokens() == (0, 87, 88, 89)
    assert (data.num_classes, data.input_shape, data.label_shape) == (90, (80,), (80,))
    assert data.test_accuracies == {"": (0,)}
    assert np.any(data.clients[0].x == 88) and np.any(np.concatenate([c.y for c in data.clients]) == 87)


def test_stackoverflow_is_tffs_preprocessing(data_dir):
    data = load_task(TaskConfig(task="stackoverflow", data_dir=data_dir, eval_examples=10), seed=0)
    train, _, test = tff.simulation.datasets.stackoverflow.load_data(cache_dir=data_dir)
    vocab = [line.split()[0] for line in open(os.path.join(data_dir, "stackoverflow.word_count"))]
    spec = tff.simulation.baselines.ClientSpec(num_epochs=1, batch_size=1000, shuffle_buffer_size=1)
    preprocess = word_prediction_preprocessing.create_preprocess_fn(spec, vocab, sequence_length=20)
    assert data.num_clients == len(train.client_ids) == 5
    for i, cid in enumerate(train.client_ids):
        x, y = _tff_batches(preprocess(train.create_tf_dataset_for_client(cid)))
        np.testing.assert_array_equal(data.clients[i].x, x.astype(np.float32))
        np.testing.assert_array_equal(data.clients[i].y, y)
    # The evaluation sample: the first 10 examples of create_tf_dataset_from_all_clients(seed=0).
    x, y = _tff_batches(preprocess(test.create_tf_dataset_from_all_clients(seed=0).take(10)))
    np.testing.assert_array_equal(data.test.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.test.y, y)
    special = word_prediction_preprocessing.get_special_tokens(15, 1)  # the fixture's 15 words
    assert (special.padding, special.out_of_vocab, special.beginning_of_sentence, special.end_of_sentence) == (
        0, [16], 17, 18)
    assert (data.num_classes, data.input_shape, data.label_shape) == (19, (20,), (20,))
    assert data.test_accuracies == {"": (0, 16, 18), "with_oov_eos": (0,)}
    assert load_task(TaskConfig(task="stackoverflow", data_dir=data_dir, eval_examples=0), 0).test.y.shape == (16, 20)


def test_paper_models_have_the_published_layer_sizes():
    # Shakespeare (McMahan et al. 2017; TFF's char_prediction_models): embedding 8, two LSTM(256), dense 90.
    m = paper_models.shakespeare_lstm((80,), 90)
    kinds = [(type(layer).__name__, getattr(layer, "units", None) or getattr(layer, "output_dim", None))
             for layer in m.layers]
    assert kinds == [("Embedding", 8), ("LSTM", 256), ("LSTM", 256), ("Dense", 90)]
    assert m.output_shape == (None, 80, 90) and m.count_params() == 820_522
    # Stack Overflow (Reddi et al. 2020; TFF's word_prediction_models): embedding 96, LSTM(670), dense 96, dense 10,004.
    m = paper_models.stackoverflow_lstm((20,), 10_004)
    kinds = [(type(layer).__name__, getattr(layer, "units", None) or getattr(layer, "output_dim", None))
             for layer in m.layers[1:]]
    assert kinds == [("Embedding", 96), ("LSTM", 670), ("Dense", 96), ("Dense", 10_004)]
    assert m.output_shape == (None, 20, 10_004) and m.count_params() == 4_050_748


def test_clients_are_streamed_from_an_index(data_dir, tmp_path, monkeypatch):
    """Only ids and counts in memory; a client read returns its rows only; an interrupted index build resumes."""
    path = shutil.copy(os.path.join(data_dir, "stackoverflow.sqlite"), tmp_path / "stackoverflow.sqlite")
    shutil.copy(os.path.join(data_dir, "stackoverflow.word_count"), tmp_path)
    full = sqlite_stream.ClientIndex(str(path), ("train", "test"), "x", log=lambda _: None)
    want = full.counts("train")
    os.remove(full.index_path)
    monkeypatch.setattr(sqlite_stream, "_SCAN_BATCH", 5)
    monkeypatch.setattr(sqlite_stream, "PROGRESS_SECONDS", 0.0)  # a progress line after every committed batch

    def stop_at_first_progress(line):  # the build is stopped (e.g. Ctrl-C) after its first 5 rows
        if line.endswith("%)"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sqlite_stream.ClientIndex(str(path), ("train", "test"), "x", log=stop_at_first_progress)
    lines = []
    resumed = sqlite_stream.ClientIndex(str(path), ("train", "test"), "x", log=lines.append)
    assert any("resuming its per-client index at row" in line for line in lines), lines
    assert resumed.counts("train") == want
    data = load_task(TaskConfig(task="stackoverflow", data_dir=str(tmp_path)), seed=0)
    assert isinstance(data.clients, sqlite_stream.StreamedClients) and list(data.clients.sizes) == [4] * 5
    assert len(resumed.rows("train", data.clients.client_id(3))) == 4
    # The local worker's client files hold one cohort at a time (not every client ever sampled).
    from dpfl_tff import process
    from dpfl_tff.config import ExperimentConfig

    cfg = ExperimentConfig(task=TaskConfig(task="stackoverflow", data_dir=str(tmp_path)))
    with process.client_files(cfg, data) as files:
        process.round_input(cfg, data, [0, 2], 1, files)
        process.round_input(cfg, data, [2, 4], 2, files)
        assert sorted(os.listdir(files.root)) == ["2", "4"]


def _copy(data_dir, tmp_path, name):
    for f in os.listdir(data_dir):
        if not f.endswith(".index.sqlite"):
            shutil.copy(os.path.join(data_dir, f), tmp_path)
    return str(tmp_path / name)


@pytest.mark.parametrize("task,name", [("shakespeare", "shakespeare.sqlite"), ("stackoverflow", "stackoverflow.sqlite")])
def test_bad_files_are_named_with_the_fix(data_dir, tmp_path, task, name):
    path = _copy(data_dir, tmp_path, name)
    cfg = TaskConfig(task=task, data_dir=str(tmp_path))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataFileError, match=rf"{name}: truncated: .* bytes, its header says"):
        load_task(cfg, 0)
    open(path, "wb").write(b"not a database at all" * 10)
    with pytest.raises(DataFileError, match=rf"{name}: not an SQLite database \(expected TFF's"):
        load_task(cfg, 0)
    open(path, "wb").close()
    with pytest.raises(DataFileError, match=rf"{name}: empty file"):
        load_task(cfg, 0)
    os.remove(path)
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB);"
                      "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT);")
    con.close()
    with pytest.raises(DataFileError, match="table client_metadata lacks column.s. num_examples"):
        load_task(cfg, 0)
    os.remove(path)
    with pytest.raises(DataMissingError, match=rf"--task={task}: {name} not found in --data_dir=.*--download"):
        load_task(cfg, 0)


def test_inconsistent_counts_and_wrong_features_are_refused(data_dir, tmp_path):
    path = _copy(data_dir, tmp_path, "stackoverflow.sqlite")
    con = sqlite3.connect(path)
    with con:
        con.execute("DELETE FROM examples WHERE rowid = (SELECT max(rowid) FROM examples WHERE split_name = 'train')")
    con.close()
    with pytest.raises(DataFileError, match="client '104': client_metadata says 4 examples, the examples table holds 3"):
        load_task(TaskConfig(task="stackoverflow", data_dir=str(tmp_path)), 0)
    # A Shakespeare file under the Stack Overflow name: its examples have no `tokens`.
    shutil.copy(os.path.join(data_dir, "shakespeare.sqlite"), path)
    with pytest.raises(DataFileError, match=r"split 'train', client .*: examples cannot be read .*tokens"):
        load_task(TaskConfig(task="stackoverflow", data_dir=str(tmp_path)), 0)
    os.remove(os.path.join(tmp_path, "stackoverflow.word_count"))
    with pytest.raises(DataMissingError, match="stackoverflow.word_count not found"):
        load_task(TaskConfig(task="stackoverflow", data_dir=str(tmp_path)), 0)


def test_image_models_are_refused_for_text_tasks():
    from dpfl_tff.config import ExperimentConfig, TrainConfig

    with pytest.raises(ConfigError, match="--model=mlp: an image/feature model cannot take --task=shakespeare"):
        ExperimentConfig(task=TaskConfig(task="shakespeare"), train=TrainConfig(model="mlp")).validate()


def test_short_runs_train_and_report_the_masked_accuracies(data_dir, tmp_path):
    """Shakespeare under central DP and Stack Overflow under DP-FTRL, two rounds each, through the driver."""
    common = ["--model=tests.custom_models:tiny_text", "--rounds=2", "--clients_per_round=2", "--client_batch_size=4",
              "--eval_every=0", f"--data_dir={data_dir}"]
    out = tmp_path / "shakespeare"
    assert run_driver(["--task=shakespeare", "--dp_mode=central", f"--output_dir={out}", *common]) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["test_accuracy"] <= 1 and np.isfinite(last["test_loss"]) and last["round"] == 2
    out = tmp_path / "stackoverflow"
    assert run_driver(["--task=stackoverflow", "--dp_mode=ftrl", f"--output_dir={out}", *common]) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"test_accuracy", "test_accuracy_with_oov_eos"} <= set(last) and last["epsilon"] > 0
    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams["task"]["num_clients"] == 5 and hparams["train"]["client_sampling"] == "shuffle"
