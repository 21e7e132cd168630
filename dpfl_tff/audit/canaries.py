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
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

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
