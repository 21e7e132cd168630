"""The trained model of a run folder: `final_model.keras`, written when a run ends, and `load_model`.

Every run that completed at least one round (finished, stopped at a budget,
stopped by a signal, or ended by a failed round) leaves in its folder

  final_model.keras   the server model after its last completed round, in Keras' native
                      format (`model.save("final_model.keras")`: architecture, weights,
                      no optimizer); written under a temporary name and renamed
  final_model.json    the round it holds and how to rebuild it: the `--model` name, the
                      task's input shape and class count

`load_model(run_dir)` returns it compiled for evaluation (logits in, the
training's loss and accuracy). A model Keras cannot rebuild from the file
alone (a subclassed model whose class is not registered with Keras) is rebuilt
by its `--model` builder and given the file's weights: its module must be
importable as it was for the run (see docs/tasks-and-models.md, PYTHONPATH).

Under DP the model is what the epsilon covers: the released weights (the noised
trainable ones, and the initial non-trainable ones, which are never aggregated).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

FINAL_MODEL = "final_model.keras"
FINAL_MODEL_INFO = "final_model.json"


def model_weights(state: Any) -> tuple[list[Any], list[Any]]:
    """(trainable, non-trainable) model weights of a learning-process state (TFF's `LearningAlgorithmState`)."""
    weights = state.global_model_weights
    return list(weights.trainable), list(weights.non_trainable)


def save(run_dir: str, model_name: str, input_shape: Sequence[int], num_classes: int, state: Any,
         round_num: int) -> str:
    """Writes `final_model.keras` (the model of `state`) and `final_model.json` into `run_dir`; returns its path.

    Raises:
      OSError: the write failed (the previous files, if any, are left as they were).
    """
    import numpy as np

    from dpfl_tff import models
    from dpfl_tff.outputs import replaced_atomically

    model = models.build_model(model_name, input_shape, num_classes)
    trainable, non_trainable = model_weights(state)
    variables = model.trainable_weights + model.non_trainable_weights
    values = trainable + non_trainable
    if len(variables) != len(values):
        raise ValueError(f"the state holds {len(values)} model weights, the model {len(variables)}")
    for variable, value in zip(variables, values):
        variable.assign(np.asarray(value))
    path = os.path.join(run_dir, FINAL_MODEL)
    with replaced_atomically(path) as tmp:
        model.save(tmp + ".keras")  # Keras picks the format from the extension
        os.replace(tmp + ".keras", tmp)
    info = {"file": FINAL_MODEL, "format": "keras", "round": round_num, "model": model_name,
            "input_shape": list(input_shape), "num_classes": num_classes}
    with replaced_atomically(os.path.join(run_dir, FINAL_MODEL_INFO)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    return path


def load_model(run_dir: str, compile: bool = True):  # noqa: A002  (Keras' own argument name)
    """The trained model of the run folder `run_dir` (a `tf.keras.Model`), compiled for `evaluate` if `compile`.

    Compiled with the training's loss (sparse categorical cross-entropy from
    logits) and accuracy, so that `model.evaluate(x, y)` gives the run's
    `test_loss` and `test_accuracy` on the same data.

    Raises:
      FileNotFoundError: `run_dir` holds no final_model.keras (no round completed, or a run
        of a dpfl_tff version that did not write it: its checkpoints hold the state).
    """
    import tensorflow as tf

    from dpfl_tff import models

    path = os.path.join(run_dir, FINAL_MODEL)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (a run writes it when it ends, once a round is completed)")
    try:
        model = tf.keras.models.load_model(path, compile=False)
    except Exception:  # noqa: BLE001  (e.g. a subclassed model's class unknown to Keras): rebuild and load weights
        with open(os.path.join(run_dir, FINAL_MODEL_INFO), encoding="utf-8") as f:
            info = json.load(f)
        model = models.build_model(info["model"], info["input_shape"], info["num_classes"])
        model.load_weights(path)
    if compile:
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model
