"""What a task provides: federated client data, its spec, a central test set."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np

from dpfl_tff.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf  # imported where a dataset or spec is made: loading a task needs no TensorFlow


@dataclasses.dataclass(frozen=True)
class ClientArrays:
    """One client's examples, in memory."""

    x: np.ndarray  # float32, shape (n, *input_shape)
    y: np.ndarray  # int32, shape (n,), or (n, *label_shape) for sequence labels (text tasks)

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
      description: one line for logs and summaries (custom tasks: generated when empty).
      label_shape: shape of one example's labels: () for a class label, (L,) for a
        sequence of L next tokens (the text tasks: logits of shape (L, num_classes)).
      test_accuracies: extra test metrics, `test_<name>` = accuracy over the label
        positions whose true token is not in the tuple (the text tasks' masked
        accuracies, TFF baselines' `MaskedCategoricalAccuracy`); `""` names
        `test_accuracy` itself. Empty: plain accuracy.
    """

    clients: Sequence[ClientArrays]
    test: ClientArrays
    input_shape: tuple[int, ...]
    num_classes: int
    description: str = ""
    label_shape: tuple[int, ...] = ()
    test_accuracies: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_size(self, client_id: int) -> int:
        """Examples of client `client_id`; a streamed task (`clients.sizes`) answers without reading the client."""
        sizes = getattr(self.clients, "sizes", None)
        return int(sizes[client_id]) if sizes is not None else len(self.clients[client_id])

    @property
    def element_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """Spec of one batch: (features, labels)."""
        import tensorflow as tf

        return (
            tf.TensorSpec([None, *self.input_shape], tf.float32),
            tf.TensorSpec([None, *self.label_shape], tf.int32),
        )

    def client_order(
        self, client_id: int, epochs: int, shuffle_seed: int, shuffle_buffer: int = 0, max_examples: int = 0
    ) -> np.ndarray:
        """Indices of the client's examples in the order local training visits them.

        First `max_examples` examples (0: all), shuffled with a buffer of
        `shuffle_buffer` (0: the whole client), reshuffled for each of the
        `epochs` passes; deterministic in `shuffle_seed`.
        """
        n = self.client_size(client_id)
        n = n if max_examples <= 0 else min(n, max_examples)
        return shuffle_order(n, epochs, shuffle_seed, shuffle_buffer)

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

        The examples in `client_order`'s order (epochs concatenated), batched:
        a batch may span two epochs, as with `dataset.repeat(epochs).batch(b)`.
        """
        c = self.clients[client_id]
        order = self.client_order(client_id, epochs, shuffle_seed, shuffle_buffer, max_examples)
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices((c.x[order], c.y[order])).batch(batch_size)


def shuffle_order(n: int, epochs: int, seed: int, buffer: int = 0) -> np.ndarray:
    """`epochs` shuffled passes over range(n), concatenated (int32).

    `buffer` <= 0 or >= n: a uniform random permutation per pass. Otherwise
    the buffered shuffle of `tf.data.Dataset.shuffle(buffer)`: the buffer
    holds the next `buffer` items, each output is a uniform draw from it, and
    its slot is refilled with the next item.
    """
    rng = np.random.default_rng(seed)
    passes = []
    for _ in range(epochs):
        if buffer <= 0 or buffer >= n:
            passes.append(rng.permutation(n))
            continue
        slots = list(range(buffer))
        following = buffer
        out = np.empty(n, np.int64)
        for k, u in enumerate(rng.random(n)):
            j = int(u * len(slots))
            out[k] = slots[j]
            if following < n:
                slots[j] = following
                following += 1
            else:
                slots[j] = slots[-1]
                slots.pop()
        passes.append(out)
    return np.concatenate(passes).astype(np.int32) if passes else np.zeros(0, np.int32)


def split_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random equal shards (sizes differ by at most one)."""
    if num_clients > num_examples:
        raise ConfigError(f"--num_clients={num_clients}: must be <= the {num_examples} training examples")
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
    Draws again until every client has at least `min_examples` examples; a
    draw's client sizes are checked before its shards are built, so giving up
    after `max_tries` draws stays fast for many clients.

    Raises:
      ConfigError: if no such split was found in `max_tries` draws.
    """
    if num_clients * min_examples > labels.shape[0]:
        raise ConfigError(f"--num_clients={num_clients}: must be <= the {labels.shape[0]} training examples")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts = []
        sizes = np.zeros(num_clients, np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.shape[0]).astype(int)
            sizes += np.diff(np.concatenate(([0], np.clip(cuts, 0, idx.shape[0]), [idx.shape[0]])))
            parts.append((idx, cuts))
        if sizes.min() < min_examples:
            continue
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for idx, cuts in parts:
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
        return [rng.permutation(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ConfigError(
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
    task: str,
) -> list[ClientArrays]:
    """Splits the training examples (x, y) of `task` into clients by `scheme` (`iid` or `dirichlet`).

    Raises:
      ConfigError: if `num_clients` exceeds the examples, or no Dirichlet
        split gives every client an example.
    """
    if num_clients > y.shape[0]:
        raise ConfigError(
            f"--num_clients={num_clients}: must be <= {y.shape[0]}, the number of training examples of --task={task}"
        )
    if scheme == "iid":
        shards = split_iid(y.shape[0], num_clients, rng)
    elif scheme == "dirichlet":
        shards = split_dirichlet(y, num_clients, alpha, rng)
    else:
        raise ConfigError(f"--partition={scheme}: must be one of iid, dirichlet")
    return [ClientArrays(x[s], y[s]) for s in shards]
