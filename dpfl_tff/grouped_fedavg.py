"""DP-FedAvg with several clients per TFF client computation ("client groups").

TFF's `build_unweighted_fed_avg` runs one TFF client computation per client:
each call rebuilds the training loop, ships the client's dataset into the
request and runs concurrently with the others on the same cores. Here one TFF
client value is a *group* of clients: a single call trains them one after the
other (each from the server model, with a fresh client optimizer), and the
data is read inside the worker from files written once per client, not shipped
every round. The result is the same algorithm:

  for every client c of the round (in any grouping):
    delta_c = (server weights - weights after local SGD on c's examples)
    non-finite delta_c -> zeros (counted in `nonfinite_clients`, except under
    local DP, where no count leaves the client)
    (a client-update hook may replace or transform delta_c first:
    `client_hooks.py`; the audit's canary clients are one)
    record_c = query.preprocess_record(params, delta_c)    (at the client)
  the group's call sums its clients' records (the query's sample state);
  the groups' sums are summed (`federated_sum`: the privacy modes' queries
  are sums); the server calls `query.get_noised_result` once and the server
  optimizer applies the result, in the same call (as TFF's
  `build_apply_optimizer_finalizer`: a non-finite update is not applied).

The query is the privacy mechanism's (`privacy.queries`): central DP clips in
`preprocess_record` and adds N(0, (zC)^2) once in `get_noised_result`, as
`tff.aggregators.DifferentiallyPrivateFactory` does; local DP clips and
noises in `preprocess_record`, so before the update is added to anything;
no DP averages. With `release_client_statistics=False` (local DP) a group's
call returns its records' sum and nothing else: no training metric, count or
flag leaves a client.

The DP guarantee is the mechanism's, exactly as with one TFF client per
client: the grouping is how the simulation schedules work, and the
sensitivity of the released sum to one client is unchanged (its record
enters the sum once, clipped). The state has the fields of TFF's
`LearningAlgorithmState` and the metrics the structure the round loop reads
from TFF's FedAvg.

Client data reaches the worker in one of two ways, chosen by the caller:
`ClientFiles` (raw bytes per client in a local folder, read by the worker:
for workers on this machine) or in the round's request (`files_root=None`:
for workers elsewhere).
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.autograph.core import ag_ctx

from dpfl_tff import runtime
from dpfl_tff.client_hooks import ClientUpdateHook
from dpfl_tff.privacy import dp_sgd
from dpfl_tff.tasks.base import FederatedData

# Client calls per worker and round when --clients_per_call=0: two let one call's small ops overlap
# the other's on a 2-core worker (~5% faster than one call in scripts/bench_round.py). A local worker
# that may use one core only (a `sweep --parallel` copy's) gets one: on one core the second call only
# adds its per-call work (a quickstart round ~8% slower, measured pinned with taskset).
CALLS_PER_WORKER = 2


def calls_per_round(remote_workers: int) -> int:
    """The fewest client calls of a round: `CALLS_PER_WORKER` per remote worker; for the local worker, as
    many as there are cores this process (and so the worker it starts) may use, at most `CALLS_PER_WORKER`."""
    if remote_workers:
        return CALLS_PER_WORKER * remote_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(CALLS_PER_WORKER, cores))


class ClientFiles:
    """Each client's arrays as raw bytes in `root`, written on first use.

    `<root>/<id>` holds the features (float32, C order) followed by the labels
    (int32): one file per client (a file open costs more than its few bytes
    here); the worker reads it with `tf.io.read_file` and splits it
    (`client_arrays`). Written in place: the worker reads a file only after
    `ensure` has returned, and the folder is private to one run.
    """

    def __init__(self, data: FederatedData, root: str):
        self.root = root
        self._data = data
        self._written: set[int] = set()
        os.makedirs(root, exist_ok=True)

    def ensure(self, client_ids: Sequence[int]) -> None:
        for c in client_ids:
            c = int(c)
            if c in self._written:
                continue
            arrays = self._data.clients[c]
            with open(os.path.join(self.root, str(c)), "wb") as f:
                f.write(np.ascontiguousarray(arrays.x, dtype=np.float32).tobytes())
                f.write(np.ascontiguousarray(arrays.y, dtype=np.int32).tobytes())
            self._written.add(c)


def client_arrays(raw: tf.Tensor, input_shape: tuple[int, ...],
                  label_shape: tuple[int, ...] = ()) -> tuple[tf.Tensor, tf.Tensor]:
    """(x, y) of a `ClientFiles` file's bytes: n examples of prod(input_shape) float32 features, then n labels
    of prod(label_shape) int32."""
    words = tf.io.decode_raw(raw, tf.int32)  # 4-byte words; the features' bits are cast back, never converted
    n_labels = int(np.prod(label_shape))
    per_example = int(np.prod(input_shape)) + n_labels
    n_features = tf.size(words) // per_example * (per_example - n_labels)
    x = tf.reshape(tf.bitcast(words[:n_features], tf.float32), (-1, *input_shape))
    return x, tf.reshape(words[n_features:], (-1, *label_shape))


def split_groups(num_clients: int, clients_per_call: int, min_groups: int = 1) -> list[slice]:
    """Contiguous slices of range(num_clients): at most `clients_per_call` per slice
    (0: no limit), at least `min_groups` slices (some may be empty)."""
    groups = max(min_groups, 1)
    if clients_per_call > 0:
        groups = max(groups, -(-num_clients // clients_per_call))
    bounds = np.linspace(0, num_clients, groups + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def make_groups(
    data: FederatedData,
    cohort: Sequence[int],
    orders: Sequence[np.ndarray],
    groups: Sequence[slice],
    files: ClientFiles | None,
    hook: ClientUpdateHook | None = None,
) -> list[collections.OrderedDict]:
    """The round's CLIENTS value: one entry per group.

    `orders[k]` is the visiting order of client `cohort[k]`'s examples
    (`FederatedData.client_order`). With `files`, a group names its clients
    (their files are written first); without, it carries their data, padded.
    `hook` (`client_hooks.py`) adds its per-client fields to each group and
    says which clients have no data.
    """
    hook = hook or ClientUpdateHook()
    real = [c for c in cohort if hook.has_data(c)]
    if files is not None:
        files.ensure(real)
    out = []
    for g in groups:
        ids = np.asarray(cohort[g], np.int32)
        ords = list(orders[g])
        longest = max((len(o) for o in ords), default=0)
        padded = np.zeros((len(ords), longest), np.int32)
        for k, o in enumerate(ords):
            padded[k, : len(o)] = o
        entry = collections.OrderedDict(
            orders=padded, lengths=np.asarray([len(o) for o in ords], np.int32)
        )
        entry.update(hook.group_entries(ids))
        if files is not None:
            entry["client_ids"] = ids
        else:
            real_ids = [c for c in ids if hook.has_data(c)]
            n_max = max((len(data.clients[c]) for c in real_ids), default=0)
            x = np.zeros((len(ids), n_max, *data.input_shape), np.float32)
            y = np.zeros((len(ids), n_max, *data.label_shape), np.int32)
            for k, c in enumerate(ids):
                if not hook.has_data(c):
                    continue
                n = len(data.clients[c])
                x[k, :n], y[k, :n] = data.clients[c].x, data.clients[c].y
            entry["x"], entry["y"] = x, y
        out.append(entry)
    return out


def group_type(input_shape: Sequence[int], ship: bool, hook: ClientUpdateHook | None = None,
               label_shape: Sequence[int] = ()) -> tff.StructWithPythonType:
    fields = [
        ("orders", tff.TensorType(np.int32, (None, None))),
        ("lengths", tff.TensorType(np.int32, (None,))),
        *(hook.group_fields() if hook else []),
    ]
    if ship:
        fields += [
            ("x", tff.TensorType(np.float32, (None, None, *input_shape))),
            ("y", tff.TensorType(np.int32, (None, None, *label_shape))),
        ]
    else:
        fields.append(("client_ids", tff.TensorType(np.int32, (None,))))
    return tff.StructWithPythonType(fields, collections.OrderedDict)


def build_grouped_fed_avg(
    model_fn: Callable[[], tf.keras.Model],
    input_shape: Sequence[int],
    *,
    client_optimizer: tff.learning.optimizers.Optimizer,
    server_optimizer: tff.learning.optimizers.Optimizer,
    batch_size: int,
    query,
    release_client_statistics: bool = True,
    files_root: str | None = None,
    client_hook: ClientUpdateHook | None = None,
    label_shape: Sequence[int] = (),
    dp_sgd_spec: dp_sgd.LocalDPSGD | None = None,
) -> tff.learning.templates.LearningProcess:
    """The DP-FedAvg `LearningProcess` over client groups (see the module docstring).

    Args:
      model_fn: builds the uncompiled Keras model (logits out).
      input_shape: shape of one example's features.
      client_optimizer, server_optimizer: `tff.learning.optimizers` optimizers.
      batch_size: local minibatch size (a batch may span two epochs).
      query: the privacy mechanism's tensorflow-privacy DPQuery; its sample
        state must be a sum of preprocessed records (true of every query in
        `privacy.queries`).
      release_client_statistics: whether the clients' training loss, accuracy,
        example and non-finite counts leave them (False under local DP).
      files_root: folder of `ClientFiles` read by the worker; None: the
        groups carry their data (`make_groups(files=None)`).
      client_hook: a `client_hooks.ClientUpdateHook` run on every client's
        update before `preprocess_record` (the same hook must build the
        groups: `make_groups(hook=...)`), or None.
      label_shape: shape of one example's labels (() class labels; (L,) a token sequence).
      dp_sgd_spec: record-level DP (`--dp_level=example`): every client trains with DP-SGD
        (`privacy.dp_sgd.local_dp_sgd_training`) on its `lengths[i]` records instead of minibatch SGD
        along `orders` (then `make_groups` gets orders of one pass, arange(n_i)).

    `next(state, groups)` takes `make_groups`' list (one entry per group).
    """
    ship = files_root is None
    input_shape = tuple(int(d) for d in input_shape)

    @tff.tensorflow.computation
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    agg_init = tff.tensorflow.computation(query.initial_global_state)
    weights_type, agg_state_type = initial_weights.type_signature.result, agg_init.type_signature.result

    @tff.tensorflow.computation(weights_type, agg_state_type)
    def client_inputs(weights, agg_state):
        # Only the query's sample params (e.g. the clip) reach the clients, never its state (e.g. DP-FTRL's noise).
        return weights, query.derive_sample_params(agg_state)

    trainer = _GroupTrainer(query, client_optimizer, batch_size, input_shape, files_root, release_client_statistics,
                            client_hook, tuple(int(d) for d in label_shape), dp_sgd_spec)
    groups_type = group_type(input_shape, ship, client_hook, label_shape)

    @tff.tensorflow.computation(client_inputs.type_signature.result, groups_type)
    def train_group(inputs, group):
        weights, params = inputs
        return trainer(_overwritten_model(model_fn))(weights, params, group)

    optimizer_init, server_step = _server_computations(
        query, server_optimizer, weights_type, agg_state_type, train_group.type_signature.result,
        release_client_statistics,
    )
    return _learning_process(initial_weights, agg_init, client_inputs, optimizer_init, train_group, server_step,
                             groups_type)


def _overwritten_model(model_fn: Callable[[], tf.keras.Model]) -> tf.keras.Model:
    """The model a group call trains: its variables start at zeros instead of their random initial values.

    Every client first assigns the server weights to all of the model's
    variables (`_GroupTrainer._local_training`), so their initial values are
    never read; drawing them cost ~2 ms per call of the MLP here (199k
    uniform draws). If the model creates a variable that is not among its
    weights (one that would not be overwritten), or one of unknown shape, the
    model is built again as `model_fn` builds it.
    """
    created, zeroed = [], []

    def zeros(next_creator, **kwargs):
        shape, dtype = kwargs.get("shape"), kwargs.get("dtype")
        known = shape is not None and tf.TensorShape(shape).is_fully_defined() and dtype is not None
        if known:
            kwargs["initial_value"] = functools.partial(tf.zeros, tf.TensorShape(shape), tf.as_dtype(dtype))
        v = next_creator(**kwargs)
        created.append(v)
        zeroed.append(known)
        return v

    with tf.variable_creator_scope(zeros):
        model = model_fn()
    weights = {v.ref() for v in model.trainable_variables + model.non_trainable_variables}
    if all(zeroed) and {v.ref() for v in created} == weights:
        return model
    return model_fn()


class _GroupTrainer:
    """Builds the tf.function (weights, sample params, group) -> (records' sum, statistics) for a model."""

    def __init__(self, query, client_optimizer, batch_size: int, input_shape: tuple[int, ...],
                 files_root: str | None, release_client_statistics: bool, hook: ClientUpdateHook | None = None,
                 label_shape: tuple[int, ...] = (), dp_sgd_spec: dp_sgd.LocalDPSGD | None = None):
        self.query, self.label_shape = query, label_shape
        self.dp_sgd = dp_sgd_spec
        self.hook = hook
        self.client_optimizer = client_optimizer
        self.batch_size = batch_size
        self.input_shape = input_shape
        self.files_root = files_root
        self.release = release_client_statistics
        self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def _client_arrays(self, group, i):
        if self.files_root is None:
            return group["x"][i], group["y"][i]
        c = tf.strings.as_string(group["client_ids"][i])
        return client_arrays(tf.io.read_file(tf.strings.join([self.files_root, "/", c])), self.input_shape,
                             self.label_shape)

    def _local_training(self, model, weights, x, y, order, length, stats):
        """Local SGD of one client from the server model; returns (delta, stats updated)."""
        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
        for v, w in zip(trainable + non_trainable, list(weights.trainable) + list(weights.non_trainable)):
            v.assign(w)  # every client starts from the server model
        opt_state = self.client_optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable))

        def batch_step(start, opt_state, loss_sum, correct, examples, batches):
            idx = order[start : start + self.batch_size]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape, ag_ctx.ControlStatusCtx(status=ag_ctx.Status.ENABLED):
                # Keras converts a subclassed model's `call` (a Python `if` on a tensor) only where autograph is on.
                logits = model(xb, training=True)
                batch_loss = self.loss_fn(yb, logits)
                total_loss = batch_loss + tf.add_n([0.0, *model.losses])
            grads = tape.gradient(total_loss, trainable)
            opt_state, new = self.client_optimizer.next(opt_state, tuple(trainable), tuple(grads))
            with tf.control_dependencies([v.assign(n) for v, n in zip(trainable, new)]):
                b = tf.shape(yb)[0]
                predicted = tf.argmax(logits, axis=-1, output_type=yb.dtype)
                return (start + self.batch_size, opt_state, loss_sum + batch_loss * tf.cast(b, tf.float32),
                        # per example: the share of its label positions predicted (one position: 0 or 1)
                        correct + tf.reduce_sum(tf.reduce_mean(
                            tf.reshape(tf.cast(tf.equal(predicted, yb), tf.float32), [b, -1]), axis=1)),
                        examples + tf.cast(b, tf.int64), batches + 1)

        _, _, loss_sum, correct, examples, batches = tf.while_loop(
            lambda start, *_: start < length, batch_step,
            (tf.constant(0), opt_state, stats["loss_sum"], stats["correct"], stats["examples"], stats["batches"]))
        with tf.control_dependencies([loss_sum]):  # the deltas read the variables after the loop
            delta = [w - v.read_value() for w, v in zip(weights.trainable, trainable)]  # TFF's sign: initial - trained
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
        delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
        stats = collections.OrderedDict(
            loss_sum=loss_sum, correct=correct, examples=examples, batches=batches,
            nonfinite=stats["nonfinite"] + 1 - tf.cast(finite, tf.int64),
        )
        return delta, stats

    def _dp_sgd_training(self, model, weights, x, y, n, stats):
        """Local DP-SGD of one client of `n` records from the server model; returns (delta, stats updated).

        Nothing of `stats` leaves the client (record-level DP releases no client statistics).
        """
        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
        for v, w in zip(trainable + non_trainable, list(weights.trainable) + list(weights.non_trainable)):
            v.assign(w)  # every client starts from the server model
        seed = None
        if self.dp_sgd.noise_seed is not None:  # tests only: stateless, keyed by the seed and the server weights
            from dpfl_tff.privacy.local_noise import _content_hash

            seed = tf.stack([tf.constant(self.dp_sgd.noise_seed, tf.int64),
                             _content_hash(list(weights.trainable)) + tf.cast(n, tf.int64) * 1000003])
        with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.ENABLED):
            steps, drawn = dp_sgd.local_dp_sgd_training(self.dp_sgd, model, self.loss_fn, self.client_optimizer, x, y,
                                                        n, seed)
        with tf.control_dependencies([steps]):  # the deltas read the variables after the loop
            delta = [w - v.read_value() for w, v in zip(weights.trainable, trainable)]  # TFF's sign
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
        delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]  # post-processing of the private delta
        stats = collections.OrderedDict(
            loss_sum=stats["loss_sum"], correct=stats["correct"], examples=stats["examples"] + drawn,
            batches=stats["batches"] + tf.cast(steps, tf.int64),
            nonfinite=stats["nonfinite"] + 1 - tf.cast(finite, tf.int64),
        )
        return delta, stats

    def _client_update(self, model, weights, group, i, stats):
        x_i, y_i = self._client_arrays(group, i)
        if self.dp_sgd is not None:
            return self._dp_sgd_training(model, weights, x_i, y_i, group["lengths"][i], stats)
        order = group["orders"][i, : group["lengths"][i]]
        return self._local_training(model, weights, x_i, y_i, order, group["lengths"][i], stats)

    def __call__(self, model: tf.keras.Model):
        query = self.query

        # autograph=False (here and in the server step): the loops are written as tf.while_loop, so tracing
        # converts no source (autograph's conversion of this and of the library code it calls cost ~1.1 s of
        # a run's start-up).
        @tf.function(autograph=False)
        def run(weights, params, group):
            sums = query.initial_sample_state([tf.zeros_like(t) for t in weights.trainable])
            stats = collections.OrderedDict(
                loss_sum=tf.constant(0.0), correct=tf.constant(0.0), examples=tf.constant(0, tf.int64),
                batches=tf.constant(0, tf.int64), nonfinite=tf.constant(0, tf.int64),
            )

            def client_step(i, sums, stats):
                def train():
                    return self._client_update(model, weights, group, i, stats)

                # Python: without a hook, nothing of one is in the graph
                delta, stats = train() if self.hook is None else self.hook.client_update(weights, group, i, train,
                                                                                          stats)
                return i + 1, query.accumulate_preprocessed_record(sums, query.preprocess_record(params, delta)), stats

            n = tf.shape(group["lengths"])[0]
            _, sums, stats = tf.while_loop(lambda i, *_: i < n, client_step, (tf.constant(0), sums, stats))
            # Without release, the records' sum is all that leaves the clients (local DP).
            return sums, (stats if self.release else collections.OrderedDict())

        return run


def _server_computations(query, server_optimizer, weights_type, agg_state_type, group_result_type, release: bool):
    """(optimizer init, server step): noise and mean by the query, server optimizer and metrics in one call."""

    @tff.tensorflow.computation
    def optimizer_init():
        return server_optimizer.initialize(tuple(tf.TensorSpec(t.shape, t.dtype) for t in weights_type.trainable))

    @tff.tensorflow.computation(weights_type, agg_state_type, optimizer_init.type_signature.result, group_result_type)
    @tf.function(autograph=False)
    def server_step(weights, agg_state, optimizer_state, totals):
        sums, stats = totals
        update, new_agg_state, _ = query.get_noised_result(sums, agg_state)
        update = tuple(update)
        # As TFF's build_apply_optimizer_finalizer: a non-finite update is not applied.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
        new_optimizer_state, trainable = tf.nest.map_structure(
            lambda new, old: tf.where(finite, new, old),
            server_optimizer.next(optimizer_state, tuple(weights.trainable), update),
            (optimizer_state, tuple(weights.trainable)))
        aggregator = collections.OrderedDict(inner=collections.OrderedDict(
            dp_query_metrics=query.derive_metrics(new_agg_state)))
        train = collections.OrderedDict()
        if release:
            n = tf.cast(tf.maximum(stats["examples"], 1), tf.float32)
            train = collections.OrderedDict(
                accuracy=stats["correct"] / n, loss=stats["loss_sum"] / n,
                num_examples=stats["examples"], num_batches=stats["batches"],
            )
            aggregator["nonfinite_clients"] = tf.cast(stats["nonfinite"], tf.int32)
        metrics = collections.OrderedDict(
            distributor=(),
            client_work=collections.OrderedDict(train=train),
            aggregator=aggregator,
            finalizer=collections.OrderedDict(update_non_finite=1 - tf.cast(finite, tf.int32)),
        )
        new_weights = tff.learning.models.ModelWeights(list(trainable), list(weights.non_trainable))
        return new_weights, new_agg_state, new_optimizer_state, metrics

    return optimizer_init, server_step


def _learning_process(initial_weights, agg_init, client_inputs, optimizer_init, train_group, server_step,
                      groups_type):
    """The federated computations around the TensorFlow ones: TFF's LearningProcess shape."""

    def algorithm_state(weights, distributor, client_work, aggregator, finalizer):
        return tff.learning.templates.LearningAlgorithmState(
            global_model_weights=weights, distributor=distributor, client_work=client_work,
            aggregator=aggregator, finalizer=finalizer,
        )

    @tff.federated_computation
    def init_fn():
        return tff.federated_zip(algorithm_state(
            tff.federated_eval(initial_weights, tff.SERVER), tff.federated_value((), tff.SERVER),
            tff.federated_value((), tff.SERVER), tff.federated_eval(agg_init, tff.SERVER),
            tff.federated_eval(optimizer_init, tff.SERVER),
        ))

    state_type = init_fn.type_signature.result

    @tff.federated_computation(state_type, tff.FederatedType(groups_type, tff.CLIENTS))
    def next_fn(state, groups):
        # One broadcast of (weights, the query's sample params) and one sum of the groups' (sums, statistics):
        # each federated operation is a round trip inside the worker.
        inputs = tff.federated_broadcast(tff.federated_map(client_inputs, (state.global_model_weights, state.aggregator)))
        totals = tff.federated_sum(tff.federated_map(train_group, (inputs, groups)))
        weights, agg_state, optimizer_state, metrics = tff.federated_map(
            server_step, (state.global_model_weights, state.aggregator, state.finalizer, totals))
        new_state = tff.federated_zip(
            algorithm_state(weights, state.distributor, state.client_work, agg_state, optimizer_state))
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    @tff.tensorflow.computation(state_type.member)
    def get_model_weights(state):
        return state.global_model_weights

    @tff.tensorflow.computation(state_type.member, state_type.member.global_model_weights)
    def set_model_weights(state, weights):
        return algorithm_state(weights, state.distributor, state.client_work, state.aggregator, state.finalizer)

    @tff.federated_computation(state_type, tff.FederatedType(groups_type, tff.CLIENTS))
    def next_resident(state, groups):  # `next_fn` for a state left in the worker: the metrics and the aggregator back
        out = next_fn(state, groups)
        return out.state, (out.metrics, out.state.aggregator)

    # On a local worker: the state it returned is not sent back next round; inside `runtime.states_in_worker()`
    # it stays there (the round loop's: only the metrics and the aggregator's state come back).
    runtime.keep_state_in_worker(next_fn, resident=next_resident, fields=("aggregator",))
    return tff.learning.templates.LearningProcess(init_fn, next_fn, get_model_weights, set_model_weights)
