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
        tf.keras.layers.BatchNormalization(name="bn"),
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


class _Branching(tf.keras.Model):
    """A subclassed model whose `call` branches on a tensor with a Python `if` (Keras converts it with autograph)."""

    def __init__(self, num_classes):
        super().__init__()
        self.flatten = tf.keras.layers.Flatten()
        self.dense = tf.keras.layers.Dense(num_classes)

    def call(self, x, training=False):
        h = self.flatten(x)
        if tf.reduce_sum(h) < 0:  # needs autograph in a graph: the training loop itself is traced without it
            h = -h
        return self.dense(h)


def subclassed_with_branch(input_shape, num_classes):
    model = _Branching(num_classes)
    model(tf.zeros((1, *input_shape)))  # built by a call (`build` traces `call` without autograph)
    return model


class _Plain(tf.keras.Model):
    """A subclassed model as TFF's tutorials write them: layers in `__init__`, `call`, never built."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.flatten = tf.keras.layers.Flatten()
        self.hidden = tf.keras.layers.Dense(16, activation="relu")
        self.out = tf.keras.layers.Dense(num_classes)

    def call(self, x, training=False):
        return self.out(self.hidden(self.flatten(x)))

    def get_config(self):
        return {"num_classes": self.num_classes}


def subclassed_unbuilt(input_shape, num_classes):
    return _Plain(num_classes)


def subclassed_wrong_output(input_shape, num_classes):
    return _Plain(num_classes + 1)


class _Counter(tf.keras.layers.Layer):
    """Counts the training batches it sees in a non-trainable variable (state that is not a trained weight)."""

    def build(self, input_shape):
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            self.seen.assign_add(1.0)
        return x


def with_counter(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        _Counter(name="counter"),
        tf.keras.layers.Dense(num_classes),
    ])


def with_frozen_layer(input_shape, num_classes):
    """A frozen (non-trainable) Dense layer: non-trainable weights that training never changes."""
    frozen = tf.keras.layers.Dense(8, trainable=False)
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Flatten(),
        frozen,
        tf.keras.layers.Dense(num_classes),
    ])


def tiny_text(input_shape, num_classes):
    """A text-task model cheap enough for tests: the paper models' input and output (token ids in, logits per
    position out) without their LSTMs (whose graphs take seconds to trace)."""
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=tuple(input_shape)),
        tf.keras.layers.Embedding(num_classes, 4),
        tf.keras.layers.Dense(num_classes),
    ])
