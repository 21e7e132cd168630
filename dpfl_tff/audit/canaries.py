"""The canaries' directions: unit vectors over all trainable weights, from a secret per-run seed (TensorFlow).

Canary k's direction is `tf.random.stateless_normal([d], seed=(canary_seed, k))`
normalised to norm 1 and split into the trainable tensors' shapes. Stateless:
the worker computes it inside the round's computation (nothing is shipped),
and the auditor recomputes the same values on the host. Indices 0..K-1 are
the inserted canaries (clients N..N+K-1 of the population); K..2K-1 the
held-out ones, never inserted, from the same generator.

A canary's update is its direction times `update_norm(cfg)` and then goes
through the mechanism's `preprocess_record` like any client's: clipped (and
under local DP noised) at the client, so it reaches the sum at the clip norm.
`CanaryHook` puts them into the grouped process as a client-update hook.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from dpfl_tff.client_hooks import ClientUpdateHook
from dpfl_tff.config import ExperimentConfig

# Adaptive clipping moves the clip: a canary this many times the initial clip is clipped to whatever it is.
_ADAPTIVE_OVERSCALE = 1e4


def new_seed() -> int:
    """A fresh secret canary seed (OS entropy, 62 bits)."""
    return secrets.randbits(62)


def update_norm(cfg: ExperimentConfig) -> float:
    """Norm of a canary's update before `preprocess_record` clips it: the clip (the clip x 1e4 when adaptive).

    Without DP (--dp_mode=none) nothing clips: the canary has norm --clip_norm.
    """
    from dpfl_tff.privacy import registry

    if cfg.dp.adaptive_clipping and registry.mechanism_class(cfg).provides_dp:
        return cfg.dp.clip_norm * _ADAPTIVE_OVERSCALE
    return cfg.dp.clip_norm


def direction(seed, index, shapes: Sequence[Sequence[int]]) -> list[tf.Tensor]:
    """Canary `index`'s unit direction, one tensor per shape (graph or eager: the same values)."""
    sizes = [int(np.prod(s)) for s in shapes]
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
    v = tf.random.stateless_normal([sum(sizes)], seed=key, dtype=tf.float32, alg="philox")
    v = v / tf.norm(v)
    return [tf.reshape(part, s) for part, s in zip(tf.split(v, sizes), shapes)]


def directions(seed: int, indices: Sequence[int], shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """The unit directions of canaries `indices`, flattened: an array (len(indices), d) of float32."""
    rows = [tf.concat([tf.reshape(t, [-1]) for t in direction(seed, i, shapes)], 0).numpy() for i in indices]
    d = int(sum(np.prod(s) for s in shapes))
    return np.stack(rows) if rows else np.zeros((0, d), np.float32)


class CanaryHook(ClientUpdateHook):
    """The canary clients as a client-update hook (`client_hooks.py`) of the grouped process.

    Ids >= `num_real` are canaries (canary k is client num_real + k): they have
    no examples, and instead of local training submit `direction(seed, k)`
    times `norm`, which then goes through the mechanism's `preprocess_record`
    (clip, local noise) like any update; they add nothing to the training
    statistics. Each group lists `canaries`: the canary's index, -1 for a real client.
    """

    def __init__(self, seed: int, norm: float, num_real: int):
        self.seed, self.norm, self.num_real = int(seed), float(norm), int(num_real)

    def group_fields(self):
        import tensorflow_federated as tff

        return [("canaries", tff.TensorType(np.int32, (None,)))]

    def group_entries(self, client_ids):
        ids = np.asarray(client_ids)
        return {"canaries": np.where(ids >= self.num_real, ids - self.num_real, -1).astype(np.int32)}

    def has_data(self, client_id):
        return int(client_id) < self.num_real

    def client_update(self, weights, group, i, train, stats):
        index = group["canaries"][i]

        def canary():
            shapes = [w.shape for w in weights.trainable]
            return [self.norm * d for d in direction(self.seed, index, shapes)], stats

        return tf.cond(index >= 0, canary, train)


def hook_for(cfg: ExperimentConfig, seed: int | None, num_real: int) -> CanaryHook | None:
    """The run's canary hook (`--canary_clients`, with the run's secret `seed`), or None without canaries."""
    if not cfg.canary_clients or seed is None:
        return None
    return CanaryHook(seed, update_norm(cfg), num_real)
