"""The data fixtures load offline through the real TFF / Keras loaders."""

from __future__ import annotations

import os
import pickle
import sqlite3

import numpy as np
import pytest
import tensorflow as tf

# Installs a TFF default context that raises on any computation call, so these
# tests also prove the loaders need no TFF execution context (and start no
# worker_binary).
import dpfl_tff.runtime  # noqa: F401
from keras.src.datasets.cifar import load_batch
from tensorflow_federated.python.simulation.datasets import cifar100, download, emnist

from tests.conftest import worker_pids
from tests.data_fixtures import (
    CIFAR100_FILENAME,
    CIFAR100_URL,
    EMNIST_FILENAME,
    EMNIST_URL,
    write_cifar10_batches,
    write_cifar100_sqlite,
    write_emnist_sqlite,
)


@pytest.fixture
def no_network(monkeypatch):
    """Makes any TFF dataset download fail immediately, recording the call."""
    calls = []

    def fake_fetch(origin, filename):
        calls.append((origin, filename))
        raise OSError(f"network disabled in tests: {origin}")

    monkeypatch.setattr(download, "_fetch_lzma_file", fake_fetch)
    return calls


def _own_workers() -> list[int]:
    """worker_binary processes started by this test process itself (conftest's worker_pids()
    also sees those of the drivers this session started)."""
    own = []
    for pid in worker_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == os.getpid():
            own.append(pid)
    return own


def _elements(client_data, client_id):
    return list(client_data.create_tf_dataset_for_client(client_id).as_numpy_iterator())


@pytest.mark.parametrize("only_digits", [True, False])
def test_emnist_fixture_loads_through_tff(tmp_path, no_network, only_digits):
    before = set(_own_workers())  # the session fixture `tff_context` may hold one
    path = write_emnist_sqlite(str(tmp_path), num_clients=3, examples_per_client=4, only_digits=only_digits)
    assert path == os.path.join(str(tmp_path), EMNIST_FILENAME) == str(tmp_path / "emnist_all.sqlite")

    train, test = emnist.load_data(only_digits=only_digits, cache_dir=str(tmp_path))
    assert no_network == []
    for cd in (train, test):
        assert len(cd.client_ids) == 3
        assert cd.client_ids == sorted(cd.client_ids)
        spec = cd.element_type_structure
        assert list(spec) == ["label", "pixels"]
        assert spec["label"] == tf.TensorSpec((), tf.int32)
        assert spec["pixels"] == tf.TensorSpec((28, 28), tf.float32)

    labels = []
    for cid in train.client_ids:
        elems = _elements(train, cid)
        assert len(elems) == 4
        for e in elems:
            assert e["pixels"].shape == (28, 28) and e["pixels"].dtype == np.float32
            assert 0.0 <= e["pixels"].min() and e["pixels"].max() <= 1.0
            assert e["label"].dtype == np.int32 and e["label"].shape == ()
            labels.append(int(e["label"]))
    if only_digits:
        assert all(0 <= y <= 9 for y in labels)
    else:
        assert all(0 <= y <= 61 for y in labels) and max(labels) >= 10

    # The serializable path used by TFF training (dataset_computation) works too.
    ds = train.serializable_dataset_fn(train.client_ids[0])
    assert len(list(ds)) == 4
    assert set(_own_workers()) - before == set()  # loading data starts no TFF worker


def test_emnist_one_file_serves_both_split_sets(tmp_path, no_network):
    path = write_emnist_sqlite(str(tmp_path))
    with sqlite3.connect(path) as con:
        splits = {r[0] for r in con.execute("SELECT DISTINCT split_name FROM examples")}
        meta = {r[0] for r in con.execute("SELECT DISTINCT split_name FROM client_metadata")}
    assert splits == meta == {"digits_only_train", "digits_only_test", "all_train", "all_test"}
    # Both calls work on the one file without rewriting it.
    emnist.load_data(only_digits=True, cache_dir=str(tmp_path))
    emnist.load_data(only_digits=False, cache_dir=str(tmp_path))
    assert no_network == []


def test_cifar100_fixture_loads_through_tff(tmp_path, no_network):
    before = set(_own_workers())  # the session fixture `tff_context` may hold one
    path = write_cifar100_sqlite(str(tmp_path), num_clients=3, examples_per_client=4)
    assert path == str(tmp_path / CIFAR100_FILENAME) == str(tmp_path / "cifar100.sqlite")

    train, test = cifar100.load_data(cache_dir=str(tmp_path))
    assert no_network == []
    for cd in (train, test):
        assert cd.client_ids == ["0", "1", "2"]
        spec = cd.element_type_structure
        assert list(spec) == ["coarse_label", "image", "label"]
        assert spec["image"] == tf.TensorSpec((32, 32, 3), tf.uint8)
        assert spec["label"] == tf.TensorSpec((), tf.int64)
        assert spec["coarse_label"] == tf.TensorSpec((), tf.int64)

    elems = _elements(test, "1")
    assert len(elems) == 4
    e = elems[0]
    assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
    assert 0 <= int(e["label"]) <= 99 and 0 <= int(e["coarse_label"]) <= 19
    assert int(e["coarse_label"]) == int(e["label"]) // 5
    assert set(_own_workers()) - before == set()  # loading data starts no TFF worker


def test_cifar10_batches_load_with_keras_load_batch(tmp_path):
    folder = write_cifar10_batches(str(tmp_path), examples_per_batch=10)
    assert folder == str(tmp_path / "cifar-10-batches-py")
    names = sorted(os.listdir(folder))
    assert names == ["batches.meta"] + [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = load_batch(os.path.join(folder, name))
        assert data.shape == (10, 3, 32, 32) and data.dtype == np.uint8
        assert len(labels) == 10 and all(0 <= y <= 9 for y in labels)
        xs.append(data)
        ys.extend(labels)
    # What keras.datasets.cifar10.load_data does after load_batch.
    x_train = np.concatenate(xs[:5]).transpose(0, 2, 3, 1)
    y_train = np.reshape(np.asarray(ys[:50], dtype="uint8"), (50, 1))
    x_test = xs[5].transpose(0, 2, 3, 1)
    assert x_train.shape == (50, 32, 32, 3) and x_test.shape == (10, 32, 32, 3)
    assert y_train.shape == (50, 1)

    # Channel-first layout: row 0 of the raw data = R plane, then G, then B.
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert raw[b"data"].shape == (10, 3072) and raw[b"data"].dtype == np.uint8
    np.testing.assert_array_equal(x_train[0, :, :, 1], raw[b"data"][0, 1024:2048].reshape(32, 32))


def test_missing_tff_file_goes_to_download(tmp_path, no_network):
    """With no cached file the loaders call download._fetch_lzma_file(URL, path)."""
    cache = tmp_path / "cache"  # does not exist yet; get_compressed_file creates it
    with pytest.raises(OSError, match="network disabled"):
        emnist.load_data(only_digits=True, cache_dir=str(cache))
    with pytest.raises(OSError, match="network disabled"):
        cifar100.load_data(cache_dir=str(cache))
    assert no_network == [
        (EMNIST_URL, str(cache / "emnist_all.sqlite")),
        (CIFAR100_URL, str(cache / "cifar100.sqlite")),
    ]
    assert cache.is_dir() and os.listdir(cache) == []


def test_missing_tff_file_urlopen_failure_leaves_no_file(tmp_path, monkeypatch):
    """Lower level: the real _fetch_lzma_file calls urllib.request.urlopen(URL)."""
    import urllib.error
    import urllib.request

    opened = []

    def fake_urlopen(url, *args, **kwargs):
        opened.append((url, args, kwargs))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(urllib.error.URLError):
        emnist.load_data(cache_dir=str(tmp_path))
    # Called with the URL only: no timeout argument, so a real stalled
    # connection would block indefinitely.
    assert opened == [(EMNIST_URL, (), {})]
    assert not (tmp_path / "emnist_all.sqlite").exists()
