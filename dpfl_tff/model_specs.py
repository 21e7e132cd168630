"""What a dry run says and checks about a built-in model, known without TensorFlow for the offline task's shapes.

A dry run prints the model's parameter count and checks a run folder's
checkpoint against the model's weight shapes; the plan also records the
weights' names and the state training updates but never aggregates
(`models.validate_model`, `models.updated_state`, `models.weight_names`).
For the registered models on the digits task (input 8x8x1, 10 classes) these
facts are stored in `model_specs.json`, so that `--dry_run` on the offline
default imports no TensorFlow. The file is written from the Keras models
themselves:

  uv run python -m dpfl_tff.model_specs --write

and tests/test_model_specs.py rebuilds every entry and compares it, so a
changed model without a rewritten file fails there. Any other model or shape
(a custom model, EMNIST, CIFAR) is built with TensorFlow as before.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

SPEC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_specs.json")
# The shapes stored: the offline default task's (tasks/digits.py).
OFFLINE_SHAPES = (((8, 8, 1), 10, ()),)


def key(model: str, input_shape: Sequence[int], num_classes: int, label_shape: Sequence[int] = ()) -> str:
    return f"{model} input={tuple(input_shape)} classes={num_classes} labels={tuple(label_shape)}"


def _stored() -> dict[str, Any]:
    try:
        with open(SPEC_FILE, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def lookup(model: str, input_shape: Sequence[int], num_classes: int,
           label_shape: Sequence[int] = ()) -> dict[str, Any] | None:
    """The stored spec of a registered model for these shapes, or None (then the model is built)."""
    return _stored().get(key(model, input_shape, num_classes, label_shape))


def build_spec(model: str, input_shape: Sequence[int], num_classes: int,
               label_shape: Sequence[int] = ()) -> dict[str, Any]:
    """The spec, from the Keras model (TensorFlow): what `plan.prepare` computes from a built model."""
    from dpfl_tff import models

    notes = models.validate_model(model, input_shape, num_classes, label_shape)
    keras_model = models.build_model(model, input_shape, num_classes)
    weights = keras_model.trainable_weights + keras_model.non_trainable_weights
    return {
        "parameters": int(keras_model.count_params()),
        "weights": [[list(w.shape), w.dtype.as_numpy_dtype.__name__] for w in weights],
        "weight_names": models.weight_names(model, input_shape, num_classes),
        "state_not_aggregated": models.updated_state(keras_model, input_shape),
        "notes": notes,
    }


def all_specs() -> dict[str, Any]:
    """Every registered model's spec for `OFFLINE_SHAPES` (those a builder refuses are left out)."""
    from dpfl_tff import models
    from dpfl_tff.errors import ConfigError

    out = {}
    for name in models.MODELS:
        for input_shape, classes, labels in OFFLINE_SHAPES:
            try:
                out[key(name, input_shape, classes, labels)] = build_spec(name, input_shape, classes, labels)
            except ConfigError:  # e.g. a paper model for 28x28 inputs
                continue
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m dpfl_tff.model_specs --write")
    with open(SPEC_FILE, "w", encoding="utf-8") as f:
        json.dump(all_specs(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {SPEC_FILE}")
