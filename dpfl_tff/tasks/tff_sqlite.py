"""Tasks read through TFF's own loaders (SQLite files of `tff.simulation.datasets`).

Clients are loaded lazily, once each (cached in memory), so a round costs only
its cohort's first visit: the file is never re-read per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from dpfl_tff.tasks.base import ClientArrays

Preprocess = Callable[[dict], tuple[tf.Tensor, tf.Tensor]]


def _to_arrays(ds: tf.data.Dataset, preprocess: Preprocess) -> ClientArrays:
    xs, ys = [], []
    for x, y in ds.map(preprocess).batch(4096):
        xs.append(x.numpy())
        ys.append(y.numpy())
    if not xs:
        raise ValueError("a client of the data file has no examples")
    return ClientArrays(np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32))


class LazyClients(Sequence):
    """Client i = client_ids[i] of a `tff.simulation.datasets.ClientData`, loaded on first use."""

    def __init__(self, client_data, preprocess: Preprocess):
        self._data = client_data
        self._ids = list(client_data.client_ids)
        self._preprocess = preprocess
        self._cache: dict[int, ClientArrays] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i not in self._cache:
            self._cache[i] = _to_arrays(self._data.create_tf_dataset_for_client(self._ids[i]), self._preprocess)
        return self._cache[i]


def all_clients_arrays(client_data, preprocess: Preprocess) -> ClientArrays:
    """Every example of every client, e.g. a central test set."""
    return _to_arrays(client_data.create_tf_dataset_from_all_clients(), preprocess)
