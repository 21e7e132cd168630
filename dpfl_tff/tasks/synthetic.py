"""`synthetic`: a learnable generated classification problem of any size.

Features are standard normal; labels are the argmax of a fixed random linear
map plus noise, so a model can learn them. For tests and benchmarks.
"""

from __future__ import annotations

import numpy as np

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData


def _draw(n: int, w: np.ndarray, rng: np.random.Generator) -> ClientArrays:
    x = rng.standard_normal((n, w.shape[0]), dtype=np.float32)
    logits = x @ w + 0.5 * rng.standard_normal((n, w.shape[1]))
    return ClientArrays(x, np.argmax(logits, axis=1).astype(np.int32))


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    rng = np.random.default_rng([seed, 2])
    d, k, n = cfg.synthetic_input_dim, cfg.synthetic_num_classes, cfg.synthetic_examples_per_client
    w = rng.standard_normal((d, k)).astype(np.float32)
    clients = [_draw(n, w, rng) for _ in range(cfg.num_clients)]
    n_test = max(int(round(cfg.test_fraction * n * cfg.num_clients)), k)
    return FederatedData(
        clients=clients,
        test=_draw(n_test, w, rng),
        input_shape=(d,),
        num_classes=k,
        description=f"synthetic: {cfg.num_clients} clients x {n} examples, dim {d}, {k} classes",
    )
