"""`emnist`: federated EMNIST (Caldas et al. 2018, LEAF) through TFF's loader.

`tff.simulation.datasets.emnist.load_data(only_digits, cache_dir=--data_dir)`
reads `emnist_all.sqlite` (split by writer: 3,383 clients with 10 digit
classes, or 3,400 clients with 62 classes). The central test set is every
client's test split. Pixels are 28x28 floats in [0, 1] (1.0 is background),
given a channel axis.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import FederatedData
from dpfl_tff.tasks.files import require_file
from dpfl_tff.tasks.tff_sqlite import LazyClients, all_clients_arrays, load_client_data

FILE = "emnist_all.sqlite"
# The (train, test) splits TFF's loader reads, by `only_digits`.
SPLITS = {True: ("digits_only_train", "digits_only_test"), False: ("all_train", "all_test")}
EXPECTED = 'expected TFF\'s EMNIST file, see docs/tasks-and-models.md "Tasks and data files"'
HOW_TO_GET = (
    "on a machine with internet, python -c \"import tensorflow_federated as tff; "
    "tff.simulation.datasets.emnist.load_data(cache_dir='DIR')\" writes DIR/emnist_all.sqlite "
    "(TFF downloads tff-datasets-public/emnist_all.sqlite.lzma from Google Cloud Storage and "
    "decompresses it); copy that file into --data_dir."
)


def _preprocess(example: collections.OrderedDict) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.expand_dims(example["pixels"], -1), tf.cast(example["label"], tf.int32)


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    del seed  # the client split is the data's own
    path = require_file("emnist", cfg.data_dir, FILE, HOW_TO_GET)
    splits = SPLITS[cfg.emnist_only_digits]
    train, test = load_client_data(
        path,
        lambda: tff.simulation.datasets.emnist.load_data(only_digits=cfg.emnist_only_digits, cache_dir=cfg.data_dir),
        splits,
        EXPECTED,
    )
    clients = LazyClients(train, _preprocess, path, splits[0], EXPECTED)
    clients[0]  # noqa: B018  (parse one training client now: a bad file fails here, not in round 1)
    classes = 10 if cfg.emnist_only_digits else 62
    return FederatedData(
        clients=clients,
        test=all_clients_arrays(test, _preprocess, path, splits[1], EXPECTED),
        input_shape=(28, 28, 1),
        num_classes=classes,
        description=f"EMNIST ({'digits' if cfg.emnist_only_digits else 'all 62 classes'}): {len(clients)} writers",
    )
