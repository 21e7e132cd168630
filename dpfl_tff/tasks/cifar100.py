"""`cifar100`: federated CIFAR-100 (Reddi et al. 2020) through TFF's loader.

`tff.simulation.datasets.cifar100.load_data(cache_dir=--data_dir)` reads
`cifar100.sqlite` (500 train clients, 100 test clients, split by a
Pachinko allocation over the label hierarchy). Preprocessing as TFF's
`simulation.baselines.cifar100`: cast to float, central crop to 24x24
(`resize_with_crop_or_pad`), `per_image_standardization`.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import FederatedData
from dpfl_tff.tasks.files import require_file
from dpfl_tff.tasks.tff_sqlite import LazyClients, all_clients_arrays, load_client_data

FILE = "cifar100.sqlite"
SPLITS = ("train", "test")  # the splits TFF's loader reads
EXPECTED = 'expected TFF\'s CIFAR-100 file, see docs/tasks-and-models.md "Tasks and data files"'
CROP = (24, 24, 3)  # TFF baselines' DEFAULT_CROP_HEIGHT/WIDTH
HOW_TO_GET = (
    "on a machine with internet, python -c \"import tensorflow_federated as tff; "
    "tff.simulation.datasets.cifar100.load_data(cache_dir='DIR')\" writes DIR/cifar100.sqlite "
    "(TFF downloads tff-datasets-public/cifar100.sqlite.lzma from Google Cloud Storage and "
    "decompresses it); copy that file into --data_dir."
)


def _preprocess(example: collections.OrderedDict) -> tuple[tf.Tensor, tf.Tensor]:
    image = tf.image.resize_with_crop_or_pad(tf.cast(example["image"], tf.float32), CROP[0], CROP[1])
    return tf.image.per_image_standardization(image), tf.cast(example["label"], tf.int32)


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    del seed  # the client split is the data's own
    path = require_file("cifar100", cfg.data_dir, FILE, HOW_TO_GET)
    train, test = load_client_data(
        path, lambda: tff.simulation.datasets.cifar100.load_data(cache_dir=cfg.data_dir), SPLITS, EXPECTED
    )
    clients = LazyClients(train, _preprocess, path, SPLITS[0], EXPECTED)
    clients[0]  # noqa: B018  (parse one training client now: a bad file fails here, not in round 1)
    return FederatedData(
        clients=clients,
        test=all_clients_arrays(test, _preprocess, path, SPLITS[1], EXPECTED),
        input_shape=CROP,
        num_classes=100,
        description=f"CIFAR-100 (TFF split): {len(clients)} clients, 24x24 central crop",
    )
