"""What a task provides: federated client data, its spec, a central test set."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ClientArrays:
    """One client's examples, in memory."""

    x: np.ndarray  # float32, shape (n, *input_shape)
    y: np.ndarray  # int32, shape (n,)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """A federated data set held in memory.

    Attributes:
      clients: training data, one entry per client; the client id is the index.
      test: central held-out test set (never seen by any client).
      input_shape: shape of one example's features.
      num_classes: labels are integers in [0, num_classes).
      description: one line for logs and summaries.
    """

    clients: Sequence[ClientArrays]
    test: ClientArrays
    input_shape: tuple[int, ...]
    num_classes: int
    description: str

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def element_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """Spec of one batch: (features, labels)."""
        return (
            tf.TensorSpec([None, *self.input_shape], tf.float32),
            tf.TensorSpec([None], tf.int32),
        )

    def client_dataset(
        self,
        client_id: int,
        epochs: int,
        batch_size: int,
        shuffle_seed: int,
        shuffle_buffer: int = 0,
        max_examples: int = 0,
    ) -> tf.data.Dataset:
        """The client's local training stream, like TFF's baselines.

        First `max_examples` examples (0: all), shuffled with a buffer of
        `shuffle_buffer` (0: the whole client), repeated `epochs` times,
        batched.
        """
        c = self.clients[client_id]
        n = len(c) if max_examples <= 0 else min(len(c), max_examples)
        ds = tf.data.Dataset.from_tensor_slices((c.x[:n], c.y[:n]))
        buffer = n if shuffle_buffer <= 0 else min(shuffle_buffer, n)
        ds = ds.shuffle(max(buffer, 1), seed=shuffle_seed, reshuffle_each_iteration=True)
        return ds.repeat(epochs).batch(batch_size)


def split_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random equal shards (sizes differ by at most one)."""
    if num_clients > num_examples:
        raise ValueError(
            f"--num_clients={num_clients}: must be <= the {num_examples} training examples"
        )
    return np.array_split(rng.permutation(num_examples), num_clients)


def split_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each label's examples go to clients in Dir(alpha) shares.

    The standard non-IID benchmark split (Hsu et al. 2019, arXiv:1909.06335).
    Draws again until every client has at least `min_examples` examples.

    Raises:
      ValueError: if no such split was found in `max_tries` draws.
    """
    if num_clients * min_examples > labels.shape[0]:
        raise ValueError(
            f"--num_clients={num_clients}: must be <= the {labels.shape[0]} training examples"
        )
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.shape[0]).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_examples:
            return [rng.permutation(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(
        f"--dirichlet_alpha={alpha}: no split with >= {min_examples} example(s) per client "
        f"for {num_clients} clients in {max_tries} draws; raise --dirichlet_alpha or lower --num_clients"
    )


def partition(
    x: np.ndarray,
    y: np.ndarray,
    num_clients: int,
    scheme: str,
    alpha: float,
    rng: np.random.Generator,
) -> list[ClientArrays]:
    """Splits (x, y) into clients by `scheme` (`iid` or `dirichlet`)."""
    if scheme == "iid":
        shards = split_iid(y.shape[0], num_clients, rng)
    elif scheme == "dirichlet":
        shards = split_dirichlet(y, num_clients, alpha, rng)
    else:
        raise ValueError(f"--partition={scheme}: must be one of iid, dirichlet")
    return [ClientArrays(x[s], y[s]) for s in shards]
