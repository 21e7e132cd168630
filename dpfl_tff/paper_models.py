"""Keras models from federated-learning papers.

Every builder has the signature `(input_shape, num_classes) -> tf.keras.Model`
and returns an uncompiled model that outputs logits (no softmax). Use
`from_logits=True` losses with them.

None of them uses BatchNormalization: its moving statistics are updated from
each client's raw batches outside the clipped and noised model delta, so no
client sends them and the server model keeps their initial values (mean 0,
variance 1) for evaluation, unlike the batch statistics its weights were
trained with (`models.validate_model` warns). The ResNet uses
GroupNormalization, which only normalizes within a single example and has no
non-trainable state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import tensorflow as tf

ModelBuilder = Callable[[Sequence[int], int], tf.keras.Model]

# Groups used by every GroupNormalization layer of `resnet18_groupnorm`.
RESNET_GN_GROUPS = 2


def emnist_cnn_dropout(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """CNN with dropout from Reddi et al. 2020 (arXiv:2003.00295).

    Source: "Adaptive Federated Optimization" (Reddi, Charles, Zaheer, Garrett,
    Rush, Konecny, Kumar, McMahan; arXiv:2003.00295), the EMNIST CNN. It is
    TFF's baselines `create_conv_dropout_model` (google-research/federated,
    utils/models/emnist_models.py) with the final softmax removed.

    Architecture (valid padding):
    Conv2D(32, 3x3, relu) -> Conv2D(64, 3x3, relu) -> MaxPool 2x2 ->
    Dropout(0.25) -> Flatten -> Dense(128, relu) -> Dropout(0.5) ->
    Dense(num_classes).

    Parameter counts for input 28x28x1:
      10 classes (EMNIST digits): 1,199,882
      62 classes (EMNIST-62):     1,206,590
    """
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=tuple(input_shape)),
            tf.keras.layers.Conv2D(32, (3, 3), activation="relu"),
            tf.keras.layers.Conv2D(64, (3, 3), activation="relu"),
            tf.keras.layers.MaxPool2D(pool_size=(2, 2)),
            tf.keras.layers.Dropout(0.25),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.5),
            tf.keras.layers.Dense(num_classes),
        ],
        name="emnist_cnn_dropout",
    )


def emnist_2nn(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """The "2NN" multilayer perceptron of McMahan et al. 2017 (arXiv:1602.05629).

    Source: "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (McMahan, Moore, Ramage, Hampson, Aguera y Arcas;
    arXiv:1602.05629), the MNIST 2NN; also TFF's baselines
    `create_two_hidden_layer_model`.

    Architecture: Flatten -> Dense(200, relu) -> Dense(200, relu) ->
    Dense(num_classes).

    Parameter counts for input 28x28x1 (784 features):
      10 classes: 199,210
      62 classes: 209,662
    """
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=tuple(input_shape)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(200, activation="relu"),
            tf.keras.layers.Dense(200, activation="relu"),
            tf.keras.layers.Dense(num_classes),
        ],
        name="emnist_2nn",
    )


def _conv3x3(filters: int, strides: int = 1) -> tf.keras.layers.Conv2D:
    return tf.keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, kernel_initializer="he_normal"
    )


def _group_norm() -> tf.keras.layers.GroupNormalization:
    return tf.keras.layers.GroupNormalization(groups=RESNET_GN_GROUPS, epsilon=1e-5)


def _basic_block(x: tf.Tensor, filters: int, strides: int) -> tf.Tensor:
    """ResNet v1 BasicBlock: conv-GN-relu-conv-GN, add shortcut, relu."""
    shortcut = x
    y = _conv3x3(filters, strides)(x)
    y = _group_norm()(y)
    y = tf.keras.layers.ReLU()(y)
    y = _conv3x3(filters)(y)
    y = _group_norm()(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = tf.keras.layers.Conv2D(
            filters, 1, strides=strides, use_bias=False, kernel_initializer="he_normal"
        )(x)
        shortcut = _group_norm()(shortcut)
    y = tf.keras.layers.Add()([shortcut, y])
    return tf.keras.layers.ReLU()(y)


def resnet18_groupnorm(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """CIFAR ResNet-18 with GroupNormalization in place of BatchNorm.

    Source: ResNet-18 (He et al. 2016, arXiv:1512.03385) in its common CIFAR
    form, with GroupNorm (Wu & He 2018, arXiv:1803.08494) replacing BatchNorm as
    proposed for non-IID federated learning by Hsieh et al. 2020 "The Non-IID
    Data Quagmire of Decentralized Machine Learning" (arXiv:1910.00189), and
    used for CIFAR-10/100 by Reddi et al. 2020 "Adaptive Federated
    Optimization" (arXiv:2003.00295).

    Groups: every GroupNormalization layer uses 2 groups (`RESNET_GN_GROUPS`),
    the default of the `tfa.layers.GroupNormalization` that TFF's baselines
    (google-research/federated, utils/models/resnet_models.py) used for
    Reddi et al.; epsilon 1e-5.

    Architecture (post-activation ResNet v1, all 3x3 convs `same` padding and
    bias-free because each is followed by GroupNorm):
      stem: Conv 3x3, 64 filters, stride 1 -> GN -> ReLU (no max-pool);
      4 stages of 2 BasicBlocks with 64 / 128 / 256 / 512 filters; the first
      block of stages 2-4 has stride 2 and a 1x1 conv (stride 2, no bias) + GN
      projection shortcut; other shortcuts are the identity. BasicBlock:
      conv3x3 -> GN -> ReLU -> conv3x3 -> GN, add shortcut, ReLU;
      global average pooling -> Dense(num_classes).
    This differs from TFF's baselines `create_resnet18`, which is a
    pre-activation ResNet v2 with a 7x7 stride-2 stem and max-pool.

    Parameter counts for input 32x32x3 (all trainable; GN has no
    non-trainable state, so these equal the usual BatchNorm ResNet-18
    trainable count):
      10 classes (CIFAR-10):   11,173,962
      100 classes (CIFAR-100): 11,220,132
    """
    inputs = tf.keras.Input(shape=tuple(input_shape))
    x = _conv3x3(64)(inputs)
    x = _group_norm()(x)
    x = tf.keras.layers.ReLU()(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, strides)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(num_classes)(x)
    return tf.keras.Model(inputs, outputs, name="resnet18_gn")


def cifar_cnn(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Small CIFAR CNN of the TensorFlow "Convolutional Neural Network" tutorial.

    Source: https://www.tensorflow.org/tutorials/images/cnn (CIFAR-10), with
    the same layers as that tutorial, including its default `valid` padding;
    the output layer emits logits as in the tutorial.

    Architecture: Conv2D(32, 3x3, relu) -> MaxPool 2x2 -> Conv2D(64, 3x3, relu)
    -> MaxPool 2x2 -> Conv2D(64, 3x3, relu) -> Flatten -> Dense(64, relu) ->
    Dense(num_classes). For 32x32 inputs the feature maps are 30 -> 15 -> 13 ->
    6 -> 4, so Flatten gives 4*4*64 = 1024 features.

    Parameter counts for input 32x32x3:
      10 classes (CIFAR-10):  122,570
      100 classes (CIFAR-100): 128,420
    """
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=tuple(input_shape)),
            tf.keras.layers.Conv2D(32, (3, 3), activation="relu"),
            tf.keras.layers.MaxPool2D((2, 2)),
            tf.keras.layers.Conv2D(64, (3, 3), activation="relu"),
            tf.keras.layers.MaxPool2D((2, 2)),
            tf.keras.layers.Conv2D(64, (3, 3), activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(num_classes),
        ],
        name="cifar_cnn",
    )


def shakespeare_lstm(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Character LSTM of McMahan et al. 2017 (arXiv:1602.05629) for Shakespeare next-character prediction.

    TFF 0.87's `simulation/baselines/shakespeare/char_prediction_models.py`
    `create_recurrent_model(vocab_size, sequence_length)`: Embedding(vocab, 8,
    mask_zero=True) -> LSTM(256, he_normal, return_sequences) -> LSTM(256, ...)
    -> Dense(vocab) logits at every position. Inputs are token ids (as float32,
    cast by the embedding) of shape (sequence_length,); 90 tokens for TFF's
    vocabulary: 820,522 parameters.
    """
    (length,) = tuple(input_shape)
    lstm = functools.partial(tf.keras.layers.LSTM, units=256, kernel_initializer="he_normal",
                             return_sequences=True, stateful=False)
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(length,)),
        tf.keras.layers.Embedding(input_dim=num_classes, output_dim=8, input_length=length, mask_zero=True),
        lstm(),
        lstm(),
        tf.keras.layers.Dense(num_classes),
    ], name="shakespeare_lstm")


def stackoverflow_lstm(input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Word LSTM of Reddi et al. 2020 (arXiv:2003.00295) for Stack Overflow next-word prediction.

    TFF 0.87's `simulation/baselines/stackoverflow/word_prediction_models.py`
    `create_recurrent_model(vocab_size)` with its defaults (embedding 96, one
    LSTM of 670, no shared embedding): Embedding(vocab, 96, mask_zero=True) ->
    LSTM(670, return_sequences) -> Dense(96) -> Dense(vocab) logits at every
    position; the model of the DP-FTRL paper (Kairouz et al. 2021,
    arXiv:2103.00039). 10,004 tokens (10,000 words + pad, oov, bos, eos):
    4,050,748 parameters.
    """
    inputs = tf.keras.layers.Input(shape=tuple(input_shape))
    embedded = tf.keras.layers.Embedding(input_dim=num_classes, output_dim=96, mask_zero=True)(inputs)
    processed = tf.keras.layers.LSTM(670, return_sequences=True)(embedded)
    projected = tf.keras.layers.Dense(96)(processed)
    logits = tf.keras.layers.Dense(num_classes, activation=None)(projected)
    return tf.keras.Model(inputs=inputs, outputs=logits, name="stackoverflow_lstm")


PAPER_MODELS: dict[str, ModelBuilder] = {
    "emnist_cnn_dropout": emnist_cnn_dropout,
    "emnist_2nn": emnist_2nn,
    "resnet18_gn": resnet18_groupnorm,
    "cifar_cnn": cifar_cnn,
    "shakespeare_lstm": shakespeare_lstm,
    "stackoverflow_lstm": stackoverflow_lstm,
}
