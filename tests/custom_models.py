"""Custom model builders used by the tests via --model=tests.custom_models:<name>."""

import tensorflow as tf


def tiny_mlp(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(8, activation="relu"),
        tf.keras.layers.Dense(num_classes),
    ])


def wrong_output_size(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(num_classes + 1),
    ])


def with_batchnorm(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(num_classes),
    ])


def no_arguments():
    return tiny_mlp((4,), 2)


def not_a_model(input_shape, num_classes):
    return "model"


def ends_in_softmax(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(num_classes, activation="softmax"),
    ])
