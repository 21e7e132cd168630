"""Paper model builders: exact parameter counts, logits output, no BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff.paper_models import PAPER_MODELS

# (registry name, input shape, num_classes, exact model.count_params())
CASES = [
    ("emnist_cnn_dropout", (28, 28, 1), 10, 1_199_882),
    ("emnist_cnn_dropout", (28, 28, 1), 62, 1_206_590),
    ("emnist_2nn", (28, 28, 1), 10, 199_210),
    ("emnist_2nn", (28, 28, 1), 62, 209_662),
    ("resnet18_gn", (32, 32, 3), 10, 11_173_962),
    ("resnet18_gn", (32, 32, 3), 100, 11_220_132),
    ("cifar_cnn", (32, 32, 3), 10, 122_570),
    ("cifar_cnn", (32, 32, 3), 100, 128_420),
]


# Logits per position: built and checked in tests/test_text_tasks.py (layer sizes and parameter counts).
TEXT_MODELS = ("shakespeare_lstm", "stackoverflow_lstm")


def all_layers(layer: tf.keras.layers.Layer):
    """Yields `layer` and every layer nested in it, recursively."""
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from all_layers(sub)


def is_batch_norm(layer: tf.keras.layers.Layer) -> bool:
    return isinstance(layer, tf.keras.layers.BatchNormalization) or any(
        "batchnorm" in cls.__name__.lower() for cls in type(layer).__mro__
    )


def test_registry_names():
    assert set(PAPER_MODELS) == {"emnist_cnn_dropout", "emnist_2nn", "resnet18_gn", "cifar_cnn", *TEXT_MODELS}
    assert {name for name, *_ in CASES} == set(PAPER_MODELS) - set(TEXT_MODELS)


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes", "num_params"),
    CASES,
    ids=[f"{name}-{c}" for name, _, c, _ in CASES],
)
def test_paper_model(name, input_shape, num_classes, num_params):
    tf.keras.backend.clear_session()
    model = PAPER_MODELS[name](input_shape, num_classes)

    assert isinstance(model, tf.keras.Model)
    assert model.optimizer is None, "builders must return uncompiled models"
    assert model.count_params() == num_params
    assert tuple(model.input_shape) == (None, *input_shape)
    assert tuple(model.output_shape) == (None, num_classes)

    layers = list(all_layers(model))
    assert len(layers) > 1
    bad = [layer.name for layer in layers if is_batch_norm(layer)]
    assert not bad, f"BatchNormalization layers found: {bad}"
    # No non-trainable state (e.g. moving statistics) that would bypass DP.
    assert not model.non_trainable_weights
    # Logits: the last layer is linear, no softmax anywhere.
    assert model.layers[-1].get_config().get("activation") == "linear"
    assert not any(isinstance(layer, tf.keras.layers.Softmax) for layer in layers)

    x = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
    for training in (False, True):
        logits = model(x, training=training).numpy()
        assert logits.shape == (2, num_classes)
        assert np.all(np.isfinite(logits))
