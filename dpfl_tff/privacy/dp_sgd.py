"""Example-level DP-SGD step (TensorFlow): vectorized per-example clipping, float64 Gaussian noise on the sum.

One step of DP-SGD (Abadi et al. 2016, arXiv:1607.00133) on a batch chosen by
Poisson sampling at rate q = b / n of a client's n records: every example's
gradient (computed vectorized with `tf.vectorized_map`, not by microbatches of
one) is clipped to L2 norm `clip`, the clipped gradients are summed, Gaussian
noise of std `noise_multiplier * clip` is added to the sum in float64
(`privacy.sampler.add_noise`), and the result is divided by the expected batch
size b (a fixed denominator: dividing by the drawn size would leak it).
Accounted as `PoissonSampledDpEvent(q, GaussianDpEvent(z))` per step,
add-or-remove-one record (`privacy.events.example_level_client_event`).

The training loop runs it in every client with `--dp_level=example`
(`grouped_fedavg._GroupTrainer`, `privacy.example_level`).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from dpfl_tff.privacy import sampler


def per_example_gradients(model: tf.keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
    """Gradients of `loss_fn(y_i, model(x_i))` for each example i, stacked on a leading axis (vectorized)."""

    def one(xy):
        xi, yi = xy
        with tf.GradientTape() as tape:
            logits = model(xi[None], training=True)
            loss = loss_fn(yi[None], logits)
        return tape.gradient(loss, model.trainable_variables)

    return tf.vectorized_map(one, (x, y))


def clip_per_example(grads: list[tf.Tensor], clip: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Each example's gradient (over all variables jointly) scaled to L2 norm at most `clip`; returns also the norms."""
    sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g in grads])
    norms = tf.sqrt(sq)
    scale = tf.minimum(1.0, clip / tf.maximum(norms, 1e-30))
    clipped = [g * tf.reshape(tf.cast(scale, g.dtype), [-1] + [1] * (len(g.shape) - 1)) for g in grads]
    return clipped, norms


def poisson_mask(n: tf.Tensor, q: float, seed: tf.Tensor | None = None) -> tf.Tensor:
    """A boolean mask of length n, each record kept independently with probability q (Poisson sampling)."""
    u = (tf.random.stateless_uniform([n], seed=seed, dtype=tf.float64) if seed is not None
         else tf.random.uniform([n], dtype=tf.float64))
    return u < q


def clipped_sum(model: tf.keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor, clip: float) -> list[tf.Tensor]:
    """The sum over the batch of the clipped per-example gradients (zeros for an empty batch; graph-safe)."""

    def nonempty():
        clipped, _ = clip_per_example(per_example_gradients(model, loss_fn, x, y), clip)
        return [tf.reduce_sum(g, axis=0) for g in clipped]

    def empty():
        return [tf.zeros_like(v) for v in model.trainable_variables]

    return tf.cond(tf.shape(x)[0] > 0, nonempty, empty)


def noised_mean_gradient(model: tf.keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor, clip: float,
                         noise_multiplier: float, expected_batch: float, seed: tf.Tensor | None = None,
                         op_seed: int | None = None) -> list[tf.Tensor]:
    """The DP-SGD gradient of the (already Poisson-sampled) batch `x, y`: (sum of clipped + N(0, (z C)^2)) / b.

    Args:
      model, loss_fn: the Keras model and a loss taking (y, logits) returning a scalar (mean over a batch of one).
      x, y: the sampled batch (may be empty).
      clip: the per-example L2 clip norm C.
      noise_multiplier: z; the sum gets Gaussian noise of std z C, drawn in float64.
      expected_batch: b = q n, the fixed denominator.
      seed, op_seed: noise seeds, tests only.
    """
    summed = clipped_sum(model, loss_fn, x, y, clip)
    out = []
    for k, s in enumerate(summed):
        s_seed = None if seed is None else tf.cast(seed, tf.int64) + tf.constant([k, 0], tf.int64) * 104729
        s_op = None if op_seed is None else op_seed + k * sampler.TENSOR_SEED_STRIDE
        noised = sampler.add_noise(s, noise_multiplier * clip, seed=s_seed, op_seed=s_op)
        out.append(noised / tf.cast(expected_batch, s.dtype))
    return out


@dataclasses.dataclass(frozen=True)
class LocalDPSGD:
    """What a client's DP-SGD needs (`--dp_level=example`): C_ex, z_ex, the expected batch b, the epochs per round.

    A client of n records runs `epochs * ceil(n / b)` steps a round (`privacy.example_level.local_steps`).
    `noise_seed`: tests only (stateless noise and batches; no privacy).
    """

    clip: float
    noise_multiplier: float
    expected_batch: int
    epochs: int
    noise_seed: int | None = None


def local_dp_sgd_training(spec: LocalDPSGD, model: tf.keras.Model, loss_fn, optimizer, x: tf.Tensor, y: tf.Tensor,
                          n: tf.Tensor, seed_base: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """A client's local DP-SGD on its `n` records `x[:n], y[:n]`, from the model's current weights (graph-safe).

    Every step draws a Poisson batch at q = min(1, b / n), applies `optimizer` (a `tff.learning.optimizers`
    optimizer) to `noised_mean_gradient`, and updates the model's trainable variables in place. The loss is
    `loss_fn` per example only (a model's regularization losses are not added).

    Returns:
      (steps run, examples drawn in all steps): these stay at the client.
    """
    trainable = model.trainable_variables
    n = tf.cast(n, tf.int32)
    b = int(spec.expected_batch)
    steps = spec.epochs * ((n + b - 1) // b)
    q = tf.minimum(tf.constant(1.0, tf.float64), tf.cast(b, tf.float64) / tf.cast(tf.maximum(n, 1), tf.float64))
    x, y = x[:n], y[:n]
    opt_state = optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable))

    def step(k, opt_state, drawn):
        seed = None if seed_base is None else tf.cast(seed_base, tf.int64) + tf.stack(
            [tf.constant(0, tf.int64), tf.cast(k, tf.int64) * 7907])
        mask = poisson_mask(n, q, seed=None if seed is None else seed + tf.constant([0, 1], tf.int64))
        idx = tf.reshape(tf.where(mask), [-1])
        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        grads = noised_mean_gradient(model, loss_fn, xb, yb, spec.clip, spec.noise_multiplier, b,
                                     seed=None if seed is None else seed + tf.constant([0, 2], tf.int64))
        opt_state, new = optimizer.next(opt_state, tuple(trainable), tuple(grads))
        with tf.control_dependencies([v.assign(w) for v, w in zip(trainable, new)]):
            return k + 1, opt_state, drawn + tf.cast(tf.size(idx), tf.int64)

    k, _, drawn = tf.while_loop(lambda k, *_: k < steps, step, (tf.constant(0), opt_state, tf.constant(0, tf.int64)))
    return k, drawn
