"""Bad data and data-dependent flag values: one `error: ` line and exit code 2, never a traceback.

Each case runs the driver's `main` in-process (no TF import per case) and
checks the whole stderr line; one subprocess run checks the real exit path.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from dpfl_tff.config import ConfigError, TaskConfig
from dpfl_tff.tasks import DataFileError, load_task
from dpfl_tff.tasks.base import split_dirichlet
from experiments import run_federated
from tests.data_fixtures import (
    CIFAR10_DIRNAME,
    CIFAR100_FILENAME,
    EMNIST_FILENAME,
    write_cifar10_batches,
    write_cifar100_sqlite,
    write_emnist_sqlite,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_REF = 'see docs/tasks-and-models.md "Tasks and data files"'
EXPECTED = {
    "emnist": f"(expected TFF's EMNIST file, {DOCS_REF})",
    "cifar100": f"(expected TFF's CIFAR-100 file, {DOCS_REF})",
    "cifar10": (
        "(expected a CIFAR-10 python batch: a pickled dict with b'data', a uint8 array of N x 3072, "
        f"and b'labels', N labels in 0-9; {DOCS_REF})"
    ),
}
FILENAME = {"emnist": EMNIST_FILENAME, "cifar100": CIFAR100_FILENAME}


@pytest.fixture
def main_error(tmp_path, capsys):
    """Runs the driver's main on the flags; returns its one stderr line after checking exit code 2."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main installs its own

    def run(*args: str) -> str:
        out = tmp_path / "run"
        argv = ["run_federated", *args, f"--output_dir={out}", "--clients_per_round=2"]
        try:
            with flagsaver.flagsaver():
                flags.FLAGS.unparse_flags()
                flags.FLAGS(argv)
                with pytest.raises(SystemExit) as e:
                    run_federated.main(argv[:1])
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
        stdout, stderr = capsys.readouterr()
        assert e.value.code == 2, stderr
        assert stdout == ""  # nothing that suggests training started
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
        assert not out.exists()
        return stderr.rstrip("\n")

    return run


# --- flag values that the data cannot meet --------------------------------------


def test_driver_subprocess_too_many_clients_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run_federated", "--task=digits", "--num_clients=5000",
         f"--output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --num_clients=5000: must be <= 1437, the number of training examples of --task=digits\n"
    )
    assert proc.stdout == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_too_many_clients_digits(main_error, partition):
    # The bound is the training examples after the stratified test split: 1797 - 360 = 1437, or 1797 - 899.
    assert main_error("--task=digits", "--num_clients=1438", f"--partition={partition}") == (
        "error: --num_clients=1438: must be <= 1437, the number of training examples of --task=digits"
    )
    assert main_error("--task=digits", "--num_clients=1000", "--test_fraction=0.5") == (
        "error: --num_clients=1000: must be <= 898, the number of training examples of --task=digits"
    )


def test_too_many_clients_cifar10(main_error, tmp_path):
    write_cifar10_batches(str(tmp_path / "data"), examples_per_batch=12)
    assert main_error("--task=cifar10", f"--data_dir={tmp_path / 'data'}", "--num_clients=61") == (
        "error: --num_clients=61: must be <= 60, the number of training examples of --task=cifar10"
    )


def test_synthetic_has_no_bound_on_clients():
    # Each synthetic client draws its own examples: any --num_clients is met.
    data = load_task(TaskConfig(task="synthetic", num_clients=5000, synthetic_examples_per_client=1), seed=0)
    assert data.num_clients == 5000


def test_dirichlet_split_with_an_empty_client_names_the_flags(main_error):
    assert main_error("--task=digits", "--num_clients=100", "--partition=dirichlet", "--dirichlet_alpha=1e-4") == (
        "error: --dirichlet_alpha=0.0001: no split with >= 1 example(s) per client for 100 clients in 100 draws; "
        "raise --dirichlet_alpha or lower --num_clients"
    )


def test_dirichlet_alpha_too_small_for_numpy_is_refused(main_error):
    # numpy 1.25's Dirichlet sampler stalls (numpy/numpy#24203) on such values: refused before loading.
    assert main_error("--task=digits", "--partition=dirichlet", "--dirichlet_alpha=1e-12") == (
        "error: --dirichlet_alpha=1e-12: must be >= 1e-06 (numpy's Dirichlet sampler stalls below; "
        "at 1e-06 nearly all of a label's examples already go to one client)"
    )


def test_dirichlet_split_gives_up_quickly_and_keeps_its_draws(monkeypatch):
    # A failed draw is rejected on its client sizes, before any shard is built (building 5,000 clients'
    # shards 100 times took ~7 s of the failure).
    built = []
    real_split = np.split
    monkeypatch.setattr(np, "split", lambda *a, **k: built.append(1) or real_split(*a, **k))
    labels = np.random.default_rng(5).integers(0, 10, 50_000)
    with pytest.raises(ConfigError, match="no split with >= 1 example"):
        split_dirichlet(labels, 5000, 1e-4, np.random.default_rng(0))
    assert built == []
    # Successful splits are those of the earlier code (same draws, same order): digests taken before the change.
    labels = np.random.default_rng(5).integers(0, 10, 2000)
    for n, alpha, digest in [(30, 0.5, "31454ff15ed58406"), (50, 0.1, "682dc9fbcbfdec79"),
                             (20, 1000.0, "6659bb27fc891e9f"), (12, 0.01, "b2c0d63f40885e3d")]:
        shards = split_dirichlet(labels, n, alpha, np.random.default_rng(7))
        blob = b"".join(np.asarray(s, np.int64).tobytes() + b"|" for s in shards)
        assert hashlib.sha256(blob).hexdigest()[:16] == digest, (n, alpha)


# --- TFF SQLite files (emnist, cifar100) -----------------------------------------


def _sqlite(path: str, *ddl: str) -> None:
    con = sqlite3.connect(path)
    with con:
        for q in ddl:
            con.execute(q)
    con.close()


EXAMPLES_DDL = "CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)"
METADATA_DDL = "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples INTEGER)"
BAD_SQLITE = {
    "empty": (lambda p: open(p, "wb").close(), "empty file"),
    "text": (lambda p: open(p, "wb").write(b"not a database\n" * 20), "not an SQLite database"),
    "folder": (os.makedirs, "a folder, not a file"),
    "no_tables": (
        lambda p: _sqlite(p, "CREATE TABLE other (a INTEGER)"),
        "not in TFF's SQLite format: missing table(s) client_metadata, examples",
    ),
    "examples_columns": (
        lambda p: _sqlite(p, "CREATE TABLE examples (client_id TEXT, pixels BLOB)", METADATA_DDL),
        "not in TFF's SQLite format: table examples lacks column(s) serialized_example_proto, split_name",
    ),
    "metadata_columns": (
        lambda p: _sqlite(p, EXAMPLES_DDL, "CREATE TABLE client_metadata (id TEXT)"),
        "not in TFF's SQLite format: table client_metadata lacks column(s) client_id, split_name",
    ),
}


@pytest.mark.parametrize("task", ["emnist", "cifar100"])
@pytest.mark.parametrize("case", list(BAD_SQLITE))
def test_bad_sqlite_file(main_error, tmp_path, task, case):
    write, problem = BAD_SQLITE[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = os.path.join(str(data_dir), FILENAME[task])
    write(path)
    assert main_error(f"--task={task}", f"--data_dir={data_dir}") == f"error: {path}: {problem} {EXPECTED[task]}"


def test_other_tasks_sqlite_file_names_the_missing_split(main_error, tmp_path):
    data_dir = str(tmp_path / "data")
    os.rename(write_cifar100_sqlite(data_dir), os.path.join(data_dir, EMNIST_FILENAME))
    path = os.path.join(data_dir, EMNIST_FILENAME)
    assert main_error("--task=emnist", f"--data_dir={data_dir}") == (
        f"error: {path}: no clients in split 'digits_only_train'; splits found: test, train {EXPECTED['emnist']}"
    )
    os.rename(write_emnist_sqlite(data_dir), os.path.join(data_dir, CIFAR100_FILENAME))
    path = os.path.join(data_dir, CIFAR100_FILENAME)
    assert main_error("--task=cifar100", f"--data_dir={data_dir}") == (
        f"error: {path}: no clients in split 'train'; splits found: all_test, all_train, digits_only_test, "
        f"digits_only_train {EXPECTED['cifar100']}"
    )
    path = write_emnist_sqlite(data_dir)
    con = sqlite3.connect(path)
    with con:
        con.execute("DELETE FROM client_metadata WHERE split_name = 'all_test'")
    con.close()
    assert main_error("--task=emnist", f"--data_dir={data_dir}", "--noemnist_only_digits") == (
        f"error: {path}: no clients in split 'all_test'; splits found: all_train, digits_only_test, "
        f"digits_only_train {EXPECTED['emnist']}"
    )


@pytest.mark.parametrize(
    "split, where", [("digits_only_train", "split 'digits_only_train', client 'f0000_00'"),
                     ("digits_only_test", "split 'digits_only_test'")],
)
def test_examples_that_cannot_be_read(main_error, tmp_path, split, where):
    # Both are found before training: the test split is read whole, the first training client at once.
    data_dir = str(tmp_path / "data")
    path = write_emnist_sqlite(data_dir)
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE examples SET serialized_example_proto = x'0a0b0c' WHERE split_name = ?", (split,))
    con.close()
    assert main_error("--task=emnist", f"--data_dir={data_dir}") == (
        f"error: {path}: {where}: examples cannot be read (Could not parse example input) {EXPECTED['emnist']}"
    )


def test_client_without_examples(tmp_path):
    data_dir = str(tmp_path / "data")
    path = write_emnist_sqlite(data_dir, num_clients=3)
    con = sqlite3.connect(path)
    with con:
        con.execute("DELETE FROM examples WHERE client_id = 'f0002_02'")
    con.close()
    data = load_task(TaskConfig(task="emnist", data_dir=data_dir), seed=0)  # checks client 0 only
    with pytest.raises(DataFileError) as e:
        data.clients[2]
    assert str(e.value) == (
        f"{path}: split 'digits_only_train', client 'f0002_02': no examples {EXPECTED['emnist']}"
    )


# --- CIFAR-10 python batches ------------------------------------------------------

LABELS = [3] * 12
BAD_BATCH = {
    "empty": (b"", "empty file"),
    "text": (b"not a pickle\n", "not a pickle (UnpicklingError: invalid load key, 'n'.)"),
    "list": ([1, 2, 3], "holds a list, not a dict"),
    "str_keys": ({"data": np.zeros((12, 3072), np.uint8), "labels": LABELS}, "keys must be bytes, found 'data', 'labels'"),
    "no_labels": ({b"data": np.zeros((12, 3072), np.uint8)}, "no b'labels' entry"),
    "no_data": ({b"labels": LABELS}, "no b'data' entry"),
    "data_list": ({b"data": [[0] * 3072] * 12, b"labels": LABELS}, "b'data' is a list, not a numpy array"),
    "narrow": ({b"data": np.zeros((12, 100), np.uint8), b"labels": LABELS}, "b'data' is a uint8 array of shape (12, 100)"),
    "nhwc": ({b"data": np.zeros((12, 32, 32, 3), np.uint8), b"labels": LABELS},
             "b'data' is a uint8 array of shape (12, 32, 32, 3)"),
    "float": ({b"data": np.zeros((12, 3072)), b"labels": LABELS}, "b'data' is a float64 array of shape (12, 3072)"),
    "no_rows": ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, "b'data' is a uint8 array of shape (0, 3072)"),
    "few_labels": ({b"data": np.zeros((12, 3072), np.uint8), b"labels": LABELS[:5]}, "5 labels for 12 images"),
    "label_10": ({b"data": np.zeros((12, 3072), np.uint8), b"labels": [10] * 12}, "labels outside 0-9 (min 10, max 10)"),
    "label_ragged": ({b"data": np.zeros((12, 3072), np.uint8), b"labels": [1, [2, 3]] + [0] * 10},
                     "b'labels' is not a list of integers"),
    "label_2d": ({b"data": np.zeros((12, 3072), np.uint8), b"labels": [[3]] * 12},
                 "b'labels' has shape (12, 1), not a list of N labels"),
    "label_str": ({b"data": np.zeros((12, 3072), np.uint8), b"labels": ["cat"] * 12}, "labels are not integers (<U3)"),
}


@pytest.mark.parametrize("case", list(BAD_BATCH))
def test_bad_cifar10_batch(main_error, tmp_path, case):
    content, problem = BAD_BATCH[case]
    data_dir = tmp_path / "data"
    write_cifar10_batches(str(data_dir), examples_per_batch=12)
    name = "test_batch" if case == "float" else "data_batch_3"
    path = os.path.join(str(data_dir), CIFAR10_DIRNAME, name)
    with open(path, "wb") as f:
        if isinstance(content, bytes):
            f.write(content)
        else:
            pickle.dump(content, f, protocol=2)
    if "of shape" in problem:
        problem += ", not N x 3072 uint8"
    assert main_error("--task=cifar10", f"--data_dir={data_dir}", "--num_clients=5") == (
        f"error: {path}: {problem} {EXPECTED['cifar10']}"
    )
