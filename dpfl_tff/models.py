"""Keras model builders: (input_shape, num_classes) -> uncompiled Keras model.

Models output logits. No BatchNormalization: only trained weights travel from
the clients (their delta, clipped and noised under DP), so its moving statistics are never
aggregated and the server model keeps their initial values (`validate_model`
warns); GroupNormalization and LayerNormalization have no such state.

`--model` is either a registered name (`MODELS`) or `package.module:function`
naming a custom builder with the same signature; `validate_model` checks a
builder before training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from dpfl_tff.errors import ConfigError
from dpfl_tff.paper_models import PAPER_MODELS
from dpfl_tff.user_code import import_function

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


MODELS: dict[str, ModelBuilder] = {"mlp": mlp, "cnn": cnn, "logistic": logistic, **PAPER_MODELS}


def is_custom(name: str) -> bool:
    return ":" in name


def resolve_builder(name: str) -> ModelBuilder:
    """The builder of a registered name or of `package.module:function`.

    Raises:
      ConfigError: unknown name, module that fails to import, missing or
        non-callable function, or a signature that cannot take
        (input_shape, num_classes).
    """
    if not is_custom(name):
        if name not in MODELS:
            raise ConfigError(
                f"--model={name}: must be one of {', '.join(MODELS)} or package.module:function"
            )
        return MODELS[name]
    fn = import_function("model", name)
    try:
        inspect.signature(fn).bind((1,), 2)
    except TypeError as e:
        raise ConfigError(
            f"--model={name}: {name.partition(':')[2]}{inspect.signature(fn)} must take (input_shape, num_classes)"
        ) from e
    except ValueError:
        pass  # builtins without a signature: the call below tells
    return fn


def _all_layers(model: tf.keras.layers.Layer):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def validate_model(name: str, input_shape: Sequence[int], num_classes: int,
                   label_shape: Sequence[int] = ()) -> list[str]:
    """Builds `name` once and checks it; returns warnings (state that training updates but never aggregates).

    The warnings are returned, not issued (`warnings.warn`): the run prints them once, as its first lines.

    Raises:
      ConfigError: the builder fails, returns no Keras model, or its output
        shape is not (batch, *label_shape, num_classes) (text tasks: logits per position).
    """
    builder = resolve_builder(name)
    try:
        model = builder(tuple(input_shape), num_classes)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"--model={name}: building it for input shape {tuple(input_shape)} and {num_classes} classes failed "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(model, tf.keras.Model):
        raise ConfigError(f"--model={name}: returned {type(model).__name__}, not a tf.keras.Model")
    out = output_shape(name, model, input_shape)
    want = (*tuple(label_shape), num_classes)
    if len(out) != len(want) + 1 or any(o not in (w, None) for o, w in zip(out[1:-1], want[:-1])) \
            or out[-1] != num_classes:
        raise ConfigError(
            f"--model={name}: output shape is {out}; must be {('batch', *want)} logits for this task".replace("'", "")
        )
    _refuse_probabilities(name, model, input_shape, num_classes)
    state = updated_state(model, input_shape)
    if not state:
        return []
    msg = (
        f"WARNING: --model={name}: training updates {', '.join(state)}, which are not trained weights: only the "
        "trainable weights' delta (clipped and noised under DP) leaves a client, so the server model, evaluated "
        "and released, keeps their initial values all run (BatchNormalization: mean 0, variance 1, not the "
        "statistics its weights were trained with). No privacy loss (under DP, epsilon covers the model), but a "
        "model that evaluates with state it never learned: use GroupNormalization or LayerNormalization (as the "
        "paper models do)"
    )
    return [msg]


def output_shape(name: str, model: tf.keras.Model, input_shape: Sequence[int]) -> tuple[int | None, ...]:
    """`model`'s output shape, batch dimension None: Keras' `output_shape`, or a probe call's.

    Subclassed models have no `output_shape` (also once built or called):
    they are called once, in inference mode, on a batch of two all-zero inputs
    (zeros are valid token ids too).

    Raises:
      ConfigError: the probe call fails, or returns no single tensor.
    """
    try:
        return tuple(model.output_shape)
    except (AttributeError, RuntimeError, ValueError):
        pass  # subclassed: "has never been called and thus has no defined output shape"
    probe = np.zeros((2, *input_shape), np.float32)
    try:
        out = model(probe, training=False)
    except Exception as e:  # noqa: BLE001  (any failure of user code)
        raise ConfigError(
            f"--model={name}: calling it on a batch of zeros shaped {probe.shape} (to find its output shape) failed "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from e
    if not hasattr(out, "shape"):
        raise ConfigError(f"--model={name}: returned {type(out).__name__} on a probe batch, not one tensor of logits")
    return (None, *tuple(out.shape)[1:])


def updated_state(model: tf.keras.Model, input_shape: Sequence[int]) -> list[str]:
    """Names of `model`'s non-trainable variables that a training-mode call changes, and its BatchNormalization layers'.

    BatchNormalization's moving mean and variance are the usual case. The
    model is called once, with training=True, on 16 standard-normal inputs if
    it has non-trainable variables (this changes its state: call it on a model
    that is thrown away). A
    BatchNormalization layer is named even when that call fails.
    """
    variables = model.non_trainable_variables
    if not variables:  # e.g. every registered model: no probe call
        return []
    before = [v.numpy() for v in variables]
    probe = np.random.default_rng(0).standard_normal((16, *input_shape)).astype(np.float32)
    try:
        model(probe, training=True)
        changed = [v.name.split(":")[0] for v, b in zip(variables, before) if not np.array_equal(v.numpy(), b)]
    except Exception:  # noqa: BLE001  (models that cannot take a random probe are checked by training)
        changed = []
    bn = [layer.name for layer in _all_layers(model) if isinstance(layer, tf.keras.layers.BatchNormalization)
          and not any(c.startswith(f"{layer.name}/") for c in changed)]
    return changed + [f"the BatchNormalization layer {b}" for b in bn]


def _refuse_probabilities(name: str, model: tf.keras.Model, input_shape: Sequence[int], num_classes: int) -> None:
    """Raises ConfigError if `model` outputs probabilities (a final softmax) instead of logits.

    The loss is applied with `from_logits=True`; a softmax output would be
    squashed twice and train at chance without any error. A probe batch of 16
    standard-normal inputs: logits of an untrained model essentially never
    lie in [0, 1] with every row summing to 1.
    """
    probe = np.random.default_rng(0).standard_normal((16, *input_shape)).astype(np.float32)
    try:
        out = np.asarray(model(probe, training=False), dtype=np.float64)
    except Exception:  # noqa: BLE001  (models that cannot take a random probe are checked by training)
        return
    if num_classes > 1 and out.ndim == 2 and np.all(out >= 0) and np.all(out <= 1) and np.allclose(
            out.sum(axis=1), 1.0, atol=1e-4):
        raise ConfigError(
            f"--model={name}: outputs probabilities (every row of a probe batch is in [0, 1] and sums to 1: a "
            "softmax at the end?); models must output logits: remove the final softmax activation"
        )


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """Builds the registered or custom model `name`, with its weights created.

    A subclassed model that its builder returns unbuilt is built by a call on a
    batch of one all-zero input (`build` would trace `call` without autograph).
    """
    model = resolve_builder(name)(tuple(input_shape), num_classes)
    if isinstance(model, tf.keras.Model) and not model.built:
        model(np.zeros((1, *input_shape), np.float32), training=False)
    return model


def weight_names(name: str, input_shape: Sequence[int], num_classes: int) -> list[str]:
    """`trainable/<variable>` then `non_trainable/<variable>` names of the model's weights, as in a fresh process.

    Keras numbers layer names per graph (`dense`, `dense_1`, ...): the model
    is built once in a graph of its own, so that the names do not depend on
    how many models this process built before (a sweep). Falls back to an
    eager build's names if the builder cannot run in a graph.
    """
    def names(model: tf.keras.Model) -> list[str]:
        return ([f"trainable/{v.name.split(':')[0]}" for v in model.trainable_weights]
                + [f"non_trainable/{v.name.split(':')[0]}" for v in model.non_trainable_weights])

    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # graph-mode deprecation notices of some layers (BatchNormalization)
    try:
        with tf.Graph().as_default():
            return names(build_model(name, input_shape, num_classes))
    except Exception:  # noqa: BLE001
        return names(build_model(name, input_shape, num_classes))
    finally:
        logger.setLevel(level)
