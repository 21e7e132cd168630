"""Example-level DP-SGD (issue 26): vectorized clipping vs a loop, noise statistics, per-client accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff.privacy import dp_sgd, events


def _model(d_in=6, hidden=5, classes=3, dtype="float32"):
    tf.keras.utils.set_random_seed(3)
    m = tf.keras.Sequential([tf.keras.layers.Dense(hidden, activation="tanh", input_shape=(d_in,), dtype=dtype),
                             tf.keras.layers.Dense(classes, dtype=dtype)])
    m.build((None, d_in))
    return m


_LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("dtype, rtol, atol", [
    # float64: the vectorized and the looped gradients differ only by float64 rounding.
    ("float64", 1e-12, 1e-15),
    # float32: they sum the same products in another order, so a small coordinate that is a difference of
    # larger terms is off by rounding at the scale of those terms, not of itself (seen: 3.1e-7 absolute on a
    # coordinate of 4e-5, the largest entry being 0.16, i.e. ~16 float32 epsilons of it); 1e-6 absolute is a
    # margin of 3 over that. The float64 case above is the exact comparison.
    ("float32", 1e-5, 1e-6),
])
def test_vectorized_clipping_equals_per_example_loop(dtype, rtol, atol):
    model = _model(dtype=dtype)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(9, 6)) * 3, dtype)
    y = tf.constant(rng.integers(0, 3, size=9), tf.int32)
    clip = 0.4
    clipped, norms = dp_sgd.clip_per_example(dp_sgd.per_example_gradients(model, _LOSS, x, y), clip)
    for i in range(9):
        with tf.GradientTape() as tape:
            loss = _LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        g = tape.gradient(loss, model.trainable_variables)
        norm = math.sqrt(sum(float(tf.reduce_sum(t * t)) for t in g))
        np.testing.assert_allclose(float(norms[i]), norm, rtol=rtol)
        factor = min(1.0, clip / norm)
        for gv, cv in zip(g, clipped):
            np.testing.assert_allclose(cv[i].numpy(), gv.numpy() * factor, rtol=rtol, atol=atol)
    # At least one example was actually clipped, so the test exercises the scaling.
    assert float(tf.reduce_max(norms)) > clip


def test_noise_statistics_on_an_empty_batch():
    # Empty batch: the result is pure noise N(0, (z C / b)^2) per coordinate, over 60*200+200 = 12200 coordinates.
    model = _model(d_in=60, hidden=200, classes=1)
    z, clip, b = 1.3, 0.7, 4.0
    out = dp_sgd.noised_mean_gradient(model, _LOSS, tf.zeros([0, 60]), tf.zeros([0], tf.int32), clip, z, b,
                                      op_seed=11)
    flat = np.concatenate([t.numpy().ravel() for t in out]).astype(np.float64)
    n = flat.size
    sigma = z * clip / b
    # Mean: N(0, sigma^2/n); 6 standard errors -> two-sided failure probability 2e-9.
    assert abs(flat.mean()) < 6 * sigma / math.sqrt(n)
    # Variance: the sample variance has relative std sqrt(2/n) = 0.0128; 7 of those (chi-square tail at n=12200,
    # failure probability < 1e-9) -> tolerance 0.09 relative.
    assert abs(flat.var() / sigma**2 - 1) < 7 * math.sqrt(2 / n)


def test_poisson_mask_rate():
    n, q = 200_000, 0.05
    mask = dp_sgd.poisson_mask(tf.constant(n), q, seed=tf.constant([1, 2], tf.int64)).numpy()
    # Binomial(n, q): std sqrt(n q (1-q)) = 97.5; 6 std -> failure probability 2e-9.
    assert abs(mask.sum() - n * q) < 6 * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_each_clients_epsilon_against_dp_accounting_by_hand(accountant):
    sizes, parts, steps = [50, 300, 1200], [10, 10, 7], [5, 30, 120]
    b, z, delta = 10.0, 1.1, 1e-5
    got = events.example_level_epsilons(sizes, parts, b, z, steps, delta, accountant)
    for n, r, s, eps in zip(sizes, parts, steps, got):
        acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
               else dp_accounting.pld.PLDAccountant(value_discretization_interval=events.PLD_DISCRETIZATION))
        acc.compose(dp_accounting.PoissonSampledDpEvent(b / n, dp_accounting.GaussianDpEvent(z)), r * s)
        assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert len(set(got)) == 3


def test_record_level_epsilon_never_decreases_over_rounds():
    eps = [events.example_level_epsilons([400], [r], 8.0, 1.0, [50], 1e-5, "rdp")[0] for r in range(6)]
    assert eps[0] == 0.0
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert events.example_level_epsilons([400], [1], 8.0, 0.0, [50], 1e-5, "rdp") == [math.inf]


def _cnn(dtype):
    tf.keras.utils.set_random_seed(4)
    m = tf.keras.Sequential([
        tf.keras.Input(shape=(9, 9, 2), dtype=dtype),
        tf.keras.layers.Conv2D(3, (3, 3), activation="relu", dtype=dtype),
        tf.keras.layers.Conv2D(4, (2, 3), strides=(2, 1), padding="same", activation="tanh", dtype=dtype),
        tf.keras.layers.MaxPool2D((2, 2), dtype=dtype),
        tf.keras.layers.Flatten(dtype=dtype),
        tf.keras.layers.Dense(5, activation="relu", dtype=dtype),
        tf.keras.layers.Dense(3, use_bias=False, dtype=dtype),
    ])
    return m, (9, 9, 2)


def _dense_on_sequences(dtype):
    tf.keras.utils.set_random_seed(5)
    m = tf.keras.Sequential([tf.keras.Input(shape=(4, 6), dtype=dtype),
                             tf.keras.layers.Dense(5, activation="tanh", dtype=dtype),
                             tf.keras.layers.Flatten(dtype=dtype), tf.keras.layers.Dense(3, dtype=dtype)])
    return m, (4, 6)


def _mlp(dtype):
    return _model(dtype=dtype), (6,)


@pytest.mark.parametrize("build", [_mlp, _cnn, _dense_on_sequences])
@pytest.mark.parametrize("dtype, rtol, atol", [
    ("float64", 1e-12, 1e-14),
    # float32: sums of the same products in another order (see test_vectorized_clipping_equals_per_example_loop);
    # the sum of 9 examples adds one more such rounding per coordinate.
    ("float32", 1e-5, 2e-6),
])
def test_layerwise_clipped_sum_equals_per_example_loop(build, dtype, rtol, atol):
    model, shape = build(dtype)
    assert dp_sgd._fast_path_layers(model, _LOSS) is not None  # the layer-wise path is the one tested
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(9, *shape)) * 3, dtype)
    y = tf.constant(rng.integers(0, 3, size=9), tf.int32)
    clip = 0.4
    got = dp_sgd.clipped_sum(model, _LOSS, x, y, clip)
    want = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    clipped = 0
    for i in range(9):
        with tf.GradientTape() as tape:
            loss = _LOSS(y[i:i + 1], model(x[i:i + 1], training=True))
        g = tape.gradient(loss, model.trainable_variables)
        norm = math.sqrt(sum(float(tf.reduce_sum(tf.cast(t, tf.float64) ** 2)) for t in g))
        clipped += norm > clip
        for w, t in zip(want, g):
            w += t.numpy().astype(np.float64) * min(1.0, clip / max(norm, 1e-30))  # a zero gradient: kept at 0
    assert clipped > 0  # the scaling is exercised
    assert len(got) == len(want)
    for gv, wv in zip(got, want):
        assert gv.dtype == dtype
        np.testing.assert_allclose(gv.numpy(), wv, rtol=rtol, atol=atol)
    # The vectorized path (any model) gives the same sum.
    for gv, vv in zip(got, dp_sgd.clipped_sum(model, _LOSS, x, y, clip, layerwise=False)):
        np.testing.assert_allclose(gv.numpy(), vv.numpy(), rtol=rtol, atol=atol)


def test_models_outside_the_layerwise_path_take_the_vectorized_one():
    bn = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.BatchNormalization(),
                              tf.keras.layers.Dense(2)])
    assert dp_sgd._fast_path_layers(bn, _LOSS) is None
    assert dp_sgd._fast_path_layers(_model(), lambda y, logits: tf.reduce_mean(logits)) is None
    summing = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    assert dp_sgd._fast_path_layers(_model(), summing) is None
    assert dp_sgd._fast_path_layers(_model(), _LOSS) is not None


@pytest.mark.parametrize("name, shape, layerwise", [
    ("cnn", (28, 28, 1), True), ("mlp", (64,), True), ("logistic", (64,), True),
    ("emnist_cnn_dropout", (28, 28, 1), True), ("emnist_2nn", (28, 28, 1), True), ("cifar_cnn", (32, 32, 3), True),
    ("resnet18_gn", (32, 32, 3), False),  # functional, GroupNormalization: the vectorized path
])
def test_which_registered_models_take_the_layerwise_path(name, shape, layerwise):
    from dpfl_tff import models

    model = models.resolve_builder(name)(shape, 10)
    assert (dp_sgd._fast_path_layers(model, _LOSS) is not None) == layerwise  # as docs/privacy.md lists them
