"""`cifar10`: CIFAR-10 from Keras' python pickle batches, split by a Dirichlet label partition.

Reads `--data_dir/cifar-10-batches-py/data_batch_1..5` and `test_batch`
(the archive cifar-10-python.tar.gz of Krizhevsky's site, unpacked) with
Keras' own `load_batch`. The 50,000 training images are split into
`--num_clients` clients by `--partition` (default for this benchmark:
`dirichlet` with `--dirichlet_alpha`, Hsu et al. 2019); the 10,000 test images
are the central test set. Pixels are scaled to [0, 1] and normalised with the
CIFAR-10 channel means and standard deviations.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData, partition
from dpfl_tff.tasks.files import DataFileError, require_file

FOLDER = "cifar-10-batches-py"
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
HOW_TO_GET = (
    "download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) on a machine with "
    "internet and unpack it into --data_dir (tar xzf cifar-10-python.tar.gz -C DATA_DIR)."
)
EXPECTED = (
    "expected a CIFAR-10 python batch: a pickled dict with b'data', a uint8 array of N x 3072, "
    'and b\'labels\', N labels in 0-9; see docs/tasks-and-models.md "Tasks and data files"'
)


def _check_batch(path: str) -> None:
    """Raises DataFileError unless `path` holds what Keras' `load_batch` expects of a CIFAR-10 batch.

    `load_batch` would fail with a bare pickle, key or reshape error, or,
    given uint8 arrays of 3,072 values per image in another layout or labels
    that do not match, return wrong data without any error.
    """
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: empty file ({EXPECTED})")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # as load_batch reads it
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  (unpickling other content can raise almost anything)
        raise DataFileError(f"{path}: not a pickle ({type(e).__name__}: {' '.join(str(e).split())}) ({EXPECTED})") from e

    def bad(problem: str) -> DataFileError:
        return DataFileError(f"{path}: {problem} ({EXPECTED})")

    if not isinstance(batch, dict):
        raise bad(f"holds a {type(batch).__name__}, not a dict")
    keys = list(batch)
    if not all(isinstance(k, bytes) for k in keys):
        raise bad(f"keys must be bytes, found {', '.join(repr(k) for k in keys)}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise bad(f"no {key!r} entry")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray):
        raise bad(f"b'data' is a {type(data).__name__}, not a numpy array")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] == 0:
        raise bad(f"b'data' is a {data.dtype} array of shape {data.shape}, not N x 3072 uint8")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError):  # e.g. a ragged list
        raise bad("b'labels' is not a list of integers") from None
    if labels.ndim != 1:
        raise bad(f"b'labels' has shape {labels.shape}, not a list of N labels")
    if labels.shape[0] != data.shape[0]:
        raise bad(f"{labels.shape[0]} labels for {data.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise bad(f"labels are not integers ({labels.dtype})")
    if labels.min() < 0 or labels.max() > 9:
        raise bad(f"labels outside 0-9 (min {labels.min()}, max {labels.max()})")


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    from keras.src.datasets.cifar import load_batch  # Keras' reader of the pickle format

    _check_batch(path)
    x, y = load_batch(path)
    x = (x.transpose(0, 2, 3, 1).astype(np.float32) / 255.0 - MEAN) / STD
    return x, np.asarray(y, np.int32).reshape(-1)


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    folder = require_file("cifar10", cfg.data_dir, FOLDER, HOW_TO_GET)
    files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)] + [os.path.join(folder, "test_batch")]
    for f in files:
        if not os.path.isfile(f):
            require_file("cifar10", cfg.data_dir, os.path.join(FOLDER, os.path.basename(f)), HOW_TO_GET)
    parts = [_read(f) for f in files[:5]]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read(files[5])
    rng = np.random.default_rng([seed, 3])
    clients = partition(x, y, cfg.num_clients, cfg.partition, cfg.dirichlet_alpha, rng, "cifar10")
    split = "iid" if cfg.partition == "iid" else f"dirichlet(alpha={cfg.dirichlet_alpha})"
    return FederatedData(
        clients=clients,
        test=ClientArrays(x_test, y_test),
        input_shape=(32, 32, 3),
        num_classes=10,
        description=f"CIFAR-10: {y.shape[0]} train images over {cfg.num_clients} clients ({split}), {y_test.shape[0]} test",
    )
