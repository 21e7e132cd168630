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
  central: tensorflow-privacy's DP query, record by record: every delta_c is
           clipped by `query.preprocess_record` (L2 norm C, or the adaptive
           clip) and added to the sample state; the groups' sample states are
           summed (`federated_sum`: the queries' sample states are sums); the
           server calls `query.get_noised_result` once (noise N(0, (zC)^2) on
           the sum, / m), as `tff.aggregators.DifferentiallyPrivateFactory`.
  local:   every delta_c is clipped and noised (`local.clip_and_noise`)
           before it is added to anything; the server averages. The group's
           call returns the sum of noised updates and the number of clients,
           nothing else: no training metric, norm or flag leaves a client.
  none:    plain mean of the deltas.
  server:  the server optimizer applies the mean, in the same call as the
           noise (as TFF's `build_apply_optimizer_finalizer`: a non-finite
           update is not applied).

The DP guarantee is the query's (central) or the local mechanism's (local),
exactly as with one TFF client per client: the grouping is how the
simulation schedules work, and the sensitivity of the released sum to one
client is unchanged (its record enters the sum once, clipped). The state has
the fields of TFF's `LearningAlgorithmState` and the metrics the structure
`training` reads from TFF's FedAvg.

Client data reaches the worker in one of two ways, chosen by the caller:
`ClientFiles` (raw bytes per client in a local folder, read by the worker:
for workers on this machine) or in the round's request (`files_root=None`:
for workers elsewhere).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from dpfl_tff import runtime  # noqa: F401  (replaces TFF's worker-starting default context)
from dpfl_tff.privacy import local
from dpfl_tff.tasks.base import FederatedData

NONE, CENTRAL, LOCAL = "none", "central", "local"
# Client calls per worker and round when --clients_per_call=0: two let one call's small ops overlap
# the other's on a 2-core worker (~5% faster than one call in scripts/bench_round.py).
CALLS_PER_WORKER = 2


class ClientFiles:
    """Each client's arrays as raw bytes in `root`, written on first use.

    `<root>/<id>.x` holds the features (float32, C order), `<root>/<id>.y`
    the labels (int32); the worker reads them with `tf.io.decode_raw`.
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
            for suffix, value, dtype in (("x", arrays.x, np.float32), ("y", arrays.y, np.int32)):
                path = os.path.join(self.root, f"{c}.{suffix}")
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(np.ascontiguousarray(value, dtype=dtype).tobytes())
                os.replace(tmp, path)
            self._written.add(c)


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
) -> list[collections.OrderedDict]:
    """The round's CLIENTS value: one entry per group.

    `orders[k]` is the visiting order of client `cohort[k]`'s examples
    (`FederatedData.client_order`). With `files`, a group names its clients
    (their files are written first); without, it carries their data, padded.
    """
    if files is not None:
        files.ensure(cohort)
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
        if files is not None:
            entry["client_ids"] = ids
        else:
            n_max = max((len(data.clients[c]) for c in ids), default=0)
            x = np.zeros((len(ids), n_max, *data.input_shape), np.float32)
            y = np.zeros((len(ids), n_max), np.int32)
            for k, c in enumerate(ids):
                n = len(data.clients[c])
                x[k, :n], y[k, :n] = data.clients[c].x, data.clients[c].y
            entry["x"], entry["y"] = x, y
        out.append(entry)
    return out


def group_type(input_shape: Sequence[int], ship: bool) -> tff.StructWithPythonType:
    fields = [
        ("orders", tff.TensorType(np.int32, (None, None))),
        ("lengths", tff.TensorType(np.int32, (None,))),
    ]
    if ship:
        fields += [
            ("x", tff.TensorType(np.float32, (None, None, *input_shape))),
            ("y", tff.TensorType(np.int32, (None, None))),
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
    mode: str,
    query=None,
    local_mechanism: str = local.GAUSSIAN,
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
    noise_seed: int | None = None,
    files_root: str | None = None,
) -> tff.learning.templates.LearningProcess:
    """The DP-FedAvg `LearningProcess` over client groups (see the module docstring).

    Args:
      model_fn: builds the uncompiled Keras model (logits out).
      input_shape: shape of one example's features.
      client_optimizer, server_optimizer: `tff.learning.optimizers` optimizers.
      batch_size: local minibatch size (a batch may span two epochs).
      mode: `none`, `central` (needs `query`) or `local` (needs
        `local_mechanism`, `clip_norm`, `noise_multiplier`, `noise_seed`).
      query: the tensorflow-privacy DPQuery of central DP; its sample state
        must be a sum of preprocessed records (true of tfp's Gaussian, adaptive
        clip and normalized queries).
      files_root: folder of `ClientFiles` read by the worker; None: the
        groups carry their data (`make_groups(files=None)`).

    `next(state, groups)` takes `make_groups`' list (one entry per group).
    """
    if mode not in (NONE, CENTRAL, LOCAL):
        raise ValueError(f"mode={mode!r}: must be none, central or local")
    if mode == CENTRAL and query is None:
        raise ValueError("mode=central needs the DP query")
    ship = files_root is None
    input_shape = tuple(int(d) for d in input_shape)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tff.tensorflow.computation
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_weights.type_signature.result

    # --- aggregator state: the query's global state, or a round counter -------------
    @tff.tensorflow.computation
    def agg_init():
        if mode == CENTRAL:
            return query.initial_global_state()
        return tf.constant(0, tf.int64)  # rounds so far (local: keys the seeded test noise)

    agg_state_type = agg_init.type_signature.result

    def client_params(agg_state):
        """What clients need from the aggregator state: the query's sample params (the clip)."""
        return query.derive_sample_params(agg_state) if mode == CENTRAL else agg_state

    def empty_sums(trainable):
        """Per-group accumulators: the query's sample state, or plain sums."""
        zeros = [tf.zeros_like(t) for t in trainable]
        if mode == CENTRAL:
            return query.initial_sample_state(zeros)
        return collections.OrderedDict(total=zeros)

    def add_client(sums, delta, params):
        if mode == CENTRAL:
            record = query.preprocess_record(params, delta)
            return query.accumulate_preprocessed_record(sums, record)
        if mode == LOCAL:
            key = None if noise_seed is None else tf.constant(noise_seed, tf.int64) * 1_000_003 + params
            noised = local.clip_and_noise(delta, local_mechanism, clip_norm, noise_multiplier, key)
            return collections.OrderedDict(total=[a + b for a, b in zip(sums["total"], noised)])
        return collections.OrderedDict(total=[a + b for a, b in zip(sums["total"], delta)])

    # --- client work: one call trains a whole group ----------------------------------
    def group_trainer(model: tf.keras.Model):
        """The tf.function (weights, aggregator state, group) -> (sums, stats) training `model`."""
        trainable = model.trainable_variables
        non_trainable = model.non_trainable_variables
        specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)

        def client_arrays(group, i):
            if ship:
                return group["x"][i], group["y"][i]
            c = tf.strings.as_string(group["client_ids"][i])
            x = tf.io.decode_raw(tf.io.read_file(tf.strings.join([files_root, "/", c, ".x"])), tf.float32)
            y = tf.io.decode_raw(tf.io.read_file(tf.strings.join([files_root, "/", c, ".y"])), tf.int32)
            return tf.reshape(x, (-1, *input_shape)), y

        @tf.function
        def run(weights, agg_state, group):
            params = client_params(agg_state)
            sums = empty_sums(list(weights.trainable))
            loss_sum = tf.constant(0.0)
            correct = tf.constant(0.0)
            examples = tf.constant(0, tf.int64)
            batches = tf.constant(0, tf.int64)
            nonfinite = tf.constant(0, tf.int64)
            clients = tf.constant(0, tf.int64)
            for i in tf.range(tf.shape(group["lengths"])[0]):
                x_i, y_i = client_arrays(group, i)
                order = group["orders"][i, : group["lengths"][i]]
                for v, w in zip(trainable + non_trainable, list(weights.trainable) + list(weights.non_trainable)):
                    v.assign(w)  # every client starts from the server model
                opt_state = client_optimizer.initialize(specs)
                for start in tf.range(0, group["lengths"][i], batch_size):
                    idx = order[start : start + batch_size]
                    xb, yb = tf.gather(x_i, idx), tf.gather(y_i, idx)
                    with tf.GradientTape() as tape:
                        logits = model(xb, training=True)
                        batch_loss = loss_fn(yb, logits)
                        total_loss = batch_loss + tf.add_n([0.0, *model.losses])
                    grads = tape.gradient(total_loss, trainable)
                    opt_state, new = client_optimizer.next(opt_state, tuple(trainable), tuple(grads))
                    for v, n in zip(trainable, new):
                        v.assign(n)
                    b = tf.shape(yb)[0]
                    loss_sum += batch_loss * tf.cast(b, tf.float32)
                    predicted = tf.argmax(logits, axis=-1, output_type=yb.dtype)
                    correct += tf.reduce_sum(tf.cast(tf.equal(predicted, yb), tf.float32))
                    examples += tf.cast(b, tf.int64)
                    batches += 1
                delta = [w - v for w, v in zip(weights.trainable, trainable)]  # TFF's sign: initial - trained
                finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
                delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
                nonfinite += 1 - tf.cast(finite, tf.int64)
                clients += 1
                sums = add_client(sums, delta, params)
            if mode == LOCAL:  # the count of clients is the server's own knowledge; the rest is the clients'
                return sums, collections.OrderedDict(clients=clients)
            stats = collections.OrderedDict(
                loss_sum=loss_sum, correct=correct, examples=examples, batches=batches,
                nonfinite=nonfinite, clients=clients,
            )
            return sums, stats

        return run

    @tff.tensorflow.computation(weights_type, agg_state_type, group_type(input_shape, ship))
    def train_group(weights, agg_state, group):
        return group_trainer(model_fn())(weights, agg_state, group)

    sums_type, stats_type = train_group.type_signature.result

    # --- server side: aggregation, server optimizer and metrics in one call ----------
    @tff.tensorflow.computation
    def optimizer_init():
        return server_optimizer.initialize(tuple(tf.TensorSpec(t.shape, t.dtype) for t in weights_type.trainable))

    optimizer_state_type = optimizer_init.type_signature.result

    def aggregate(agg_state, sums, stats):
        """(mean update, new aggregator state, aggregator measurements)."""
        clients = tf.cast(tf.maximum(stats["clients"], 1), tf.float32)
        if mode == CENTRAL:
            update, new_state, _ = query.get_noised_result(sums, agg_state)
            return update, new_state, collections.OrderedDict(dp_query_metrics=query.derive_metrics(new_state))
        update = [t / clients for t in sums["total"]]
        if mode == NONE:
            return update, agg_state + 1, collections.OrderedDict()
        key = "noise_std" if local_mechanism == local.GAUSSIAN else "laplace_scale"
        return update, agg_state + 1, collections.OrderedDict(
            clients=tf.cast(stats["clients"], tf.float32),
            **{key: tf.constant(noise_multiplier * clip_norm, tf.float32)},
        )

    @tff.tensorflow.computation(weights_type, agg_state_type, optimizer_state_type, sums_type, stats_type)
    @tf.function
    def server_step(weights, agg_state, optimizer_state, sums, stats):
        update, new_agg_state, agg_metrics = aggregate(agg_state, sums, stats)
        update = tuple(update)
        # As TFF's build_apply_optimizer_finalizer: a non-finite update is not applied.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
        new_optimizer_state, trainable = server_optimizer.next(optimizer_state, tuple(weights.trainable), update)
        if not finite:
            new_optimizer_state, trainable = optimizer_state, tuple(weights.trainable)
        if mode == LOCAL:  # the clients sent no training statistic (see the module docstring)
            train_metrics = collections.OrderedDict()
            aggregator_metrics = collections.OrderedDict(inner=agg_metrics)
        else:
            n = tf.cast(tf.maximum(stats["examples"], 1), tf.float32)
            train_metrics = collections.OrderedDict(
                accuracy=stats["correct"] / n,
                loss=stats["loss_sum"] / n,
                num_examples=stats["examples"],
                num_batches=stats["batches"],
            )
            aggregator_metrics = collections.OrderedDict(
                inner=agg_metrics, nonfinite_clients=tf.cast(stats["nonfinite"], tf.int32)
            )
        metrics = collections.OrderedDict(
            distributor=(),
            client_work=collections.OrderedDict(train=train_metrics),
            aggregator=aggregator_metrics,
            finalizer=collections.OrderedDict(update_non_finite=1 - tf.cast(finite, tf.int32)),
        )
        new_weights = tff.learning.models.ModelWeights(list(trainable), list(weights.non_trainable))
        return new_weights, new_agg_state, new_optimizer_state, metrics

    @tff.federated_computation
    def init_fn():
        return tff.federated_zip(
            tff.learning.templates.LearningAlgorithmState(
                global_model_weights=tff.federated_eval(initial_weights, tff.SERVER),
                distributor=tff.federated_value((), tff.SERVER),
                client_work=tff.federated_value((), tff.SERVER),
                aggregator=tff.federated_eval(agg_init, tff.SERVER),
                finalizer=tff.federated_eval(optimizer_init, tff.SERVER),
            )
        )

    state_type = init_fn.type_signature.result

    @tff.federated_computation(state_type, tff.FederatedType(group_type(input_shape, ship), tff.CLIENTS))
    def next_fn(state, groups):
        weights_at_clients = tff.federated_broadcast(state.global_model_weights)
        agg_state_at_clients = tff.federated_broadcast(state.aggregator)
        sums, stats = tff.federated_map(train_group, (weights_at_clients, agg_state_at_clients, groups))
        weights, agg_state, optimizer_state, metrics = tff.federated_map(
            server_step,
            (state.global_model_weights, state.aggregator, state.finalizer, tff.federated_sum(sums),
             tff.federated_sum(stats)),
        )
        new_state = tff.federated_zip(
            tff.learning.templates.LearningAlgorithmState(
                global_model_weights=weights,
                distributor=state.distributor,
                client_work=state.client_work,
                aggregator=agg_state,
                finalizer=optimizer_state,
            )
        )
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    @tff.tensorflow.computation(state_type.member)
    def get_model_weights(state):
        return state.global_model_weights

    @tff.tensorflow.computation(state_type.member, state_type.member.global_model_weights)
    def set_model_weights(state, weights):
        return tff.learning.templates.LearningAlgorithmState(
            global_model_weights=weights,
            distributor=state.distributor,
            client_work=state.client_work,
            aggregator=state.aggregator,
            finalizer=state.finalizer,
        )

    return tff.learning.templates.LearningProcess(init_fn, next_fn, get_model_weights, set_model_weights)
