"""`digits`: scikit-learn's bundled handwritten digits, split into clients.

1,797 real 8x8 grey-scale digits (UCI optdigits test set) that ship inside
scikit-learn, so this task runs offline. Pixels are scaled to [0, 1]; a
stratified `test_fraction` is held out centrally; the rest is split into
`num_clients` clients, IID or by a Dirichlet label partition.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData, partition


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]  # (n, 8, 8, 1)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=seed
    )
    rng = np.random.default_rng([seed, 1])
    clients = partition(x_train, y_train, cfg.num_clients, cfg.partition, cfg.dirichlet_alpha, rng, "digits")
    split = "iid" if cfg.partition == "iid" else f"dirichlet(alpha={cfg.dirichlet_alpha})"
    return FederatedData(
        clients=clients,
        test=ClientArrays(x_test, y_test),
        input_shape=(8, 8, 1),
        num_classes=10,
        description=(
            f"sklearn digits: {y_train.shape[0]} train examples over {cfg.num_clients} "
            f"clients ({split}), {y_test.shape[0]} test"
        ),
    )
