"""Keras model builders: (input_shape, num_classes) -> uncompiled Keras model.

Models output logits. No BatchNormalization: its batch statistics are not
clipped or noised by the DP aggregation and would leak client data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

ModelBuilder = Callable[[Sequence[int], int], tf.keras.Model]


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,)) -> tf.keras.Model:
    """Fully connected ReLU network on the flattened input."""
    layers = [tf.keras.layers.InputLayer(input_shape=tuple(input_shape)), tf.keras.layers.Flatten()]
    layers += [tf.keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(tf.keras.layers.Dense(num_classes))
    return tf.keras.Sequential(layers, name="mlp")


def cnn(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Small CNN: two 3x3 conv layers (16, 32 filters), max-pool, dense 64.

    Inputs of rank 1 are rejected: use `mlp` for flat features.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"--model=cnn needs image inputs (height, width, channels); this task's input shape is {tuple(input_shape)}"
        )
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(num_classes),
        ],
        name="cnn",
    )


def logistic(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Multinomial logistic regression on the flattened input."""
    return mlp(input_shape, num_classes, hidden=())


MODELS: dict[str, ModelBuilder] = {"mlp": mlp, "cnn": cnn, "logistic": logistic}


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Builds the registered model `name`."""
    return MODELS[name](input_shape, num_classes)
