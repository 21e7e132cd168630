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

import numpy as np

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData, partition
from dpfl_tff.tasks.files import require_file

FOLDER = "cifar-10-batches-py"
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
HOW_TO_GET = (
    "Download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) on a machine with "
    "internet and unpack it into --data_dir (tar xzf cifar-10-python.tar.gz -C DATA_DIR)."
)


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    from keras.src.datasets.cifar import load_batch  # Keras' reader of the pickle format

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
