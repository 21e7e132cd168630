"""Seconds per federated round: dpfl_tff's TFF process next to a plain-TensorFlow reference, one run.

  uv run python scripts/bench_round.py [--models=cnn,mlp] [--clients_per_round=10]
      [--examples_per_client=100] [--batch_size=20] [--rounds=10] [--memory_rounds=0]
      [--worker_counts=1,2] [--pin_workers --worker_clients=100 --worker_rounds=3]
      [--dp_sgd=true --dp_sgd_models=cnn,mlp --dp_sgd_examples=400 --dp_sgd_repeats=5]
  uv run python scripts/bench_round.py --models= --worker_counts= --driver_startup=false --eval_sizes=
      (the DP-SGD epochs alone)
  uv run python scripts/bench_round.py --models= --worker_counts= --population=100000
      [--population_cohorts=250,500,1000] [--population_rounds=200]

Both run the same round on the same synthetic EMNIST-shaped data (28x28x1,
10 classes): every client does one local epoch of SGD from the server model,
its delta is clipped to L2 norm C, the deltas are summed, Gaussian noise of std
z*C is added, the sum is divided by the cohort size and applied by server SGD.
The reference (`_Reference`, kept here, never used by the library) is that
whole round in one `tf.function` over in-memory tensors. dpfl_tff's round runs
as the round loop runs it (`runtime.states_in_worker`: the state stays in the
worker, only the metrics come back); a third arm runs it with the state back in
Python every round (`..._state_back`, as before the state stayed there). Rounds
of the three are interleaved, after one warm-up round each; then TFF's own FedAvg with the same
aggregator (`fedavg_impl="tff"`) is timed. Prints one JSON object: seconds per
round for each and their ratios to the reference per model, start-up time (process start to the
end of dpfl_tff's first round, of this script and of the README's main command run for one round
as a new process), peak RSS of this process and of the TFF
worker, the per-round accounting time, the time of a round with twice the
clients (a fixed part plus a part linear in the cohort: ratio <= 2) and with no
client (the fixed cost: state to the worker and back, server step), the
state's round trip alone (an identity computation) and an empty TFF call, one
`get_model_weights` call, a central evaluation on test sets of the digits' and
EMNIST's sizes (the cost of `--eval_every`, also as a ratio to a round), with
--memory_rounds=N the RSS slope over N MLP rounds, and seconds per round of the
first model over 1 and 2 local worker services (`--workers`' remote context;
with --pin_workers worker i runs on CPU i only, so 2 workers on 2 cores are
compared with 1 worker on 1 core, and each worker's CPU seconds show the split; --worker_tls: the 2 workers
also through mutual TLS, `ratio_2_tls_over_2_workers`; then plain TensorFlow's
local SGD of the same model on one core alone and on both cores at once gives the speed-up two cores
allow that work at best, `core_scaling`).

`--dp_sgd` (on by default) times one client's local epoch (--dp_sgd_examples
records, --batch_size) with DP-SGD (`--dp_level=example`: the client code of
`grouped_fedavg`), the same epoch without privacy, tensorflow-privacy's
`DPKerasSGDOptimizer` with one microbatch per example (the peer), and DP-SGD's
noise alone and DP-SGD without its noise, for each of --dp_sgd_models, interleaved in one run; the ratios
are in `dp_sgd` (`_dp_sgd_epochs`).

`--population=N` also runs (last) full runs (`training.run`: sampling, ledger,
metrics, checkpoints) of a small MLP on a synthetic task of N clients, one per
cohort size m in --population_cohorts (Poisson sampling): seconds per round
and their ratio to the smallest m (linear in m: the ratio of the m's), RSS of
this process and of the worker after every round (first, last, max, slope per
100 rounds over the largest m's --population_rounds rounds), and the time to
sample a cohort and prepare its input at N and at 10N (O(m): ratio near 1).
"""

from __future__ import annotations

import time

_T0 = time.time()  # before the heavy imports: start-up time counts them

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dpfl_tff import runtime, training  # noqa: E402
from dpfl_tff.grouped_fedavg import ClientFiles  # noqa: E402
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig  # noqa: E402
from dpfl_tff.paper_models import PAPER_MODELS  # noqa: E402
from dpfl_tff.privacy import accounting  # noqa: E402
from dpfl_tff.tasks.base import ClientArrays, FederatedData  # noqa: E402

MODELS = flags.DEFINE_list("models", ["cnn", "mlp"], "cnn (emnist_cnn_dropout) and/or mlp (emnist_2nn).")
COHORT = flags.DEFINE_integer("clients_per_round", 10, "Clients per round.")
EXAMPLES = flags.DEFINE_integer("examples_per_client", 100, "Examples per client.")
BATCH = flags.DEFINE_integer("batch_size", 20, "Local batch size.")
ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds per implementation and model (after one warm-up).")
MEMORY_ROUNDS = flags.DEFINE_integer(
    "memory_rounds", 0,
    "If > 0: also run the MLP (emnist_2nn) this many rounds and report the RSS slope (MB per 100 rounds) of "
    "this process and of the worker, from samples after the first 10%% of rounds.",
)
WORKER_COUNTS = flags.DEFINE_list(
    "worker_counts", ["1", "2"],
    "Numbers of local TFF worker services to time the first of --models on, through the remote "
    "(--workers) execution context; empty: skip.",
)
POPULATION = flags.DEFINE_integer(
    "population", 0,
    "If > 0: also (after the rest; --models= --worker_counts= for this alone) full runs (training.run: "
    "sampling, ledger, metrics, checkpoints) of a small MLP on a synthetic task with this many clients (N), "
    "one per --population_cohorts value.",
)
POP_COHORTS = flags.DEFINE_list("population_cohorts", ["250", "500", "1000"],
                                "Population mode: expected clients per round (m, Poisson sampling).")
POP_ROUNDS = flags.DEFINE_integer(
    "population_rounds", 200,
    "Population mode: rounds of the largest cohort (memory sampled after every round).")
POP_TIMING_ROUNDS = flags.DEFINE_integer("population_timing_rounds", 20,
                                         "Population mode: rounds of each smaller cohort (>= 3).")
POP_EXAMPLES = flags.DEFINE_integer("population_examples_per_client", 5, "Population mode: examples per client.")
PIN_WORKERS = flags.DEFINE_bool(
    "pin_workers", False,
    "Worker timing: pin worker i to CPU i (taskset), so 1 worker on 1 core is compared with 2 workers on 2 cores.")
WORKER_CLIENTS = flags.DEFINE_integer("worker_clients", 0,
                                      "Worker timing: clients per round (0: --clients_per_round).")
WORKER_ROUNDS = flags.DEFINE_integer("worker_rounds", 0,
                                     "Worker timing: timed rounds per turn of each worker count (0: --rounds).")
WORKER_CYCLES = flags.DEFINE_integer("worker_cycles", 2, "Worker timing: turns of each worker count (>= 1).")
WORKER_TLS = flags.DEFINE_bool(
    "worker_tls", True,
    "Worker timing, with 2 in --worker_counts: also a turn of the same 2 workers through mutual TLS "
    "(--worker_credentials: one TLS front process per worker, as run_worker runs it, pinned with its worker), "
    "as 2_tls_workers_*, and its ratio to the plain 2 workers.")
EVAL_SIZES = flags.DEFINE_list(
    "eval_sizes", ["360", "40832"],
    "Test set sizes (examples) of the evaluation timing: the digits' 20%% split (360) and TFF's EMNIST-62 test "
    "clients (40,832); empty: skip.")
CORE_STEPS = flags.DEFINE_integer(
    "core_scaling_steps", 100,
    "With --pin_workers and 2 in --worker_counts: SGD steps of the model (batch 20) per timing of plain TensorFlow "
    "on one core, alone and with a second copy on the other core (what two cores give this workload at best); "
    "0: skip.")
DRIVER_STARTUP = flags.DEFINE_bool(
    "driver_startup", True,
    "Also time the README's main command (configs/quickstart.cfg, --rounds=1) as a new process: seconds from its "
    "start to its first round's progress line.")
DP_SGD = flags.DEFINE_bool(
    "dp_sgd", True,
    "Also time a DP-SGD local epoch (--dp_level=example: the library's client code path) against the same "
    "non-private local epoch and against tensorflow-privacy's DPKerasSGDOptimizer with one microbatch per "
    "example, for each of --dp_sgd_models; false: skip.")
DP_SGD_MODELS = flags.DEFINE_list("dp_sgd_models", ["cnn", "mlp"], "DP-SGD timing: the models (cnn, mlp).")
DP_SGD_EXAMPLES = flags.DEFINE_integer(
    "dp_sgd_examples", 400, "DP-SGD timing: the client's records n (an epoch: ceil(n / --batch_size) steps).")
DP_SGD_REPEATS = flags.DEFINE_integer("dp_sgd_repeats", 5,
                                      "DP-SGD timing: timed epochs of each of the three (interleaved; medians).")
CLIP, Z, CLIENT_LR = 0.1, 1.0, 0.05
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAMES = {"cnn": "emnist_cnn_dropout", "mlp": "emnist_2nn"}


def _data(m: int, n: int, seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    clients = [
        ClientArrays(rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32))
        for _ in range(m)
    ]
    return FederatedData(clients, clients[0], (28, 28, 1), 10, "bench")


class _Reference:
    """The whole DP-FedAvg round in one tf.function (plain TensorFlow, no TFF)."""

    def __init__(self, model_name: str, data: FederatedData, batch: int):
        self.model = PAPER_MODELS[model_name]((28, 28, 1), 10)
        self.client = PAPER_MODELS[model_name]((28, 28, 1), 10)
        self.x = tf.constant(np.stack([c.x for c in data.clients]))
        self.y = tf.constant(np.stack([c.y for c in data.clients]))
        self.batch = batch
        self.loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def round(self):
        m = tf.shape(self.x)[0]
        n = tf.shape(self.x)[1]
        total = [tf.zeros_like(v) for v in self.model.trainable_variables]
        for i in tf.range(m):
            for cv, sv in zip(self.client.trainable_variables, self.model.trainable_variables):
                cv.assign(sv)
            for start in tf.range(0, n, self.batch):
                xb = self.x[i, start:start + self.batch]
                yb = self.y[i, start:start + self.batch]
                with tf.GradientTape() as tape:
                    loss = self.loss(yb, self.client(xb, training=True))
                grads = tape.gradient(loss, self.client.trainable_variables)
                for v, g in zip(self.client.trainable_variables, grads):
                    v.assign_sub(CLIENT_LR * g)
            delta = [cv - sv for cv, sv in zip(self.client.trainable_variables, self.model.trainable_variables)]
            delta, _ = tf.clip_by_global_norm(delta, CLIP)
            total = [t + d for t, d in zip(total, delta)]
        mf = tf.cast(m, tf.float32)
        for v, t in zip(self.model.trainable_variables, total):
            v.assign_add((t + tf.random.normal(tf.shape(t), stddev=Z * CLIP)) / mf)


def _status_mb(pid: int | str, field: str) -> float:
    """A memory field of /proc/PID/status (VmRSS: current, VmHWM: peak) in MB; nan if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


_CORE_JOB = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from dpfl_tff.paper_models import PAPER_MODELS
model = PAPER_MODELS[sys.argv[2]]((28, 28, 1), 10)
x, y = tf.random.uniform((20, 28, 28, 1)), tf.zeros((20,), tf.int32)
loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

@tf.function(autograph=False)  # no source to convert: this runs with python -c
def steps(n):
    def step(i):
        with tf.GradientTape() as tape:
            batch_loss = loss(y, model(x, training=True))
        grads = tape.gradient(batch_loss, model.trainable_variables)
        with tf.control_dependencies([v.assign_sub(0.01 * g) for v, g in zip(model.trainable_variables, grads)]):
            return i + 1
    return tf.while_loop(lambda i: i < n, step, [tf.constant(0)])

steps(tf.constant(1))
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    steps(tf.constant(int(line)))
    print(time.perf_counter() - t, flush=True)
"""


def _core_scaling(name: str, steps: int, cycles: int = 5) -> dict:
    """What two cores give plain TensorFlow's local SGD of `name` at best: one process per core (pinned, one
    TF thread each), timed alone (CPU 0) and both at once, alternately, `cycles` times (medians).

    Two copies on two cores each run slower than one alone where the cores share caches, memory bandwidth or a
    physical core (a VM's vCPUs), so 2 x alone / together bounds the 2-worker speed-up of the same work.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _CORE_JOB, str(cpu), name], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for cpu in (0, 1)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"core scaling job exited with {p.wait()}")

        def timed(ps):
            for p in ps:
                p.stdin.write(f"{steps}\n")
                p.stdin.flush()
            return max(float(p.stdout.readline()) for p in ps)

        alone, both = [], []
        for _ in range(cycles):
            alone.append(timed(procs[:1]))
            both.append(timed(procs))
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    a, b = statistics.median(alone), statistics.median(both)
    return {"steps": steps, "one_core_alone_seconds": a, "two_cores_together_seconds": b,
            "speedup_bound_2_cores": 2 * a / b}


def _driver_startup(tmp: str) -> dict:
    """The quickstart's driver for one round in a new Python process (as `uv run` starts it, without uv's own
    start): seconds to its first round's line (imports, data, building the process, starting the worker, the
    round) and to its exit (evaluation, summary, plot, worker stopped)."""
    cmd = [sys.executable, "-m", "experiments.run_federated", "--flagfile=configs/quickstart.cfg", "--rounds=1",
           f"--output_dir={os.path.join(tmp, 'driver_startup')}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("round 1/"):
            first = time.perf_counter() - t
    proc.wait()
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} (first round seen: {first is not None})")
    return {"command": "python -m experiments.run_federated --flagfile=configs/quickstart.cfg --rounds=1",
            "seconds_to_first_round": first, "seconds_to_exit": time.perf_counter() - t}


def _dp_sgd_epochs(name: str, n: int, b: int, repeats: int) -> dict:
    """Seconds of one local epoch of client `n` records, batch b: DP-SGD, non-private SGD, tensorflow-privacy.

    The first two are the client code of `grouped_fedavg._GroupTrainer` itself (`_dp_sgd_training`: Poisson
    batches of expected size b, vectorized per-example clipping, float64 noise; `_local_training`: ceil(n/b)
    batches of b), each in its own `tf.function(autograph=False)` as the grouped process traces it, with the
    same client optimizer (TFF's SGD). The peer is tensorflow-privacy's `DPKerasSGDOptimizer` with
    `num_microbatches` = b (one microbatch per example), ceil(n/b) `minimize` steps in one `tf.function`.
    The three are run in turn, with a fourth: the same number of steps of DP-SGD's noise alone
    (`noised_mean_gradient` on an empty batch: one float64 Gaussian per parameter per step), `repeats` times
    after one warm-up each (medians), and a fifth: DP-SGD traced with the noise left out (`sampler.add_noise`
    replaced by the identity while tracing), what the Poisson batches and the per-example clipping cost
    (`ratio_dp_sgd_without_noise_timed_over_non_private`; `ratio_dp_sgd_without_noise_over_non_private` is the
    rougher (DP-SGD - noise alone) / non-private).
    """
    import collections

    import tensorflow_federated as tff
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasSGDOptimizer

    from dpfl_tff.grouped_fedavg import _GroupTrainer
    from dpfl_tff.privacy import dp_sgd

    rng = np.random.default_rng(2)
    x = tf.constant(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, n).astype(np.int32))
    model = PAPER_MODELS[name]((28, 28, 1), 10)
    weights = collections.namedtuple("Weights", "trainable non_trainable")(
        [tf.constant(v.numpy()) for v in model.trainable_variables],
        [tf.constant(v.numpy()) for v in model.non_trainable_variables])

    def stats():
        return collections.OrderedDict(loss_sum=tf.constant(0.0), correct=tf.constant(0.0),
                                       examples=tf.constant(0, tf.int64), batches=tf.constant(0, tf.int64),
                                       nonfinite=tf.constant(0, tf.int64))

    def trainer(spec=None):
        return _GroupTrainer(None, tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR), b, (28, 28, 1),
                             None, False, dp_sgd_spec=spec)

    private = trainer(dp_sgd.LocalDPSGD(clip=1.0, noise_multiplier=1.0, expected_batch=b, epochs=1))
    plain = trainer()
    order = tf.range(n)

    @tf.function(autograph=False)
    def dp_epoch():
        delta, s = private._dp_sgd_training(model, weights, x, y, tf.constant(n), stats())
        return delta[0][0], s["batches"]

    @tf.function(autograph=False)
    def plain_epoch():
        delta, s = plain._local_training(model, weights, x, y, order, tf.constant(n), stats())
        return delta[0][0], s["batches"]

    peer_model = PAPER_MODELS[name]((28, 28, 1), 10)
    peer_opt = DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=b,
                                   learning_rate=CLIENT_LR)
    peer_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                              reduction=tf.keras.losses.Reduction.NONE)
    steps = -(-n // b)
    xs = tf.reshape(x[: steps * b] if n >= steps * b else tf.concat([x, x[: steps * b - n]], 0), [steps, b, 28, 28, 1])
    ys = tf.reshape(y[: steps * b] if n >= steps * b else tf.concat([y, y[: steps * b - n]], 0), [steps, b])

    @tf.function
    def peer_epoch():
        for i in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = peer_loss(ys[i], peer_model(xs[i], training=True))
            peer_opt.minimize(loss, peer_model.trainable_variables, tape=tape)
        return peer_model.trainable_variables[0][0]

    @tf.function(autograph=False)
    def noise_epoch():  # the noise of dp_epoch's steps alone: noised_mean_gradient on an empty batch
        def body(k, acc):
            g = dp_sgd.noised_mean_gradient(model, plain.loss_fn, x[:0], y[:0], 1.0, 1.0, b)
            return k + 1, acc + tf.add_n([tf.reshape(t, [-1])[0] for t in g])

        return tf.while_loop(lambda k, _: k < steps, body, (tf.constant(0), tf.constant(0.0)))[1], steps

    @tf.function(autograph=False)
    def clip_epoch():  # dp_epoch without its noise: traced below with sampler.add_noise returning its input
        delta, s = private._dp_sgd_training(model, weights, x, y, tf.constant(n), stats())
        return delta[0][0], s["batches"]

    from unittest import mock

    with mock.patch.object(dp_sgd.sampler, "add_noise", lambda value, scale, **kw: value):
        clip_epoch.get_concrete_function()  # the graph keeps no noise op; nothing else is traced meanwhile

    fns = {"dp_sgd": dp_epoch, "non_private": plain_epoch, "tf_privacy_microbatches": peer_epoch,
           "dp_sgd_noise_only": noise_epoch, "dp_sgd_without_noise": clip_epoch}
    times: dict[str, list[float]] = {k: [] for k in fns}
    dp_steps = int(dp_epoch()[1])
    plain_steps = int(plain_epoch()[1])
    peer_epoch()
    noise_epoch()
    clip_epoch()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            np.asarray(fn()[0])
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "records": n, "batch_size": b, "steps_per_epoch": steps, "dp_sgd_steps": dp_steps,
            "non_private_steps": plain_steps, "repeats": repeats,
            **{f"{k}_seconds_per_epoch": v for k, v in med.items()},
            "ratio_dp_sgd_over_non_private": med["dp_sgd"] / med["non_private"],
            "speedup_dp_sgd_over_tf_privacy_microbatches": med["tf_privacy_microbatches"] / med["dp_sgd"],
            "ratio_dp_sgd_noise_only_over_non_private": med["dp_sgd_noise_only"] / med["non_private"],
            "ratio_dp_sgd_without_noise_over_non_private": (med["dp_sgd"] - med["dp_sgd_noise_only"])
            / med["non_private"],
            "ratio_dp_sgd_without_noise_timed_over_non_private": med["dp_sgd_without_noise"] / med["non_private"],
            "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables))}


def _worker_peak_rss_mb() -> float:
    return max([_status_mb(pid, "VmHWM") for pid in runtime.live_worker_pids()], default=0.0)


def _config(name: str, m: int, tmp: str, workers: tuple[str, ...] = (), impl: str = "grouped") -> ExperimentConfig:
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=m),
        train=TrainConfig(model=name, clients_per_round=m, client_sampling="uniform",
                          client_batch_size=BATCH.value, client_learning_rate=CLIENT_LR,
                          server_optimizer="sgd", server_learning_rate=1.0, fedavg_impl=impl),
        dp=DPConfig(noise_multiplier=Z, clip_norm=CLIP), output_dir=tmp, workers=workers,
        insecure_workers=bool(workers),  # the plain turns; the TLS turn passes its credential to remote_context
    ).validate()


def _memory_slope(data: FederatedData, tmp: str, rounds: int) -> dict:
    """RSS of this process and of the worker over `rounds` MLP rounds: least-squares slope per 100 rounds."""
    m = len(data.clients)
    cfg = _config("emnist_2nn", m, tmp)
    with training.client_files(cfg, data) as files:
        process = training.build_learning_process(cfg, data, files)
        state = training.initial_state(process, cfg, data)
        (worker,) = runtime.live_worker_pids()
        every = max(1, rounds // 50)
        xs, py, wk = [], [], []
        for r in range(1, rounds + 1):
            state = process.next(state, training.round_input(cfg, data, range(m), r, files)).state
            if r % every == 0 and r > rounds // 10:
                xs.append(r)
                py.append(_status_mb("self", "VmRSS"))
                wk.append(_status_mb(worker, "VmRSS"))
    out = {"model": "emnist_2nn", "rounds": rounds, "samples": len(xs)}
    for name, ys in (("python", py), ("worker", wk)):
        out[f"{name}_rss_mb_first"], out[f"{name}_rss_mb_last"] = ys[0], ys[-1]
        out[f"{name}_rss_slope_mb_per_100_rounds"] = float(np.polyfit(xs, ys, 1)[0] * 100) if len(xs) > 1 else 0.0
    return out


def _cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# One TLS front (dpfl_tff.worker_auth.TlsFront, what run_worker --worker_credentials runs) in a process of its
# own, in front of an existing worker: argv credential folder, front port, worker port.
_FRONT = ("import sys, time\nfrom dpfl_tff import worker_auth as a\n"
          "front = a.TlsFront(a.bound_socket(int(sys.argv[2])), int(sys.argv[3]), a.load(sys.argv[1], 'worker'),"
          " lambda line: None)\nprint('up', flush=True)\nsys.stdin.read()\nfront.close()\n")


def _start_fronts(credentials: str, worker_ports: list[int], pin: bool) -> list[tuple[subprocess.Popen, int]]:
    """A TLS front process for each worker port (on CPU i with worker i when pinned); (process, front port)."""
    import portpicker

    fronts = []
    for i, worker_port in enumerate(worker_ports):
        port = portpicker.pick_unused_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", _FRONT, credentials, str(port), str(worker_port)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, preexec_fn=(lambda i=i: os.sched_setaffinity(0, {i})) if pin else None)
        fronts.append((proc, port))
    for proc, _ in fronts:
        if proc.stdout.readline().strip() != "up":
            raise RuntimeError(f"TLS front pid {proc.pid} did not start")
    return fronts


def _time_workers(name: str, data: FederatedData, tmp: str) -> dict:
    """Seconds per round of `name` over n local worker services (remote context), for each n.

    With --pin_workers, worker i runs on CPU i only (set before it starts, as
    `taskset -c i`): 1 worker on 1 core against n workers on n cores, the
    speed-up a machine per worker would give. The worker counts take turns,
    --worker_cycles times (a warm-up round, then --worker_rounds timed rounds
    each turn; medians), so that a slower or faster spell of the machine
    does not fall on one of them. Also reports each worker's CPU seconds per
    round (an even split halves them) and this process' (the split, merge and
    (de)serialization TFF does in Python).

    With --worker_tls, a turn "2_tls" runs the same two workers through
    mutual TLS: a TLS front process per worker (pinned with it), the driver
    on gRPC TLS channels with the run's credential; its fronts' CPU seconds per
    round are reported too.
    """
    m = len(data.clients)
    pin = PIN_WORKERS.value
    counts = [int(x) for x in WORKER_COUNTS.value]
    if WORKER_CYCLES.value < 1:
        raise app.UsageError(f"--worker_cycles={WORKER_CYCLES.value}: must be >= 1")
    out: dict = {"model": name, "clients_per_round": m, "pinned_one_core_per_worker": pin,
                 "cycles": WORKER_CYCLES.value}
    if pin and max(counts) > os.cpu_count():
        raise app.UsageError(f"--pin_workers: {max(counts)} workers need {max(counts)} CPUs, "
                             f"this machine has {os.cpu_count()}")
    procs = [runtime.start_worker(cpus={i} if pin else None) for i in range(max(counts))]  # n workers: the first n
    fronts: list[tuple[subprocess.Popen, int]] = []
    try:
        # turn label -> (workers used, addresses, credential)
        turns = {str(n): (n, tuple(f"localhost:{port}" for _, port in procs[:n]), None) for n in counts}
        if WORKER_TLS.value and 2 in counts:
            from dpfl_tff import worker_auth

            folder = os.path.join(tmp, "credentials")
            worker_auth.make_credentials(folder)
            fronts = _start_fronts(os.path.join(folder, "worker"), [port for _, port in procs[:2]], pin)
            turns["2_tls"] = (2, tuple(f"localhost:{port}" for _, port in fronts),
                              worker_auth.load(folder, "driver"))
        cfgs = {label: _config(name, m, tmp, addresses) for label, (_, addresses, _) in turns.items()}
        process = training.build_learning_process(cfgs[str(counts[0])], data)
        times: dict[str, list[float]] = {label: [] for label in turns}
        cpu: dict[str, list[float]] = {label: [0.0] * (n + 1 + (n if credential else 0))
                                       for label, (n, _, credential) in turns.items()}
        state, r = None, 0
        for _ in range(WORKER_CYCLES.value):
            for label, (n, addresses, credential) in turns.items():
                cfg = cfgs[label]
                with runtime.remote_context(list(addresses), timeout=60, credential=credential):
                    if state is None:
                        state = training.initial_state(process, cfg, data)
                    r += 1
                    state = process.next(state, training.round_input(cfg, data, range(m), r)).state  # warm-up
                    pids = [p.pid for p, _ in procs[:n]] + ["self"] + ([p.pid for p, _ in fronts] if credential else [])
                    cpu0 = [_cpu_seconds(p) for p in pids]
                    for _ in range(WORKER_ROUNDS.value or ROUNDS.value):
                        r += 1
                        t = time.perf_counter()
                        state = process.next(state, training.round_input(cfg, data, range(m), r)).state
                        times[label].append(time.perf_counter() - t)
                    cpu[label] = [c + _cpu_seconds(p) - c0 for c, p, c0 in zip(cpu[label], pids, cpu0)]
        for label, (n, _, credential) in turns.items():
            k = len(times[label])
            out[f"{label}_workers_seconds_per_round"] = statistics.median(times[label])
            out[f"{label}_workers_worker_cpu_seconds_per_round"] = [c / k for c in cpu[label][:n]]
            out[f"{label}_workers_python_cpu_seconds_per_round"] = cpu[label][n] / k
            if credential:
                out[f"{label}_workers_front_cpu_seconds_per_round"] = [c / k for c in cpu[label][n + 1:]]
    finally:
        for proc, _ in fronts:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc, _ in procs:
            runtime.stop_worker(proc)
    if "1_workers_seconds_per_round" in out and "2_workers_seconds_per_round" in out:
        out["ratio_2_over_1_workers"] = out["2_workers_seconds_per_round"] / out["1_workers_seconds_per_round"]
        out["speedup_2_over_1_workers"] = 1 / out["ratio_2_over_1_workers"]
    if "2_tls_workers_seconds_per_round" in out:
        out["ratio_2_tls_over_2_workers"] = out["2_tls_workers_seconds_per_round"] / out["2_workers_seconds_per_round"]
    return out


def _state_round_trip_seconds(process, state, repeats: int = 10) -> tuple[float, float]:
    """Median seconds of (the state to the worker and back through an identity computation, an empty TFF call)."""
    import tensorflow_federated as tff

    state_type = process.next.type_signature.parameter[0]

    @tff.federated_computation(state_type)
    def identity(s):
        return tff.federated_map(tff.tensorflow.computation(lambda x: x, state_type.member), s)

    @tff.federated_computation
    def empty():
        return tff.federated_value(0, tff.SERVER)

    out = []
    for call in (lambda: identity(state), empty):
        call()  # warm-up: compilation
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out.append(statistics.median(times))
    return out[0], out[1]


def _evaluation_seconds(cfg: ExperimentConfig, data: FederatedData, weights) -> dict[str, float]:
    """Seconds of one central evaluation (`--eval_every`) on test sets of the digits' and EMNIST's sizes."""
    out = {}
    rng = np.random.default_rng(1)
    for size in [int(x) for x in EVAL_SIZES.value]:
        key = f"{size}_examples"
        test = ClientArrays(rng.random((size, *data.input_shape), dtype=np.float32),
                            rng.integers(0, data.num_classes, size).astype(np.int32))
        evaluate = training.Evaluator(cfg, FederatedData(data.clients, test, data.input_shape, data.num_classes, key))
        evaluate(weights)  # warm-up: tracing
        times = []
        for _ in range(3):
            t = time.perf_counter()
            evaluate(weights)
            times.append(time.perf_counter() - t)
        out[f"eval_seconds_{key}"] = statistics.median(times)
    return out


def _population_config(n: int, m: int, rounds: int, out: str) -> ExperimentConfig:
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=n, synthetic_examples_per_client=POP_EXAMPLES.value,
                        synthetic_input_dim=32, synthetic_num_classes=10, test_fraction=0.01),
        train=TrainConfig(model="mlp", rounds=rounds, clients_per_round=m, client_sampling="poisson",
                          client_batch_size=BATCH.value, client_learning_rate=CLIENT_LR, server_optimizer="sgd",
                          server_learning_rate=1.0, eval_every=0, checkpoint_every=50),
        dp=DPConfig(noise_multiplier=Z, clip_norm=CLIP), output_dir=out,
    ).validate()


def _prep_seconds(n: int, m: int, tmp: str, repeats: int = 20) -> float:
    """Median seconds to sample a round's cohort and build its input, at population n (no TFF call).

    Every client holds the same small arrays (a list of n references), so the
    population costs no memory: what is timed is the per-round work only.
    """
    from dpfl_tff.sampling import CohortSampler
    from dpfl_tff.tasks.synthetic import load

    cfg = _population_config(n, m, 1, tmp)
    one = load(TaskConfig(task="synthetic", num_clients=1, synthetic_examples_per_client=POP_EXAMPLES.value), 0)
    data = FederatedData([one.clients[0]] * n, one.test, one.input_shape, one.num_classes, "prep")
    sampler = CohortSampler("poisson", n, m)
    times = []
    with tempfile.TemporaryDirectory() as root:
        files = ClientFiles(data, root)
        for r in range(1, repeats + 1):
            t = time.perf_counter()
            training.round_input(cfg, data, sampler.cohort(r), r, files)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _after_warmup(xs: list[float]) -> list[float]:
    """All but the first two rounds (tracing, first file writes), when there are more."""
    return xs[2:] or xs


def _population(n: int, tmp: str) -> dict:
    """Full runs at population n for each cohort size: s/round, memory over rounds, O(m) preparation."""
    cohorts = sorted(int(x) for x in POP_COHORTS.value)
    out: dict = {"num_clients": n, "examples_per_client": POP_EXAMPLES.value, "model": "mlp (synthetic, dim 32)",
                 "client_sampling": "poisson", "cohorts": {}}
    for m in cohorts:
        rounds = POP_ROUNDS.value if m == cohorts[-1] else POP_TIMING_ROUNDS.value
        cfg = _population_config(n, m, rounds, os.path.join(tmp, f"population_{m}"))
        samples: list[tuple[float, float, float]] = []  # (wall clock, python RSS, worker RSS) after each round

        def sample(line: str) -> None:  # the progress line: once per round, after its writes
            if line.startswith("round "):
                (worker,) = runtime.live_worker_pids()
                samples.append((time.perf_counter(), _status_mb("self", "VmRSS"), _status_mb(worker, "VmRSS")))

        t0 = time.perf_counter()
        result = training.run(cfg, log=sample)
        wall = [b[0] - a[0] for a, b in zip(samples, samples[1:])]  # a whole round: loop, writes, accounting
        steady = slice(max(1, len(samples) // 10), None)
        xs = np.arange(1, len(samples) + 1)[steady]
        entry = {
            "rounds": len(result.records),
            # The same window for every m (rounds 3..--population_timing_rounds: most clients new, their files
            # written), so that the ratios compare like with like; the largest m also over all its rounds.
            "seconds_per_round_process": statistics.median(
                _after_warmup([r["round_seconds"] for r in result.records[:POP_TIMING_ROUNDS.value]])),
            "seconds_per_round_process_all_rounds": statistics.median(
                _after_warmup([r["round_seconds"] for r in result.records])),
            "seconds_per_round_wall": statistics.median(_after_warmup(wall)),
            "mean_clients_per_round": float(np.mean([r["clients_this_round"] for r in result.records])),
            "run_seconds": time.perf_counter() - t0,
            "epsilon": result.summary["epsilon"],
        }
        for k, name in ((1, "python"), (2, "worker")):
            ys = np.array([s[k] for s in samples])[steady]
            entry[f"{name}_rss_mb_first"], entry[f"{name}_rss_mb_last"] = float(ys[0]), float(ys[-1])
            entry[f"{name}_rss_mb_max"] = float(ys.max())
            entry[f"{name}_rss_slope_mb_per_100_rounds"] = float(np.polyfit(xs, ys, 1)[0] * 100) if len(xs) > 1 else 0.0
        out["cohorts"][str(m)] = entry
    base = out["cohorts"][str(cohorts[0])]["seconds_per_round_process"]
    for m in cohorts:
        e = out["cohorts"][str(m)]
        e["ratio_seconds_over_smallest_cohort"] = e["seconds_per_round_process"] / base
        e["ratio_cohort_over_smallest_cohort"] = m / cohorts[0]
    m = cohorts[-1]
    prep_n, prep_10n = _prep_seconds(n, m, tmp), _prep_seconds(10 * n, m, tmp)
    out["preparation"] = {"clients_per_round": m, "seconds_at_n": prep_n, "seconds_at_10n": prep_10n,
                          "ratio_10n_over_n": prep_10n / prep_n}
    return out


def main(argv):
    del argv
    m, n = COHORT.value, EXAMPLES.value
    data = _data(m, n)
    report: dict = {"clients_per_round": m, "examples_per_client": n, "batch_size": BATCH.value,
                    "rounds": ROUNDS.value}
    worker_peak = 0.0
    with tempfile.TemporaryDirectory() as tmp, runtime.local_context():
        for key in MODELS.value:
            name = _NAMES[key]
            cfg, cfg_tff = _config(name, m, tmp), _config(name, m, tmp, impl="tff")
            ledger = accounting.make_ledger(cfg)
            ref = _Reference(name, data, BATCH.value)
            with training.client_files(cfg, data) as files:
                process = training.build_learning_process(cfg, data, files)
                state = training.initial_state(process, cfg, data)

                def dpfl_round(state, r, cohort=range(m)):  # as the round loop runs it: the state stays in the worker
                    with runtime.states_in_worker():
                        return process.next(state, training.round_input(cfg, data, cohort, r, files)).state

                def state_back_round(state, r):  # the state back to Python every round (kept in the worker too)
                    return process.next(state, training.round_input(cfg, data, range(m), r, files)).state

                def tff_round(state, r):
                    return process_tff.next(state, training.round_input(cfg_tff, data, range(m), r)).state

                state = dpfl_round(state, 0)  # warm-up: tracing and worker start
                if "startup_seconds" not in report:
                    report["startup_seconds"] = time.time() - _T0
                process_tff = training.build_learning_process(cfg_tff, data)
                state_tff = tff_round(training.initial_state(process_tff, cfg_tff, data), 0)
                ref.round()
                state_back = state_back_round(runtime.fetch_state(state), 0)
                times_dpfl, times_tff, times_ref, times_acc, times_back = [], [], [], [], []
                for r in range(1, ROUNDS.value + 1):
                    t = time.perf_counter()
                    state = dpfl_round(state, r)
                    times_dpfl.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    ref.round()
                    times_ref.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    state_back = state_back_round(state_back, r)
                    times_back.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    ledger.commit(range(m))
                    times_acc.append(time.perf_counter() - t)
                for r in range(1, ROUNDS.value + 1):  # TFF's own FedAvg, after: its cleanup must not slow ours
                    t = time.perf_counter()
                    state_tff = tff_round(state_tff, r)
                    times_tff.append(time.perf_counter() - t)
                times_2x = []
                for r in range(ROUNDS.value + 1, 2 * ROUNDS.value + 1):  # the same clients twice: 2m per round
                    t = time.perf_counter()
                    state = dpfl_round(state, r, [c % m for c in range(2 * m)])
                    times_2x.append(time.perf_counter() - t)
                times_0 = []
                for r in range(2 * ROUNDS.value + 1, 3 * ROUNDS.value + 1):  # no client: the fixed cost
                    t = time.perf_counter()
                    state = dpfl_round(state, r, [])
                    times_0.append(time.perf_counter() - t)
                state = runtime.fetch_state(state)  # the state the last round left in the worker, fetched
                t = time.perf_counter()
                weights = process.get_model_weights(state)
                state_trip = time.perf_counter() - t
                identity_trip, empty_call = _state_round_trip_seconds(process, state)
                evaluation = _evaluation_seconds(cfg, data, weights)
            dpfl_s, ref_s = statistics.median(times_dpfl), statistics.median(times_ref)
            tff_s = statistics.median(times_tff)
            report[key] = {
                "model": name,
                "dpfl_tff_seconds_per_round": dpfl_s,
                "reference_seconds_per_round": ref_s,
                "ratio_dpfl_tff_over_reference": dpfl_s / ref_s,
                "dpfl_tff_seconds_per_round_state_back": statistics.median(times_back),
                "ratio_state_back_over_reference": statistics.median(times_back) / ref_s,
                "tff_fedavg_seconds_per_round": tff_s,
                "ratio_tff_fedavg_over_reference": tff_s / ref_s,
                "accounting_seconds_per_round": statistics.median(times_acc),
                "dpfl_tff_seconds_per_round_2x_clients": statistics.median(times_2x),
                "ratio_2x_clients_over_1x": statistics.median(times_2x) / dpfl_s,
                "dpfl_tff_seconds_per_round_0_clients": statistics.median(times_0),
                "ratio_0_clients_over_reference": statistics.median(times_0) / ref_s,
                "get_model_weights_seconds": state_trip,
                "state_round_trip_seconds": identity_trip,
                "empty_tff_call_seconds": empty_call,
                "evaluation": {**evaluation, **{f"ratio_{k}_over_round": v / dpfl_s for k, v in evaluation.items()}},
            }
            worker_peak = max(worker_peak, _worker_peak_rss_mb())
        if DP_SGD.value:
            report["dp_sgd"] = {key: _dp_sgd_epochs(_NAMES[key], DP_SGD_EXAMPLES.value, BATCH.value,
                                                    DP_SGD_REPEATS.value) for key in DP_SGD_MODELS.value}
        if DRIVER_STARTUP.value:  # after startup_seconds; this process' worker idles meanwhile
            report["driver_startup"] = _driver_startup(tmp)
        if MEMORY_ROUNDS.value > 0:
            report["memory"] = _memory_slope(data, tmp, MEMORY_ROUNDS.value)
        if WORKER_COUNTS.value and MODELS.value:
            wm = WORKER_CLIENTS.value or m
            report["workers"] = _time_workers(_NAMES[MODELS.value[0]], data if wm == m else _data(wm, n), tmp)
            if PIN_WORKERS.value and "2_workers_seconds_per_round" in report["workers"] and CORE_STEPS.value > 0:
                w = report["workers"]
                w["core_scaling"] = _core_scaling(_NAMES[MODELS.value[0]], CORE_STEPS.value)
                w["ratio_speedup_to_bound"] = w["speedup_2_over_1_workers"] / w["core_scaling"]["speedup_bound_2_cores"]
        if POPULATION.value > 0:
            report["population"] = _population(POPULATION.value, tmp)
            worker_peak = max(worker_peak, _worker_peak_rss_mb())
    report["python_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["worker_peak_rss_mb"] = worker_peak
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
