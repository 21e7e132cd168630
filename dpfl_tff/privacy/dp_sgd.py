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


_FAST_LAYERS = (tf.keras.layers.Dense, tf.keras.layers.Conv2D)


def _fast_path_layers(model: tf.keras.Model, loss_fn) -> list | None:
    """The layers of `model` if `clipped_sum` can take the layer-wise path, else None.

    It can when the model is a `tf.keras.Sequential` whose trainable variables all belong to its own
    `Dense` and `Conv2D` layers (channels_last, one group; exact types, not subclasses, whose `call` may
    differ), and `loss_fn` is a Keras `Loss` that averages over the batch (its `call` gives the per-example
    losses). Parameter-free layers (pooling, flatten, dropout, activations...) may sit anywhere: they are called
    as the model calls them. Layers whose computation mixes examples have trainable variables here only if
    they are not Dense/Conv2D (batch normalization): they send the model to the vectorized path.
    """
    if type(model) is not tf.keras.Sequential or not isinstance(loss_fn, tf.keras.losses.Loss):
        return None
    if loss_fn.reduction not in (tf.keras.losses.Reduction.AUTO, tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE):
        return None
    covered = []
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        if type(layer) not in _FAST_LAYERS or layer.compute_dtype != layer.variable_dtype:  # no mixed precision
            return None
        if isinstance(layer, tf.keras.layers.Conv2D) and (layer.data_format != "channels_last" or layer.groups != 1):
            return None
        covered += [layer.kernel] + ([layer.bias] if layer.use_bias else [])
    if [v.ref() for v in covered] != [v.ref() for v in model.trainable_variables]:
        return None  # e.g. a trainable variable outside those layers' kernel and bias
    return model.layers


def _layerwise_clipped_sum(layers, model: tf.keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor,
                           clip: float) -> list[tf.Tensor]:
    """`clipped_sum` for `_fast_path_layers` models: one forward pass, one backward pass to the layers' outputs.

    Each Dense and Conv2D layer's pre-activation output z = a W + b is computed here from its input a; the
    backward pass gives every example's dz_i = d loss_i / d z_i (the examples do not interact, so the gradient
    of the summed loss is each example's own). Example i's gradient of W is a_i^T dz_i (a Dense layer on
    rank-2 inputs: its squared norm is |a_i|^2 |dz_i|^2, never formed, Goodfellow 2015, arXiv:1510.01799; a
    Conv2D layer or a Dense layer on longer inputs: formed from the input patches) and of b the sum of dz_i
    over positions. The squared norms add up to each example's squared norm over all variables; the clipped
    sum is then sum_i s_i a_i^T dz_i with s_i = min(1, C / norm_i), the same scaling as `clip_per_example`.
    """
    with tf.GradientTape() as tape:
        h, taps = x, []
        for layer in layers:
            if not layer.trainable_weights:
                h = layer(h, training=True)
                continue
            a = tf.cast(h, layer.compute_dtype)
            if isinstance(layer, tf.keras.layers.Conv2D):
                z = layer.convolution_op(a, layer.kernel)
            elif a.shape.rank == 2:
                z = tf.matmul(a, layer.kernel)
            else:
                z = tf.tensordot(a, layer.kernel, [[a.shape.rank - 1], [0]])
            if layer.use_bias:
                z = tf.nn.bias_add(z, layer.bias)
            tape.watch(z)
            taps.append((layer, a, z))
            h = layer.activation(z) if layer.activation is not None else z
        per = loss_fn.call(y, h)
        if per.shape.rank > 1:  # one loss per label position: an example's loss is their mean
            per = tf.reduce_mean(per, axis=list(range(1, per.shape.rank)))
        total = tf.reduce_sum(per)
    dzs = tape.gradient(total, [z for _, _, z in taps])
    sq, parts = [], []  # per layer: (kind, per-example pieces) to weight once the norms are known
    for (layer, a, _), dz in zip(taps, dzs):
        bsz = tf.shape(a)[0]
        bias_g = tf.reduce_sum(tf.reshape(dz, [bsz, -1, dz.shape[-1]]), axis=1) if layer.use_bias else None
        if isinstance(layer, tf.keras.layers.Dense) and a.shape.rank == 2:
            sq.append(tf.reduce_sum(tf.square(a), axis=1) * tf.reduce_sum(tf.square(dz), axis=1))
            parts.append(("ghost", layer, a, dz, bias_g))
        else:
            if isinstance(layer, tf.keras.layers.Conv2D):
                kh, kw = layer.kernel_size
                a = tf.image.extract_patches(a, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
                                             rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
            a2 = tf.reshape(a, [bsz, -1, a.shape[-1]])
            d2 = tf.reshape(dz, [bsz, -1, dz.shape[-1]])
            g = tf.einsum("bpk,bpc->bkc", a2, d2)  # each example's kernel gradient, (in, out) flattened
            sq.append(tf.reduce_sum(tf.square(g), axis=[1, 2]))
            parts.append(("full", layer, g, None, bias_g))
        if bias_g is not None:
            sq[-1] = sq[-1] + tf.reduce_sum(tf.square(bias_g), axis=1)
    norms = tf.sqrt(tf.add_n(sq))
    out = []
    for kind, layer, first, dz, bias_g in parts:
        scale = tf.cast(tf.minimum(1.0, clip / tf.maximum(norms, 1e-30)), layer.kernel.dtype)
        if kind == "ghost":
            out.append(tf.matmul(first, dz * scale[:, None], transpose_a=True))
        else:
            out.append(tf.reshape(tf.einsum("b,bkc->kc", scale, first), layer.kernel.shape))
        if bias_g is not None:
            out.append(tf.reduce_sum(bias_g * scale[:, None], axis=0))
    return out


def clipped_sum(model: tf.keras.Model, loss_fn, x: tf.Tensor, y: tf.Tensor, clip: float,
                layerwise: bool = True) -> list[tf.Tensor]:
    """The sum over the batch of the clipped per-example gradients (zeros for an empty batch; graph-safe).

    Sequential models of Dense and Conv2D layers take the layer-wise path (`_layerwise_clipped_sum`: no
    per-example gradient of a Dense layer on rank-2 inputs is formed); any other model (or `layerwise=False`)
    computes every example's gradient with `per_example_gradients` and clips it with `clip_per_example`. Both
    give the same sum (tests/test_dp_sgd.py checks them against a loop over the examples).
    """
    layers = _fast_path_layers(model, loss_fn) if layerwise else None

    def nonempty():
        if layers is not None:
            return _layerwise_clipped_sum(layers, model, loss_fn, x, y, clip)
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
