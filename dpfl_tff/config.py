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

DP_MODES = ("none", "central", "local", "ftrl", "bandmf", "blt")
# What one unit of privacy is: a client's whole data (every --dp_mode), or one record inside a client
# (DP-SGD in every client, `privacy.example_level`).
DP_LEVELS = ("client", "example")
LOCAL_MECHANISMS = ("gaussian", "laplace")
CLIENT_SAMPLING = ("poisson", "uniform", "shuffle", "banded", "cyclic")
ACCOUNTANTS = ("rdp", "pld")
OPTIMIZERS = ("sgd", "sgdm", "adam")
FEDAVG_IMPLS = ("grouped", "tff")
PARTITIONS = ("iid", "dirichlet")
# Which epsilon --max_epsilon caps: the guarantee the privacy mode promises (local DP: local_epsilon, against
# the server; the other modes: epsilon), or the central view (`epsilon`, what the model reveals).
MAX_EPSILON_VIEWS = ("guarantee", "central")
# Registered tasks and models (dpfl_tff.tasks.TASKS, dpfl_tff.models.MODELS; a test keeps them equal).
TASK_NAMES = ("digits", "synthetic", "emnist", "cifar10", "cifar100", "shakespeare", "stackoverflow",
              "cross_silo_digits")
MODEL_NAMES = ("mlp", "cnn", "logistic", "emnist_cnn_dropout", "emnist_2nn", "resnet18_gn", "cifar_cnn",
               "shakespeare_lstm", "stackoverflow_lstm")
# The text tasks (next-token prediction, clients streamed from disk) and the paper model each trains
# without --model; the image models cannot take their token sequences.
TEXT_TASK_MODELS = {"shakespeare": "shakespeare_lstm", "stackoverflow": "stackoverflow_lstm"}
NON_TEXT_MODELS = ("mlp", "cnn", "logistic", "emnist_cnn_dropout", "emnist_2nn", "resnet18_gn", "cifar_cnn")
# hparams.json holds this instead of a --sampling_seed: knowing it would reveal every cohort.
SEED_REDACTED = "set (not recorded)"
# Tasks whose data comes split into clients: N is the data's, not --num_clients.
NATURAL_SPLIT_TASKS = ("emnist", "cifar100", "shakespeare", "stackoverflow")
# Below this numpy 1.25's Dirichlet sampler slows to a halt (numpy/numpy#24203).
MIN_DIRICHLET_ALPHA = 1e-6
# --bands=auto: banded MF's B chosen by the plan (`privacy.bands_auto`).
BANDS_AUTO = "auto"


# Groups of --help and of docs/flags.md, in their order (each field's metadata names its group).
TASK, MODEL, TRAINING, PRIVACY, OUTPUTS, WORKERS = (
    "Task and data", "Model", "Training (FedAvg)", "Privacy", "Run and outputs", "Workers")
FLAG_GROUPS = (TASK, MODEL, TRAINING, PRIVACY, OUTPUTS, WORKERS)


def _field(default: Any, group: str | None = None, help: str | None = None, flag: str | None = None) -> Any:  # noqa: A002
    """A config field whose metadata is its flag: the one place its help text, group and default live.

    `group` None: an internal field with no flag. `flag`: the flag's name when it is not the field's.
    """
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "flag": flag})


def flag_fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
    """(flag name, field) of every field of the dataclass `cls` that has a flag, in definition order."""
    return [(f.metadata.get("flag") or f.name, f) for f in dataclasses.fields(cls) if f.metadata.get("group")]


def parse_int_or_auto(argument: Any) -> int | str:
    """A flag value that is an integer or `auto` (--bands), as absl parses it; the range is `validate`'s.

    Raises:
      ValueError: neither an integer nor `auto`.
    """
    if isinstance(argument, int) and not isinstance(argument, bool):
        return argument
    text = str(argument).strip()
    if text == BANDS_AUTO:
        return text
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"{argument!r} is not an integer or {BANDS_AUTO}") from None


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
    if not _is_dotted_function(name):
        raise ConfigError(
            f"--model={name}: must be one of {', '.join(MODEL_NAMES)}, or package.module:function returning an "
            "uncompiled Keras model for (input_shape, num_classes)"
        )


def _check_task_name(name: str) -> None:
    """A registered task name, or `package.module:function` (imported when the data is loaded)."""
    if name in TASK_NAMES:
        return
    if not _is_dotted_function(name):
        raise ConfigError(
            f"--task={name}: must be one of {', '.join(TASK_NAMES)}, or package.module:function returning a "
            "dpfl_tff.tasks.FederatedData"
        )


def _is_dotted_function(name: str) -> bool:
    module, sep, function = name.partition(":")
    return bool(sep and module and function.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def _open_unit(name: str, value: float) -> None:
    _finite(name, value)
    if not 0 < value < 1:
        raise ConfigError(f"--{name}={value}: must be in the open interval (0, 1)")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which federated data set and how it is split into clients.

    Each field's meaning, unit and range is its `help` metadata, which is also the flag's
    --help text (`experiments/flags.py` defines the flags from it); `validate()` checks them.
    """

    task: str = _field(
        "digits", TASK,
        "Task: digits (offline default, sklearn digits) | synthetic | emnist | cifar10 | cifar100 |"
        " shakespeare (715 clients, next character) | stackoverflow (342,477 clients, next word) (the last"
        " five read files from --data_dir; the two text tasks stream their clients from disk) |"
        " cross_silo_digits (the digits in --num_clients = 5..20 silos of unequal size and label skew, for"
        " --dp_level=example), or"
        " package.module:function returning a dpfl_tff.tasks.FederatedData (its own clients; see"
        " docs/tasks-and-models.md).",
    )
    num_clients: int = _field(
        100, TASK,
        "Number of clients N the training data is split into (>= 1). emnist, cifar100, shakespeare, "
        "stackoverflow and custom tasks come split into clients: there N is the data's (a custom task function is passed "
        "this value and may use it).",
    )
    partition: str = _field(
        "iid", TASK,
        "Client split of digits and cifar10: iid (equal random shards) | dirichlet (label skew, see "
        "--dirichlet_alpha).",
    )
    dirichlet_alpha: float = _field(
        0.5, TASK,
        "Dirichlet concentration of the label split (>= 1e-6; smaller = more skewed).",
    )
    test_fraction: float = _field(
        0.2, TASK,
        "digits: share of the data held out (stratified) as the central test set; synthetic: test set size "
        "relative to the training data; in (0, 1). The other tasks have their own test split.",
    )
    synthetic_examples_per_client: int = _field(
        20, TASK,
        "synthetic task: examples per client (>= 1).",
    )
    synthetic_input_dim: int = _field(
        32, TASK,
        "synthetic task: input features (>= 1).",
    )
    synthetic_num_classes: int = _field(
        10, TASK,
        "synthetic task: number of classes (>= 2).",
    )
    data_dir: str = _field(
        "data", TASK,
        "Folder with the data files of emnist, cifar10, cifar100, shakespeare and stackoverflow (nothing"
        " is downloaded unless --download; the text tasks write a per-client index of their SQLite file"
        " here once, <file>.index.sqlite).",
    )
    download: bool = _field(
        False, TASK,
        "Download a missing data file of emnist, cifar100, cifar10, shakespeare or stackoverflow into --data_dir from its public"
        " source, verified against a pinned SHA-256 (a mismatch is refused); resumes a partial "
        "download. Without it nothing is ever downloaded.",
    )
    emnist_only_digits: bool = _field(
        True, TASK,
        "emnist: 10 digit classes, 3,383 clients (true) or 62 classes, 3,400 clients.",
    )
    eval_examples: int = _field(
        10000, TASK,
        "shakespeare, stackoverflow: central evaluation on this many examples (snippets, sentences; >= 0) of "
        "the test split, a fixed sample (TFF's create_tf_dataset_from_all_clients(seed=0): test clients in a "
        "seeded order, the first this many examples); 0 = the whole split. 10,000 is the DP-FTRL paper's "
        "Stack Overflow validation size; Shakespeare's test split has 2,356.",
    )
    stackoverflow_vocab_size: int = _field(
        10000, TASK,
        "stackoverflow: vocabulary = this many most frequent words of stackoverflow.word_count (>= 1; TFF's "
        "and the papers' 10,000); the model predicts them plus pad, oov, bos, eos.",
    )
    num_clients_known: bool = _field(False, None)

    @property
    def is_custom(self) -> bool:
        """`--task=package.module:function`: a user's function returns the federated data."""
        return ":" in self.task

    @property
    def natural_split(self) -> bool:
        return self.task in NATURAL_SPLIT_TASKS or self.is_custom

    @property
    def n_is_known(self) -> bool:
        """Whether `num_clients` is the true N (always, except natural splits before loading)."""
        return not self.natural_split or self.num_clients_known

    def validate(self) -> None:
        _check_task_name(self.task)
        _int_at_least("num_clients", self.num_clients, 1)
        if self.task == "cross_silo_digits" and not 5 <= self.num_clients <= 20:
            raise ConfigError(f"--num_clients={self.num_clients}: --task=cross_silo_digits splits the digits into "
                              "5..20 silos")
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
        _int_at_least("eval_examples", self.eval_examples, 0)
        _int_at_least("stackoverflow_vocab_size", self.stackoverflow_vocab_size, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The federated optimisation (FedAvg) and its schedule.

    Each field's meaning, unit and range is its `help` metadata, which is also the flag's
    --help text (`experiments/flags.py` defines the flags from it); `validate()` checks them.
    """

    model: str = _field(
        "mlp", MODEL,
        "Model: mlp (one hidden layer of 64) | cnn | logistic | emnist_cnn_dropout | emnist_2nn |"
        " resnet18_gn | cifar_cnn | shakespeare_lstm | stackoverflow_lstm, or package.module:function returning"
        " an uncompiled Keras model for (input_shape, num_classes). Unset with --task=shakespeare or"
        " stackoverflow: that task's paper model (shakespeare_lstm, stackoverflow_lstm).",
    )
    rounds: int = _field(
        50, TRAINING,
        "Federated rounds to run (>= 1).",
    )
    clients_per_round: int = _field(
        10, TRAINING,
        "Expected cohort size m (1..num_clients). Poisson sampling: each client joins with "
        "probability m/N; uniform: exactly m. The DP noise is divided by m.",
    )
    client_sampling: str = _field(
        "poisson", TRAINING,
        "poisson (each client independently, q=m/N; add-or-remove-one DP) | uniform (fixed m "
        "without replacement; replace-one DP, noise multiplier z/2 in the accountant) | shuffle (each epoch a "
        "random permutation of the clients cut into floor(N/m) rounds of m; the N mod m left over sit that "
        "epoch out; no client twice per epoch) | banded (each client in one of --bands secret random groups; "
        "round t Poisson-samples group t mod B at q=m*B/N; --dp_mode=bandmf) | cyclic (b=floor(N/m) fixed "
        "groups, round t trains group t mod b; --dp_mode=blt). Unset: poisson, but shuffle with --dp_mode=ftrl, "
        "banded with bandmf and cyclic with blt (the only sampling each allows); shuffle, banded and cyclic are "
        "refused with --dp_mode=central.",
    )
    client_epochs: int = _field(
        1, TRAINING,
        "Local epochs per round (>= 1).",
    )
    client_batch_size: int = _field(
        20, TRAINING,
        "Local batch size in examples (>= 1). With --dp_level=example: b, the expected batch of DP-SGD's "
        "Poisson sampling (each of a client's n records joins a step with probability min(1, b/n); the noised "
        "sum is divided by b).",
    )
    client_optimizer: str = _field(
        "sgd", TRAINING,
        "Client optimizer: sgd | sgdm (momentum 0.9) | adam.",
    )
    client_learning_rate: float = _field(
        0.1, TRAINING,
        "Client learning rate (> 0).",
    )
    server_optimizer: str = _field(
        "sgdm", TRAINING,
        "Server optimizer: sgd | sgdm (momentum 0.9) | adam.",
    )
    server_learning_rate: float = _field(
        1.0, TRAINING,
        "Server learning rate (> 0).",
    )
    client_shuffle_buffer: int = _field(
        0, TRAINING,
        "Local shuffle buffer in examples (>= 0; 0 = whole client).",
    )
    client_max_examples: int = _field(
        0, TRAINING,
        "Use at most this many examples per client (>= 0; 0 = all).",
    )
    fedavg_impl: str = _field(
        "grouped", TRAINING,
        "grouped (several clients per TFF client call, data read inside a local worker; fast) | "
        "tff (TFF's build_unweighted_fed_avg, one TFF client call per client). Same algorithm and"
        " DP guarantee.",
    )
    clients_per_call: int = _field(
        0, TRAINING,
        "--fedavg_impl=grouped: at most this many clients trained in one TFF client call (>= 0; 0"
        " = the round's clients split into two calls per worker; one for a local worker on one core).",
    )
    eval_every: int = _field(
        5, TRAINING,
        "Evaluate on the test split every this many rounds and after the last (0 = last only).",
    )
    checkpoint_every: int = _field(
        10, OUTPUTS,
        "Checkpoint the full state every this many rounds (>= 0; also at the end and when "
        "stopped; 0 = only then). Rerunning with the same --output_dir resumes from the newest "
        "checkpoint.",
    )
    seed: int = _field(
        0, TRAINING,
        "Seeds the client split, the order of each client's examples and the model init (>= 0). "
        "Never seeds the DP noise or the cohorts.",
    )
    sampling_seed: int | None = _field(
        None, TRAINING,
        "Seed of the cohorts (>= 0; tests, debugging). Unset = OS entropy: cohorts are secret, as"
        " amplification by sampling assumes. Set: amplification holds only against readers who do"
        " not know the seed (it is not written to hparams.json).",
    )

    def validate(self, num_clients: int | None, n_name: str | None = None) -> None:
        """`n_name`: how errors name N (default `--num_clients=N`; a task with its own split: its N)."""
        _check_model_name(self.model)  # its import and build are checked by plan.check (they need TensorFlow)
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("clients_per_round", self.clients_per_round, 1)
        if num_clients is not None and self.clients_per_round > num_clients:
            raise ConfigError(
                f"--clients_per_round={self.clients_per_round}: must be <= {n_name or f'--num_clients={num_clients}'}"
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

    Each field's meaning, unit and range is its `help` metadata, which is also the flag's
    --help text (`experiments/flags.py` defines the flags from it); `validate()` checks them.
    """

    mode: str = _field(
        "central", PRIVACY,
        "none (plain FedAvg, no guarantee) | central (server clips each update to --clip_norm and"
        " adds Gaussian noise of std noise_multiplier*clip_norm to the sum) | local (each client "
        "clips and noises its own update before sending it; see --local_mechanism) | ftrl (DP-FTRL: server "
        "clips, tree-aggregation noise of std noise_multiplier*clip_norm per tree node, one tree per epoch of "
        "--client_sampling=shuffle; --server_optimizer sgd or sgdm; RDP only) | bandmf (banded matrix-factorization "
        "noise, Choquette-Choo et al. 2023: correlated Gaussian noise over --bands rounds, amplified by "
        "--client_sampling=banded) | blt (BLT-DP-FTRL: server clips, correlated noise "
        "z*clip_norm*(C^-1 xi)_t of a buffered linear Toeplitz strategy C, --client_sampling=cyclic; "
        "docs/privacy.md#blt-dp-ftrl-correlated-noise-with-cyclic-participation).", flag="dp_mode",
    )
    local_mechanism: str = _field(
        "gaussian", PRIVACY,
        "--dp_mode=local only: gaussian (L2 clip C, noise std z*C per coordinate) | laplace (L1 "
        "clip C, Laplace scale z*C per coordinate; 2/z-DP per release at the bounded sampler's delta_sampler).",
    )
    noise_multiplier: float = _field(
        1.0, PRIVACY,
        "z: noise std in units of the clip norm (>= 0; ftrl: per tree node; blt: of each xi_t; 0 is refused with "
        "--dp_mode=central, local, ftrl and blt, except with --canary_clients > 0: the audit's noise-free check, epsilon inf).",
    )
    blt_buffers: int | None = _field(
        None, PRIVACY,
        "--dp_mode=blt: buffers d of the BLT strategy (1..10; d model-sized float64 buffers in the server state). "
        "Unset: the optimizer adds buffers while one more lowers its loss by more than 1%.",
    )
    clip_norm: float = _field(
        1.0, PRIVACY,
        "C: L2 clip of each client update (> 0; L1 with --local_mechanism=laplace); the initial clip when "
        "adaptive.",
    )
    adaptive_clipping: bool = _field(
        False, PRIVACY,
        "Adapt the clip to a quantile of update norms (Andrew et al. 2021).",
    )
    target_unclipped_quantile: float = _field(
        0.5, PRIVACY,
        "Adaptive clipping: quantile to track, in (0, 1).",
    )
    clip_learning_rate: float = _field(
        0.2, PRIVACY,
        "Adaptive clipping: geometric learning rate (> 0).",
    )
    clipped_count_stddev: float | None = _field(
        None, PRIVACY,
        "Adaptive clipping: noise std of the clipped count (> 0); unset = 0.05*clients_per_round "
        "(TFF default).",
    )
    target_delta: float | None = _field(
        None, PRIVACY,
        "delta of the reported (epsilon, delta), in (0, 1); unset = 1/N'^1.1 with N' = num_clients + "
        "canary_clients (--dp_level=example: N' = the clients' records in all).",
    )
    accountant: str = _field(
        "rdp", PRIVACY,
        "Privacy accountant: rdp | pld (dp-accounting; pld only for poisson sampling).",
    )
    noise_seed: int | None = _field(
        None, PRIVACY,
        "TESTS ONLY: seed the DP noise (>= 0). Unset = fresh OS entropy. A known seed removes the"
        " privacy.",
    )
    target_epsilon: float | None = _field(
        None, PRIVACY,
        "If set (> 0): ignore --noise_multiplier and calibrate the smallest z whose epsilon after"
        " --rounds is <= this (dp-accounting calibration; --dp_level=example: z_ex, on record_epsilon, the"
        " maximum over clients). Also a budget guard: a run (a resumed one"
        " too, whose re-run rounds count again) stops before any round that would end above it;"
        " exit 0.",
    )
    bands: int | str = _field(
        1, PRIVACY,
        "--dp_mode=bandmf only: B, the bands of the banded Toeplitz noise strategy (>= 1; 1 is DP-FedAvg's "
        "independent noise with Poisson sampling). Each client is eligible once every B rounds, sampled with "
        "q = clients_per_round*B/N (must be <= 1); the server keeps the last B-1 noise vectors (B-1 model "
        "copies in float64). auto (needs --target_epsilon): the feasible B (q <= 1, B <= --rounds, buffers "
        "within memory, B <= 32) whose calibrated z gives the smallest expected prefix-sum error "
        "z^2*||A C_B^-1||_F^2/T; the run says which it chose (docs/privacy.md#choosing-the-bands).",
    )
    # --bands=auto, once resolved (`privacy.bands_auto`, by the plan): ((B, z, loss, error), ...) of every
    # feasible B tried, the chosen one in `bands`. None: --bands was given as an integer.
    bands_auto: tuple[tuple[int, float, float, float], ...] | None = _field(None)
    max_epsilon: float | None = _field(
        None, PRIVACY,
        "Budget guard (> 0): stop before any round whose completion would push the guarded epsilon "
        "(--max_epsilon_view; --dp_level=example: record_epsilon) above this; exit 0.",
    )
    dp_level: str = _field(
        "client", PRIVACY,
        "What DP protects: client (a client's whole data; --dp_mode picks the mechanism) | example (one record "
        "of a client: every client trains with DP-SGD, per-example clip --example_clip_norm, Gaussian noise "
        "--example_noise_multiplier, Poisson batches of expected size --client_batch_size; needs --dp_mode=none, "
        "its default then: the server averages updates that are already private; reported as record_epsilon, the maximum over "
        "clients; docs/privacy.md#record-level-dp-example-level-dp-sgd).",
    )
    example_clip_norm: float = _field(
        1.0, PRIVACY,
        "--dp_level=example: C_ex, the L2 clip of each example's gradient (> 0, in gradient units).",
    )
    example_noise_multiplier: float = _field(
        1.0, PRIVACY,
        "--dp_level=example: z_ex, the std of the Gaussian noise on each DP-SGD step's sum of clipped gradients, "
        "in units of --example_clip_norm (> 0; 0 is refused: no record-level privacy; ignored with "
        "--target_epsilon, which calibrates it).",
    )
    record_counts: tuple[int, ...] = _field((), None)  # --dp_level=example: each client's n_i (plan.prepare)
    max_epsilon_view: str = _field(
        "guarantee", PRIVACY,
        "Which epsilon --max_epsilon caps: guarantee | central. guarantee: the one the mode promises "
        "(--dp_mode=local: local_epsilon, against the server; central, ftrl: epsilon). central: "
        "epsilon, the central view (differs only under --dp_mode=local).",
    )

    def validate(self) -> None:
        _choice("dp_mode", self.mode, DP_MODES)
        _choice("local_mechanism", self.local_mechanism, LOCAL_MECHANISMS)
        _nonnegative("noise_multiplier", self.noise_multiplier)
        if self.blt_buffers is not None and (not isinstance(self.blt_buffers, int) or not 1 <= self.blt_buffers <= 10):
            raise ConfigError(f"--blt_buffers={self.blt_buffers}: must be an integer in 1..10, or unset")
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
        _choice("max_epsilon_view", self.max_epsilon_view, MAX_EPSILON_VIEWS)
        if isinstance(self.bands, str):
            if self.bands != BANDS_AUTO:
                raise ConfigError(f"--bands={self.bands}: must be an integer >= 1, or {BANDS_AUTO}")
        else:
            _int_at_least("bands", self.bands, 1)
        _choice("dp_level", self.dp_level, DP_LEVELS)
        _positive("example_clip_norm", self.example_clip_norm)
        _nonnegative("example_noise_multiplier", self.example_noise_multiplier)
        # Settings a mode refuses (e.g. zero noise with a DP mode) are its mechanism's check (plan.check).


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; `validate()` checks all of it at once.

    The fields besides the three groups are documented like theirs (`help` metadata).
    """

    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    dp: DPConfig = DPConfig()
    output_dir: str = _field(
        "/tmp/dpfl_tff/run", OUTPUTS,
        "Experiment folder: hparams.json, metrics.jsonl, summary.json, ledger.jsonl, "
        "checkpoints/, tensorboard/, run.png, worker.log.",
    )
    workers: tuple[str, ...] = _field(
        (), WORKERS,
        "TFF worker services host:port,host:port,... (ports 1..65535), each started with "
        "experiments.run_worker; each round's clients are split over them and merged before the "
        "server step. Empty: one private local worker.",
    )
    worker_timeout: float = _field(
        30.0, WORKERS,
        "Seconds (0 < t <= 3600) to wait for every --workers address to answer before training, "
        "and to keep retrying a worker that stops answering mid-round before the round fails "
        "naming it.",
    )
    stall_seconds: float | None = _field(
        None, WORKERS,
        "A call to a TFF worker (local or --workers) that gives no answer for this many seconds "
        "(0 < t <= 86400) ends the run with exit 1, naming the worker; the last completed round is "
        "checkpointed, or, if its state was only in the local worker, the rerun resumes from the last "
        "checkpoint (the line says which; rerun to resume). Unset: max(60, 20x the median round of this process). The "
        "first round of a process (tracing, compilation) always gets at least 600 s.",
    )
    stop_grace_seconds: float = _field(
        20.0, WORKERS,
        "After SIGTERM or SIGINT, seconds (0 < t <= 3600) the round in progress may still take; then "
        "its worker calls are abandoned and the run exits with the last completed round checkpointed "
        "(the local worker, which holds that round's state, is asked for it first; one that gives no answer "
        "for 5 s more takes the rounds since the last checkpoint with it, and the exit line says so). "
        "Keep it (plus those 5 s) below the scheduler's own grace before SIGKILL (Slurm KillWait, Kubernetes "
        "terminationGracePeriodSeconds: 30 s by default).",
    )
    worker_credentials: str = _field(
        "", WORKERS,
        "Folder of the run's credential, made by `experiments.run_worker --make_credentials=DIR`: DIR, or DIR/driver "
        "for run_federated and DIR/worker for run_worker (ca.pem, cert.pem, key.pem). With it the driver and its "
        "--workers authenticate each other by mutual TLS: a worker serves only drivers holding DIR/driver, and a "
        "driver uses only workers holding DIR/worker.",
    )
    insecure_workers: bool = _field(
        False, WORKERS,
        "Driver and --workers without authentication or encryption, instead of --worker_credentials: anyone who "
        "can reach a worker's port can run code there as its user. Needed on both sides (run_worker and "
        "run_federated); each prints a warning. Only on a network that only the driver's machines can reach.",
    )
    log_cohorts: bool = _field(
        False, OUTPUTS,
        "Write every round's cohort to ledger.jsonl. Whoever reads the folder then knows who took"
        " part, which voids amplification by sampling against them: epsilon is then reported "
        "without it (the amplified one as epsilon_if_cohorts_secret). (--dp_mode=local always "
        "records cohorts there.)",
    )
    canary_clients: int = _field(
        0, PRIVACY,
        "Empirical privacy audit (>= 0; 0 = off): add this many synthetic canary clients to the population "
        "(N becomes N + K for sampling and accounting) whose update is a fixed secret random direction at the "
        "clip norm; after training, the cosines of the model delta with them against K held-out directions "
        "give empirical_epsilon (an estimate under one attack, not a bound) and empirical_epsilon_lower_bound (a "
        "95% lower confidence bound, the figure to compare with epsilon) in summary.json and audit.json. "
        "--fedavg_impl=grouped only.",
    )
    client_metrics: bool = _field(
        True, OUTPUTS,
        "Release the clients' training loss/accuracy, nonfinite_clients, the realised Poisson "
        "cohort size and timings, none covered by epsilon (listed in summary.json "
        "outputs_not_covered_by_epsilon). false: every released number is covered by epsilon or "
        "computed on the test set. Local DP never releases client statistics.",
    )

    def validate(self) -> ExperimentConfig:
        self.task.validate()
        if self.task.task in TEXT_TASK_MODELS and self.train.model in NON_TEXT_MODELS:
            raise ConfigError(
                f"--model={self.train.model}: an image/feature model cannot take --task={self.task.task}'s token "
                f"sequences; leave --model unset for the paper model ({TEXT_TASK_MODELS[self.task.task]}) or give "
                "package.module:function"
            )
        n = self.task.num_clients if self.task.n_is_known else None
        self.train.validate(n, f"N = {n} (--task={self.task.task} has its own client split; "
                               "--num_clients is not used)" if self.task.natural_split else None)
        self.dp.validate()
        if not self.output_dir:
            raise ConfigError("--output_dir is empty: give a folder for the experiment's outputs")
        for address in self.workers:
            check_worker_address(address, ",".join(self.workers))
        if self.workers and self.worker_credentials and self.insecure_workers:
            raise ConfigError(f"--worker_credentials={self.worker_credentials} with --insecure_workers: give one of them")
        if self.workers and not self.worker_credentials and not self.insecure_workers:
            raise ConfigError(
                f"--workers={','.join(self.workers)}: give --worker_credentials=DIR/driver (the credential the workers "
                "were started with; make one with `python -m experiments.run_worker --make_credentials=DIR`), or "
                "--insecure_workers for workers started with --insecure_workers"
            )
        _int_at_least("canary_clients", self.canary_clients, 0)
        if self.canary_clients and self.train.fedavg_impl != "grouped":
            raise ConfigError(
                f"--canary_clients={self.canary_clients} with --fedavg_impl={self.train.fedavg_impl}: canaries are "
                "supported by --fedavg_impl=grouped only"
            )
        if not (isinstance(self.worker_timeout, (int, float)) and 0 < self.worker_timeout <= 3600):
            raise ConfigError(f"--worker_timeout={self.worker_timeout}: must be in (0, 3600] seconds")
        if self.stall_seconds is not None and not (
                isinstance(self.stall_seconds, (int, float)) and 0 < self.stall_seconds <= 86400):
            raise ConfigError(f"--stall_seconds={self.stall_seconds}: must be in (0, 86400] seconds, or unset")
        if not (isinstance(self.stop_grace_seconds, (int, float)) and 0 < self.stop_grace_seconds <= 3600):
            raise ConfigError(f"--stop_grace_seconds={self.stop_grace_seconds}: must be in (0, 3600] seconds")
        return self

    @property
    def population(self) -> int:
        """N' = N + canary clients: the population cohorts are drawn from and the accounting's N."""
        return self.task.num_clients + self.canary_clients

    @property
    def target_delta(self) -> float:
        """The delta every reported epsilon (and the empirical epsilon) is computed at: 1/N'^1.1 by default."""
        if self.dp.target_delta is not None:
            return self.dp.target_delta
        if self.dp.dp_level == "example" and self.dp.record_counts:
            # Record-level: below 1 / (all clients' records), the federation's data set of records.
            return default_delta(sum(self.dp.record_counts))
        return default_delta(self.population)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as written to hparams.json; a sampling seed is only said to be set."""
        d = dataclasses.asdict(self)
        if self.dp.dp_level == "client":  # as before record-level DP existed: older run folders still resume
            for key in _EXAMPLE_LEVEL_FIELDS:
                del d["dp"][key]
        if self.train.sampling_seed is not None:
            d["train"]["sampling_seed"] = SEED_REDACTED
        d["resolved_target_delta"] = self.target_delta
        return d


# DPConfig's fields that only --dp_level=example reads (hparams.json leaves them out at the client level).
_EXAMPLE_LEVEL_FIELDS = ("dp_level", "example_clip_norm", "example_noise_multiplier", "record_counts")


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
