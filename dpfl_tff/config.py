"""Experiment configuration: frozen dataclasses with range checks, and nothing else.

Drivers parse flags into these objects; the library reads only these objects.
`validate()` checks every value on its own (ranges, names, combinations) and
raises `ConfigError` with one line naming the flag, the value and the allowed
range. It is pure: importing this module imports no TensorFlow, task, model or
accountant. What needs those (the task's N, a custom model's import, whether
the accountant can take the round's event, the calibrated noise) is resolved
once, by `dpfl_tff.plan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dpfl_tff.errors import ConfigError

DP_MODES = ("none", "central", "local")
LOCAL_MECHANISMS = ("gaussian", "laplace")
CLIENT_SAMPLING = ("poisson", "uniform")
ACCOUNTANTS = ("rdp", "pld")
OPTIMIZERS = ("sgd", "sgdm", "adam")
FEDAVG_IMPLS = ("grouped", "tff")
PARTITIONS = ("iid", "dirichlet")
# Registered tasks and models (dpfl_tff.tasks.TASKS, dpfl_tff.models.MODELS; a test keeps them equal).
TASK_NAMES = ("digits", "synthetic", "emnist", "cifar10", "cifar100")
MODEL_NAMES = ("mlp", "cnn", "logistic", "emnist_cnn_dropout", "emnist_2nn", "resnet18_gn", "cifar_cnn")
# hparams.json holds this instead of a --sampling_seed: knowing it would reveal every cohort.
SEED_REDACTED = "set (not recorded)"
# Tasks whose data comes split into clients: N is the data's, not --num_clients.
NATURAL_SPLIT_TASKS = ("emnist", "cifar100")
# Below this numpy 1.25's Dirichlet sampler slows to a halt (numpy/numpy#24203).
MIN_DIRICHLET_ALPHA = 1e-6


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"--{name}={value}: must be a finite number")


def _positive(name: str, value: float) -> None:
    _finite(name, value)
    if value <= 0:
        raise ConfigError(f"--{name}={value}: must be > 0")


def _nonnegative(name: str, value: float) -> None:
    _finite(name, value)
    if value < 0:
        raise ConfigError(f"--{name}={value}: must be >= 0")


def _int_at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name}={value}: must be an integer >= {low}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name}={value}: must be one of {', '.join(allowed)}")


def _check_model_name(name: str) -> None:
    """A registered model name, or `package.module:function` (imported later, by `plan.check`)."""
    if name in MODEL_NAMES:
        return
    module, sep, function = name.partition(":")
    if not sep or not module or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ConfigError(
            f"--model={name}: must be one of {', '.join(MODEL_NAMES)}, or package.module:function returning an "
            "uncompiled Keras model for (input_shape, num_classes)"
        )


def _open_unit(name: str, value: float) -> None:
    _finite(name, value)
    if not 0 < value < 1:
        raise ConfigError(f"--{name}={value}: must be in the open interval (0, 1)")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which federated data set and how it is split into clients.

    Attributes:
      task: registered task name (`dpfl_tff.tasks.TASKS`).
      num_clients: number of clients the training data is split into (tasks
        with a natural client split may ignore it; see the task).
      partition: `iid` (equal random shards) or `dirichlet` (label skew).
      dirichlet_alpha: concentration of the per-label Dirichlet; smaller is
        more skewed. Used when partition is `dirichlet`.
      test_fraction: share of the data held out as the central test set.
      synthetic_examples_per_client: `synthetic` task only.
      synthetic_input_dim: `synthetic` task only; flat input size.
      synthetic_num_classes: `synthetic` task only.
      data_dir: folder holding downloaded data files (emnist, cifar10, cifar100).
      emnist_only_digits: `emnist` only: 10 digit classes (3,383 clients) or
        all 62 classes (3,400 clients).
      num_clients_known: for tasks with their own client split (emnist,
        cifar100) N is the data's; the library sets this once it has loaded
        the data and copied its N into `num_clients`.
    """

    task: str = "digits"
    num_clients: int = 100
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    synthetic_examples_per_client: int = 20
    synthetic_input_dim: int = 32
    synthetic_num_classes: int = 10
    data_dir: str = "data"
    emnist_only_digits: bool = True
    num_clients_known: bool = False

    @property
    def natural_split(self) -> bool:
        return self.task in NATURAL_SPLIT_TASKS

    @property
    def n_is_known(self) -> bool:
        """Whether `num_clients` is the true N (always, except natural splits before loading)."""
        return not self.natural_split or self.num_clients_known

    def validate(self) -> None:
        _choice("task", self.task, TASK_NAMES)
        _int_at_least("num_clients", self.num_clients, 1)
        if not self.data_dir:
            raise ConfigError("--data_dir is empty: give the folder that holds (or will hold) the data files")
        _choice("partition", self.partition, PARTITIONS)
        _positive("dirichlet_alpha", self.dirichlet_alpha)
        if self.partition == "dirichlet" and self.dirichlet_alpha < MIN_DIRICHLET_ALPHA:
            raise ConfigError(
                f"--dirichlet_alpha={self.dirichlet_alpha}: must be >= {MIN_DIRICHLET_ALPHA:g} (numpy's "
                f"Dirichlet sampler stalls below; at {MIN_DIRICHLET_ALPHA:g} nearly all of a label's examples "
                "already go to one client)"
            )
        _open_unit("test_fraction", self.test_fraction)
        _int_at_least("synthetic_examples_per_client", self.synthetic_examples_per_client, 1)
        _int_at_least("synthetic_input_dim", self.synthetic_input_dim, 1)
        _int_at_least("synthetic_num_classes", self.synthetic_num_classes, 2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The federated optimisation (FedAvg) and its schedule.

    Attributes:
      model: registered model name (`dpfl_tff.models.MODELS`) or
        `package.module:function` returning an uncompiled Keras model for
        (input_shape, num_classes).
      rounds: number of federated rounds to run.
      clients_per_round: expected cohort size m. Poisson sampling includes
        each client with probability m / num_clients; uniform sampling draws
        exactly m without replacement.
      client_sampling: `poisson` or `uniform`.
      client_epochs: local passes over each client's data per round.
      client_batch_size: local minibatch size.
      client_optimizer, server_optimizer: `sgd`, `sgdm` (momentum 0.9), `adam`.
      client_learning_rate, server_learning_rate: step sizes.
      client_shuffle_buffer: shuffle buffer of the local data (0: the whole
        client's data).
      client_max_examples: use at most this many of a client's examples
        (0: all), like TFF's baselines' cap.
      fedavg_impl: `grouped` (`dpfl_tff.grouped_fedavg`: several clients per
        TFF client call, data read inside a local worker) or `tff` (TFF's
        `build_unweighted_fed_avg`, one TFF client call per client). Same
        algorithm and DP guarantee; `grouped` is faster.
      clients_per_call: `grouped` only: at most this many clients trained in
        one TFF client call (0: the round's clients split into two calls per
        worker).
      eval_every: evaluate on the test split every this many rounds (and after
        the last round); 0 evaluates only after the last round.
      checkpoint_every: checkpoint the full state every this many rounds
        (and at the end, and when stopped); 0: only then.
      seed: seeds the client split, the order of each client's examples and
        the model initialisation. It never seeds the DP noise or the cohorts.
      sampling_seed: None (default): cohorts are drawn from OS entropy, so they
        are secret, as amplification by sampling requires. An integer makes
        cohorts reproducible (tests, debugging); amplification then holds only
        against whoever does not know it (it is not written to hparams.json).
    """

    model: str = "mlp"
    rounds: int = 50
    clients_per_round: int = 10
    client_sampling: str = "poisson"
    client_epochs: int = 1
    client_batch_size: int = 20
    client_optimizer: str = "sgd"
    client_learning_rate: float = 0.1
    server_optimizer: str = "sgdm"
    server_learning_rate: float = 1.0
    client_shuffle_buffer: int = 0
    client_max_examples: int = 0
    fedavg_impl: str = "grouped"
    clients_per_call: int = 0
    eval_every: int = 5
    checkpoint_every: int = 10
    seed: int = 0
    sampling_seed: int | None = None

    def validate(self, num_clients: int | None) -> None:
        _check_model_name(self.model)  # its import and build are checked by plan.check (they need TensorFlow)
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("clients_per_round", self.clients_per_round, 1)
        if num_clients is not None and self.clients_per_round > num_clients:
            raise ConfigError(
                f"--clients_per_round={self.clients_per_round}: must be <= --num_clients={num_clients}"
            )
        _choice("client_sampling", self.client_sampling, CLIENT_SAMPLING)
        _int_at_least("client_epochs", self.client_epochs, 1)
        _int_at_least("client_batch_size", self.client_batch_size, 1)
        _choice("client_optimizer", self.client_optimizer, OPTIMIZERS)
        _choice("server_optimizer", self.server_optimizer, OPTIMIZERS)
        _positive("client_learning_rate", self.client_learning_rate)
        _positive("server_learning_rate", self.server_learning_rate)
        _int_at_least("client_shuffle_buffer", self.client_shuffle_buffer, 0)
        _int_at_least("client_max_examples", self.client_max_examples, 0)
        _choice("fedavg_impl", self.fedavg_impl, FEDAVG_IMPLS)
        _int_at_least("clients_per_call", self.clients_per_call, 0)
        _int_at_least("eval_every", self.eval_every, 0)
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        _int_at_least("seed", self.seed, 0)
        if self.sampling_seed is not None:
            _int_at_least("sampling_seed", self.sampling_seed, 0)


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Differential privacy of the aggregation, and how it is accounted.

    Attributes:
      mode: `none` (plain averaging, no guarantee), `central` (the server
        clips each client update to L2 norm `clip_norm` and adds Gaussian
        noise of standard deviation `noise_multiplier * clip_norm` to the sum)
        or `local` (each client clips and noises its own update before it
        leaves the client; see `local_mechanism`).
      local_mechanism: `gaussian` (L2 clip C, noise std z C) or `laplace`
        (L1 clip C, Laplace scale z C per coordinate); `local` mode only.
      noise_multiplier: z, noise std in units of the clip norm.
      clip_norm: C, L2 clip of each client's model update (the initial clip
        when adaptive).
      adaptive_clipping: adapt C towards a quantile of the update norms
        (Andrew et al. 2021, arXiv:1905.03871).
      target_unclipped_quantile: quantile the adaptive clip tracks.
      clip_learning_rate: geometric learning rate of the adaptive clip.
      clipped_count_stddev: noise std of the clipped-count release; None is
        TFF's default 0.05 * clients_per_round.
      target_delta: delta of the reported (epsilon, delta); None is
        1 / num_clients**1.1.
      accountant: `rdp` or `pld`.
      noise_seed: seeds the DP noise. For tests only: a published seed lets
        anyone subtract the noise. None draws noise from OS entropy.
      target_epsilon: if set, `noise_multiplier` is ignored and replaced by the
        smallest one whose epsilon after the planned rounds is <= this.
      max_epsilon: budget guard: stop before any round whose completion would
        push epsilon above this.
    """

    mode: str = "central"
    local_mechanism: str = "gaussian"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    adaptive_clipping: bool = False
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    target_delta: float | None = None
    accountant: str = "rdp"
    noise_seed: int | None = None
    target_epsilon: float | None = None
    max_epsilon: float | None = None

    def validate(self) -> None:
        _choice("dp_mode", self.mode, DP_MODES)
        _choice("local_mechanism", self.local_mechanism, LOCAL_MECHANISMS)
        _nonnegative("noise_multiplier", self.noise_multiplier)
        _positive("clip_norm", self.clip_norm)
        _open_unit("target_unclipped_quantile", self.target_unclipped_quantile)
        _positive("clip_learning_rate", self.clip_learning_rate)
        if self.clipped_count_stddev is not None:
            _positive("clipped_count_stddev", self.clipped_count_stddev)
        if self.target_delta is not None:
            _open_unit("target_delta", self.target_delta)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        if self.noise_seed is not None:
            _int_at_least("noise_seed", self.noise_seed, 0)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if self.max_epsilon is not None:
            _positive("max_epsilon", self.max_epsilon)
        # Settings a mode refuses (e.g. zero noise with a DP mode) are its mechanism's check (plan.check).


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; `validate()` checks all of it at once.

    Attributes (besides the groups):
      output_dir: the experiment folder.
      workers: `host:port` of TFF worker services; empty: one private local worker.
      worker_timeout: seconds to wait for (and retry) a remote worker.
      log_cohorts: write every round's cohort to `ledger.jsonl`. Whoever reads
        the folder then knows who took part, which voids amplification by
        sampling against them. (Local DP always records cohorts there: the
        participation counts of its accounting need them.)
      client_metrics: release the clients' training loss and accuracy, the
        non-finite count, the realised Poisson cohort size and timings, none of
        which the epsilon covers. False: every released number is covered by
        the epsilon or computed on the held-out test set.
    """

    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    dp: DPConfig = DPConfig()
    output_dir: str = "/tmp/dpfl_tff/quickstart"
    workers: tuple[str, ...] = ()
    worker_timeout: float = 30.0
    log_cohorts: bool = False
    client_metrics: bool = True

    def validate(self) -> ExperimentConfig:
        self.task.validate()
        self.train.validate(self.task.num_clients if self.task.n_is_known else None)
        self.dp.validate()
        if not self.output_dir:
            raise ConfigError("--output_dir is empty: give a folder for the experiment's outputs")
        for address in self.workers:
            check_worker_address(address, ",".join(self.workers))
        if not (isinstance(self.worker_timeout, (int, float)) and 0 < self.worker_timeout <= 3600):
            raise ConfigError(f"--worker_timeout={self.worker_timeout}: must be in (0, 3600] seconds")
        return self

    @property
    def target_delta(self) -> float:
        """The delta every reported epsilon is computed at."""
        if self.dp.target_delta is not None:
            return self.dp.target_delta
        return default_delta(self.task.num_clients)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as written to hparams.json; a sampling seed is only said to be set."""
        d = dataclasses.asdict(self)
        if self.train.sampling_seed is not None:
            d["train"]["sampling_seed"] = SEED_REDACTED
        d["resolved_target_delta"] = self.target_delta
        return d


def check_worker_address(address: str, flag_value: str) -> None:
    """Raises ConfigError unless `address` is `host:port` with a port in 1..65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"--workers={flag_value}: {address!r} is not host:port (a host name or IP and a port in 1..65535)"
        )


def default_delta(num_clients: int) -> float:
    """1 / N**1.1: below 1/N, so that 'release one client's data' is excluded."""
    return 1.0 / num_clients**1.1
