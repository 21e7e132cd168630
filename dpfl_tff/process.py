"""The learning process of a run and what feeds it: model, optimizers, client data, evaluation (TFF).

`build_learning_process` wraps the run's privacy mechanism's query in either
the grouped process (`grouped_fedavg`, the default) or TFF's own
`build_unweighted_fed_avg` (`--fedavg_impl=tff`, a cross-check against TFF's
implementation of the same algorithm). Both take `round_input`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff import grouped_fedavg, models
from dpfl_tff.client_hooks import ClientUpdateHook
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy import dp_sgd
from dpfl_tff.privacy.nonfinite import ZeroNonFiniteFactory
from dpfl_tff.privacy.mechanism import PrivacyMechanism
from dpfl_tff.privacy.registry import mechanism_for
from dpfl_tff.tasks import FederatedData


def build_optimizer(name: str, learning_rate: float) -> tff.learning.optimizers.Optimizer:
    """`sgd`, `sgdm` (momentum 0.9) or `adam` from `tff.learning.optimizers`."""
    if name == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
    if name == "sgdm":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=0.9)
    if name == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}: must be one of sgd, sgdm, adam")


def keras_model(cfg: ExperimentConfig, data: FederatedData) -> tf.keras.Model:
    return models.build_model(cfg.train.model, data.input_shape, data.num_classes)


def model_fn_for(cfg: ExperimentConfig, data: FederatedData) -> Callable[[], tff.learning.models.VariableModel]:
    """A no-argument TFF model constructor for the task's input spec."""

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_model(cfg, data),
            input_spec=data.element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    return model_fn


def build_learning_process(
    cfg: ExperimentConfig, data: FederatedData, files: grouped_fedavg.ClientFiles | None = None,
    client_hook: ClientUpdateHook | None = None,
    mechanism: PrivacyMechanism | None = None,
) -> tff.learning.templates.LearningProcess:
    """Unweighted DP-FedAvg with the DP aggregation of `cfg`.

    Unweighted: every client's update counts equally, as client-level DP
    needs (a weight would let one client's influence exceed the clip).
    `cfg.train.fedavg_impl` picks `grouped_fedavg` (several clients per TFF
    client call; the worker reads client data from `files`, or, with None,
    the round's request carries it) or TFF's `build_unweighted_fed_avg` with
    our aggregator. Feed `next` with `round_input` (given the same `client_hook`:
    `client_hooks.py`, e.g. the audit's `canaries.CanaryHook`; grouped only).
    `mechanism`: the run plan's mechanism (default: built from `cfg`).
    """
    client_opt = build_optimizer(cfg.train.client_optimizer, cfg.train.client_learning_rate)
    server_opt = build_optimizer(cfg.train.server_optimizer, cfg.train.server_learning_rate)
    aggregation = (mechanism or mechanism_for(cfg)).aggregation
    release = aggregation.releases_client_statistics
    if cfg.train.fedavg_impl == "grouped":
        return grouped_fedavg.build_grouped_fed_avg(
            lambda: keras_model(cfg, data),
            data.input_shape,
            client_optimizer=client_opt,
            server_optimizer=server_opt,
            batch_size=cfg.train.client_batch_size,
            query=aggregation.query(_update_specs(cfg, data)),
            release_client_statistics=release,
            files_root=None if files is None else files.root,
            client_hook=client_hook,
            label_shape=data.label_shape,
            dp_sgd_spec=local_dp_sgd(cfg),
        )
    # TFF's own FedAvg around the same query, as a cross-check of the grouped process: the query's
    # preprocess_record runs at CLIENTS in TFF's DifferentiallyPrivateFactory too.
    aggregator = tff.aggregators.DifferentiallyPrivateFactory(aggregation.query())
    return tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn_for(cfg, data),
        client_optimizer_fn=client_opt,
        server_optimizer_fn=server_opt,
        model_aggregator=ZeroNonFiniteFactory(aggregator) if release else aggregator,
        metrics_aggregator=None if release else _discard_client_metrics,
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
    )


def local_dp_sgd(cfg: ExperimentConfig) -> dp_sgd.LocalDPSGD | None:
    """The clients' DP-SGD of `--dp_level=example` (None at the client level)."""
    if cfg.dp.dp_level != "example":
        return None
    return dp_sgd.LocalDPSGD(cfg.dp.example_clip_norm, cfg.dp.example_noise_multiplier, cfg.train.client_batch_size,
                             cfg.train.client_epochs, cfg.dp.noise_seed)


def _update_specs(cfg: ExperimentConfig, data: FederatedData) -> list[tf.TensorSpec]:
    """TensorSpecs of a client's model update (the trainable weights, as the grouped process lists them).

    A registered model's are kept for the process (they do not depend on the seed); a custom model's are
    read from a new build every time.
    """
    key = (cfg.train.model, tuple(data.input_shape), data.num_classes)
    if key not in _UPDATE_SPECS:
        specs = [tf.TensorSpec(w.shape, w.dtype) for w in keras_model(cfg, data).trainable_weights]
        if ":" in cfg.train.model:
            return specs
        _UPDATE_SPECS[key] = specs
    return list(_UPDATE_SPECS[key])


_UPDATE_SPECS: dict[tuple, list[tf.TensorSpec]] = {}


def _discard_client_metrics(metric_finalizers, local_unfinalized_metrics_type=None):
    """A TFF metrics aggregator for local DP: the clients' training metrics stay at the clients."""
    del metric_finalizers, local_unfinalized_metrics_type

    def aggregate(client_metrics):
        del client_metrics
        return tff.federated_value(collections.OrderedDict(), tff.SERVER)

    return aggregate


def round_input(
    cfg: ExperimentConfig,
    data: FederatedData,
    cohort: Sequence[int],
    round_num: int,
    files: grouped_fedavg.ClientFiles | None = None,
    client_hook: ClientUpdateHook | None = None,
) -> list:
    """The CLIENTS value of round `round_num` for `build_learning_process(cfg, data, files)`.

    Every client's examples are visited in `data.client_order` order, seeded by
    (seed, round, client): the same batches whichever `fedavg_impl` runs.
    Clients the `client_hook` says have no data (canaries) get no examples (grouped only).
    """
    t = cfg.train

    def seed_of(c: int) -> int:
        return _shuffle_seed(t.seed, round_num, c)

    if t.fedavg_impl != "grouped":
        return [
            data.client_dataset(c, t.client_epochs, t.client_batch_size, seed_of(c), t.client_shuffle_buffer,
                                t.client_max_examples)
            for c in cohort
        ]
    if cfg.dp.dp_level == "example":  # DP-SGD draws its own Poisson batches from all n_i records: one pass
        orders = [np.arange(data.client_size(c), dtype=np.int64) for c in cohort]
    else:
        orders = [
            data.client_order(c, t.client_epochs, seed_of(c), t.client_shuffle_buffer, t.client_max_examples)
            if client_hook is None or client_hook.has_data(c) else np.zeros(0, np.int64)
            for c in cohort
        ]
    groups = grouped_fedavg.split_groups(len(cohort), t.clients_per_call, grouped_fedavg.calls_per_round(len(cfg.workers)))
    return grouped_fedavg.make_groups(data, list(cohort), orders, groups, files, client_hook)


@contextlib.contextmanager
def client_files(cfg: ExperimentConfig, data: FederatedData) -> Iterator[grouped_fedavg.ClientFiles | None]:
    """A private folder of client data files for a local worker; None when not used.

    Used by `fedavg_impl=grouped` without `--workers` (remote workers get the
    data in each round's request). Deleted on exit.
    """
    if cfg.train.fedavg_impl != "grouped" or cfg.workers:
        yield None
        return
    root = tempfile.mkdtemp(prefix="dpfl_tff_clients_")
    try:
        streamed = getattr(data.clients, "sizes", None) is not None
        yield (StreamedClientFiles if streamed else grouped_fedavg.ClientFiles)(data, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class StreamedClientFiles(grouped_fedavg.ClientFiles):
    """`ClientFiles` for a task streamed from disk: only the current round's clients have a file.

    A round's files are written before the round and read by the worker during it; the next round's
    `ensure` deletes the files of the clients it does not take again, so the folder holds one cohort
    (a Stack Overflow run would otherwise keep a file for every client ever sampled: ~40 KB each).
    """

    def ensure(self, client_ids: Sequence[int]) -> None:
        keep = {int(c) for c in client_ids}
        for c in self._written - keep:
            try:
                os.remove(os.path.join(self.root, str(c)))
            except FileNotFoundError:
                pass
        self._written &= keep
        super().ensure(client_ids)


def initial_state(process, cfg: ExperimentConfig, data: FederatedData) -> Any:
    """Process state whose model weights are seeded by `cfg.train.seed`."""
    state = process.initialize()
    tf.keras.utils.set_random_seed(cfg.train.seed)
    weights = tff.learning.models.ModelWeights.from_model(keras_model(cfg, data))
    return process.set_model_weights(state, weights)


class Evaluator:
    """Central evaluation of the server model on the task's test split.

    One `tf.function` over the test set held as tensors, in batches of
    `EVAL_BATCH`: the same figures as Keras' `evaluate` (mean cross-entropy
    plus the model's regularization losses, and accuracy; tested) without its
    per-call set-up (45 ms of a 47 ms evaluation of the digits' test set), and
    2-4x faster than calling the model eagerly on larger test sets.

    Sequence labels (text tasks): the loss is the mean over every label
    position (pads included, as TFF's unmasked loss), and each of
    `data.test_accuracies` is the accuracy over the positions whose true token
    is not masked (TFF baselines' `MaskedCategoricalAccuracy`).
    """

    EVAL_BATCH = 1024

    def __init__(self, cfg: ExperimentConfig, data: FederatedData):
        self._model = keras_model(cfg, data)
        self.test_x, self.test_y = data.test.x, data.test.y  # what `evaluator_for` compares
        self._x = tf.constant(data.test.x, tf.float32)
        self._y = tf.constant(data.test.y, tf.int32)
        model, batch = self._model, self.EVAL_BATCH
        accuracies = dict(data.test_accuracies) or {"": ()}
        self._names = [f"test_accuracy{'_' + k if k else ''}" for k in accuracies]
        masks = [tf.constant(list(v), tf.int32) for v in accuracies.values()]

        @tf.function
        def evaluate(x, y):
            n = tf.shape(y)[0]
            loss_sum = tf.constant(0.0)
            correct = counted = tf.zeros([len(masks)])
            for start in tf.range(0, n, batch):
                logits = model(x[start:start + batch], training=False)
                yb = y[start:start + batch]
                loss_sum += tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True))
                hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), yb), tf.float32)
                keep = tf.stack([tf.cast(tf.logical_not(tf.reduce_any(tf.equal(yb[..., None], m), -1)), tf.float32)
                                 for m in masks])  # (accuracies, *yb.shape): 1 where the true token counts
                correct += tf.reduce_sum(tf.reshape(hit * keep, [len(masks), -1]), 1)
                counted += tf.reduce_sum(tf.reshape(keep, [len(masks), -1]), 1)
            positions = tf.cast(tf.maximum(tf.size(y), 1), tf.float32)
            return loss_sum / positions + tf.add_n([0.0, *model.losses]), correct / tf.maximum(counted, 1.0)

        # A run whose model or test set differs from the previous run's traces its own evaluator once, by
        # design; TensorFlow would warn about "frequent retracing" of this code after five of them (TF 2.14's
        # switch for that warning).
        evaluate._omit_frequent_tracing_warning = True  # noqa: SLF001
        self._evaluate = evaluate

    def __call__(self, weights: tff.learning.models.ModelWeights) -> dict[str, float]:
        weights.assign_weights_to(self._model)
        loss, accuracies = self._evaluate(self._x, self._y)
        return {"test_loss": float(loss), **{k: float(a) for k, a in zip(self._names, accuracies.numpy())}}


_EVALUATORS: list[tuple[tuple, Evaluator]] = []  # (key, evaluator), the most recently used last
_EVALUATORS_KEPT = 8  # at most this many, holding test sets of at most _EVALUATOR_BYTES in all
_EVALUATOR_BYTES = 512 * 2**20  # the arrays and their tensors: 256 MiB of test sets


def evaluator_for(cfg: ExperimentConfig, data: FederatedData) -> Evaluator:
    """The run's `Evaluator`: an earlier run's if it evaluated the same registered model on an equal test set.

    An `Evaluator` assigns all of the server model's weights before every evaluation, so reusing one gives
    the same figures; a sweep's later runs skip building the model and tracing the evaluation (~0.1 s of CPU
    a run on the quickstart). The last `_EVALUATORS_KEPT` are kept (with their test sets, as arrays and as
    tensors: at most `_EVALUATOR_BYTES` in all, the last one always): a task whose test split depends on the seed (digits) reuses them from its
    second round of seeds on. A custom model (`module:function`) gets a new one every run (its code may
    change) and is not kept.
    """
    name = cfg.train.model
    key = (name, tuple(data.input_shape), data.num_classes, tuple(data.label_shape),
           tuple((k, tuple(v)) for k, v in dict(data.test_accuracies).items()))
    for i, (kept_key, kept) in enumerate(_EVALUATORS):
        if kept_key == key and np.array_equal(kept.test_x, data.test.x) and np.array_equal(kept.test_y, data.test.y):
            _EVALUATORS.append(_EVALUATORS.pop(i))
            return kept
    evaluator = Evaluator(cfg, data)
    if ":" not in name:
        _EVALUATORS.append((key, evaluator))
        while len(_EVALUATORS) > 1 and (len(_EVALUATORS) > _EVALUATORS_KEPT or sum(
                2 * (e.test_x.nbytes + e.test_y.nbytes) for _, e in _EVALUATORS) > _EVALUATOR_BYTES):
            _EVALUATORS.pop(0)
    return evaluator


def _shuffle_seed(seed: int, round_num: int, client_id: int) -> int:
    return int(np.random.default_rng([seed, 11, round_num, int(client_id)]).integers(2**31 - 1))


def query_state(aggregator_state: Any) -> Any:
    """The DP query's state inside the process' aggregator state (TFF's FedAvg wraps it in `DPAggregatorState`)."""
    return getattr(aggregator_state, "query_state", aggregator_state)


def query_metrics(aggregator_metrics: dict[str, Any]) -> dict[str, Any]:
    """The DP query's metrics inside the process' aggregator metrics (the non-finite wrapper's `inner`, then
    TFF's `dp_query_metrics` where its DP factory reports them)."""
    inner = aggregator_metrics.get("inner", aggregator_metrics)
    return inner.get("dp_query_metrics", inner)
