"""Flag definitions shared by the drivers, and their translation to configs.

Flags are plain strings/numbers here; every range check lives in
`dpfl_tff.config` so that a bad value fails before training with one line
naming the flag, the value and the allowed range.
"""

from __future__ import annotations

from absl import flags

from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig

_T, _R, _D = TaskConfig(), TrainConfig(), DPConfig()

# --- task -------------------------------------------------------------------
TASK = flags.DEFINE_string(
    "task",
    _T.task,
    "Task: digits (offline default, sklearn digits) | synthetic | emnist | cifar10 | cifar100 "
    "(the last three read files from --data_dir).",
)
NUM_CLIENTS = flags.DEFINE_integer(
    "num_clients",
    _T.num_clients,
    "Number of clients N the training data is split into (>= 1). emnist and cifar100 come split "
    "into clients: there N is the data's and this flag is ignored.",
)
DATA_DIR = flags.DEFINE_string(
    "data_dir", _T.data_dir, "Folder with the data files of emnist, cifar10 and cifar100 (nothing is downloaded)."
)
EMNIST_ONLY_DIGITS = flags.DEFINE_bool(
    "emnist_only_digits", _T.emnist_only_digits, "emnist: 10 digit classes, 3,383 clients (true) or 62 classes, 3,400 clients."
)
PARTITION = flags.DEFINE_string(
    "partition", _T.partition, "Client split: iid (equal random shards) | dirichlet (label skew, see --dirichlet_alpha)."
)
DIRICHLET_ALPHA = flags.DEFINE_float(
    "dirichlet_alpha", _T.dirichlet_alpha, "Dirichlet concentration of the label split (>= 1e-6; smaller = more skewed)."
)
TEST_FRACTION = flags.DEFINE_float(
    "test_fraction", _T.test_fraction, "Share of the data held out as the central test set, in (0, 1)."
)
SYN_EXAMPLES = flags.DEFINE_integer(
    "synthetic_examples_per_client", _T.synthetic_examples_per_client, "synthetic task: examples per client (>= 1)."
)
SYN_DIM = flags.DEFINE_integer("synthetic_input_dim", _T.synthetic_input_dim, "synthetic task: input features (>= 1).")
SYN_CLASSES = flags.DEFINE_integer(
    "synthetic_num_classes", _T.synthetic_num_classes, "synthetic task: number of classes (>= 2)."
)

# --- training ---------------------------------------------------------------
MODEL = flags.DEFINE_string(
    "model",
    _R.model,
    "Model: mlp (one hidden layer of 64) | cnn | logistic | emnist_cnn_dropout | emnist_2nn | resnet18_gn | "
    "cifar_cnn, or package.module:function returning an uncompiled Keras model for (input_shape, num_classes).",
)
ROUNDS = flags.DEFINE_integer("rounds", _R.rounds, "Federated rounds to run (>= 1).")
CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round",
    _R.clients_per_round,
    "Expected cohort size m (1..num_clients). Poisson sampling: each client joins with probability m/N; "
    "uniform: exactly m. The DP noise is divided by m.",
)
CLIENT_SAMPLING = flags.DEFINE_string(
    "client_sampling",
    _R.client_sampling,
    "poisson (each client independently, q=m/N; add-or-remove-one DP) | "
    "uniform (fixed m without replacement; replace-one DP, noise multiplier z/2 in the accountant).",
)
CLIENT_EPOCHS = flags.DEFINE_integer("client_epochs", _R.client_epochs, "Local epochs per round (>= 1).")
CLIENT_BATCH_SIZE = flags.DEFINE_integer("client_batch_size", _R.client_batch_size, "Local batch size (>= 1).")
CLIENT_OPTIMIZER = flags.DEFINE_string(
    "client_optimizer", _R.client_optimizer, "Client optimizer: sgd | sgdm (momentum 0.9) | adam."
)
CLIENT_LR = flags.DEFINE_float("client_learning_rate", _R.client_learning_rate, "Client learning rate (> 0).")
SERVER_OPTIMIZER = flags.DEFINE_string(
    "server_optimizer", _R.server_optimizer, "Server optimizer: sgd | sgdm (momentum 0.9) | adam."
)
SERVER_LR = flags.DEFINE_float("server_learning_rate", _R.server_learning_rate, "Server learning rate (> 0).")
CLIENT_SHUFFLE_BUFFER = flags.DEFINE_integer(
    "client_shuffle_buffer", _R.client_shuffle_buffer, "Local shuffle buffer in examples (>= 0; 0 = whole client)."
)
CLIENT_MAX_EXAMPLES = flags.DEFINE_integer(
    "client_max_examples", _R.client_max_examples, "Use at most this many examples per client (>= 0; 0 = all)."
)
FEDAVG_IMPL = flags.DEFINE_string(
    "fedavg_impl", _R.fedavg_impl,
    "grouped (several clients per TFF client call, data read inside a local worker; fast) | tff (TFF's "
    "build_unweighted_fed_avg, one TFF client call per client). Same algorithm and DP guarantee.",
)
CLIENTS_PER_CALL = flags.DEFINE_integer(
    "clients_per_call", _R.clients_per_call,
    "--fedavg_impl=grouped: at most this many clients trained in one TFF client call (>= 0; 0 = the "
    "round's clients split into two calls per worker).",
)
EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", _R.eval_every, "Evaluate on the test split every this many rounds and after the last (0 = last only)."
)
SEED = flags.DEFINE_integer(
    "seed", _R.seed,
    "Seeds the client split, the order of each client's examples and the model init (>= 0). Never seeds the "
    "DP noise or the cohorts.",
)
SAMPLING_SEED = flags.DEFINE_integer(
    "sampling_seed", None,
    "Seed of the cohorts (>= 0; tests, debugging). Unset = OS entropy: cohorts are secret, as amplification "
    "by sampling assumes. Set: amplification holds only against readers who do not know the seed (it is not "
    "written to hparams.json).",
)

# --- differential privacy ---------------------------------------------------
DP_MODE = flags.DEFINE_string(
    "dp_mode",
    _D.mode,
    "none (plain FedAvg, no guarantee) | central (server clips each update to --clip_norm and adds "
    "Gaussian noise of std noise_multiplier*clip_norm to the sum) | local (each client clips and noises "
    "its own update before sending it; see --local_mechanism).",
)
LOCAL_MECHANISM = flags.DEFINE_string(
    "local_mechanism",
    _D.local_mechanism,
    "--dp_mode=local only: gaussian (L2 clip C, noise std z*C per coordinate) | "
    "laplace (L1 clip C, Laplace scale z*C per coordinate; pure 2/z-DP per release).",
)
NOISE_MULTIPLIER = flags.DEFINE_float(
    "noise_multiplier", _D.noise_multiplier, "z: noise std in units of the clip norm (> 0 with --dp_mode=central)."
)
CLIP_NORM = flags.DEFINE_float(
    "clip_norm", _D.clip_norm, "C: L2 clip of each client update (> 0); the initial clip when adaptive."
)
ADAPTIVE_CLIPPING = flags.DEFINE_bool(
    "adaptive_clipping", _D.adaptive_clipping, "Adapt the clip to a quantile of update norms (Andrew et al. 2021)."
)
TARGET_QUANTILE = flags.DEFINE_float(
    "target_unclipped_quantile", _D.target_unclipped_quantile, "Adaptive clipping: quantile to track, in (0, 1)."
)
CLIP_LR = flags.DEFINE_float(
    "clip_learning_rate", _D.clip_learning_rate, "Adaptive clipping: geometric learning rate (> 0)."
)
CLIPPED_COUNT_STDDEV = flags.DEFINE_float(
    "clipped_count_stddev",
    None,
    "Adaptive clipping: noise std of the clipped count (> 0); unset = 0.05*clients_per_round (TFF default).",
)
TARGET_DELTA = flags.DEFINE_float(
    "target_delta", None, "delta of the reported (epsilon, delta), in (0, 1); unset = 1/num_clients^1.1."
)
ACCOUNTANT = flags.DEFINE_string(
    "accountant", _D.accountant, "Privacy accountant: rdp | pld (dp-accounting; pld only for poisson sampling)."
)
NOISE_SEED = flags.DEFINE_integer(
    "noise_seed",
    None,
    "TESTS ONLY: seed the DP noise (>= 0). Unset = fresh OS entropy. A known seed removes the privacy.",
)
TARGET_EPSILON = flags.DEFINE_float(
    "target_epsilon",
    None,
    "If set (> 0): ignore --noise_multiplier and calibrate the smallest z whose epsilon after --rounds "
    "is <= this (dp-accounting calibration, never above the target).",
)
MAX_EPSILON = flags.DEFINE_float(
    "max_epsilon",
    None,
    "Budget guard (> 0): stop before any round whose completion would push epsilon above this; exit 0.",
)

# --- outputs ----------------------------------------------------------------
OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    "/tmp/dpfl_tff/run",
    "Experiment folder: hparams.json, metrics.jsonl, summary.json, ledger.jsonl, checkpoints/, tensorboard/, "
    "run.png, worker.log.",
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an earlier run in --output_dir and start afresh.")
FRESH = flags.DEFINE_bool(
    "fresh", False, "Never resume: refuse a non-empty --output_dir unless --overwrite is also given."
)
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every",
    TrainConfig().checkpoint_every,
    "Checkpoint the full state every this many rounds (>= 0; also at the end and when stopped; 0 = only then). "
    "Rerunning with the same --output_dir resumes from the newest checkpoint.",
)

DRY_RUN = flags.DEFINE_bool(
    "dry_run", False,
    "Check everything (flags, data files, model, accounting, calibration, the output folder), print the plan "
    "(task, N, model parameters, privacy, epsilon after --rounds) and exit 0 (or 2) without training or "
    "starting a TFF worker.",
)
LOG_COHORTS = flags.DEFINE_bool(
    "log_cohorts", False,
    "Write every round's cohort to ledger.jsonl. Whoever reads the folder then knows who took part, which voids "
    "amplification by sampling against them. (--dp_mode=local always records cohorts there.)",
)
CLIENT_METRICS = flags.DEFINE_bool(
    "client_metrics", True,
    "Release the clients' training loss/accuracy, nonfinite_clients, the realised Poisson cohort size and "
    "timings, none covered by epsilon (listed in summary.json outputs_not_covered_by_epsilon). false: every "
    "released number is covered by epsilon or computed on the test set. Local DP never releases client "
    "statistics.",
)

# --- execution --------------------------------------------------------------
WORKERS = flags.DEFINE_list(
    "workers",
    [],
    "TFF worker services (host:port,host:port,...) started with `python -m experiments.run_worker --port=P`; "
    "each round's clients are split over them and merged before the server step. Empty: one private local "
    "worker.",
)
WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout",
    ExperimentConfig().worker_timeout,
    "Seconds (0 < t <= 3600) to wait for every --workers address to answer before training, and to keep "
    "retrying a worker that stops answering mid-round before the round fails naming it.",
)


# --help lists the flags in these groups, in this order (experiments/cli.py).
TASK_FLAGS = (TASK, NUM_CLIENTS, DATA_DIR, EMNIST_ONLY_DIGITS, PARTITION, DIRICHLET_ALPHA, TEST_FRACTION,
              SYN_EXAMPLES, SYN_DIM, SYN_CLASSES)
MODEL_FLAGS = (MODEL,)
TRAINING_FLAGS = (ROUNDS, CLIENTS_PER_ROUND, CLIENT_SAMPLING, SAMPLING_SEED, CLIENT_EPOCHS, CLIENT_BATCH_SIZE,
                  CLIENT_OPTIMIZER, CLIENT_LR, SERVER_OPTIMIZER, SERVER_LR, CLIENT_SHUFFLE_BUFFER,
                  CLIENT_MAX_EXAMPLES, EVAL_EVERY, SEED, FEDAVG_IMPL, CLIENTS_PER_CALL)
PRIVACY_FLAGS = (DP_MODE, LOCAL_MECHANISM, NOISE_MULTIPLIER, CLIP_NORM, ADAPTIVE_CLIPPING, TARGET_QUANTILE, CLIP_LR,
                 CLIPPED_COUNT_STDDEV, TARGET_DELTA, ACCOUNTANT, TARGET_EPSILON, MAX_EPSILON, NOISE_SEED)
OUTPUT_FLAGS = (OUTPUT_DIR, CHECKPOINT_EVERY, OVERWRITE, FRESH, DRY_RUN, LOG_COHORTS, CLIENT_METRICS)
WORKER_FLAGS = (WORKERS, WORKER_TIMEOUT)
GROUPS = (
    ("Task and data", TASK_FLAGS),
    ("Model", MODEL_FLAGS),
    ("Training (FedAvg)", TRAINING_FLAGS),
    ("Privacy", PRIVACY_FLAGS),
    ("Run and outputs", OUTPUT_FLAGS),
    ("Workers", WORKER_FLAGS),
)


def experiment_config() -> ExperimentConfig:
    """Builds the (unvalidated) configuration from the parsed flags."""
    return ExperimentConfig(
        task=TaskConfig(
            task=TASK.value,
            num_clients=NUM_CLIENTS.value,
            partition=PARTITION.value,
            dirichlet_alpha=DIRICHLET_ALPHA.value,
            test_fraction=TEST_FRACTION.value,
            synthetic_examples_per_client=SYN_EXAMPLES.value,
            synthetic_input_dim=SYN_DIM.value,
            synthetic_num_classes=SYN_CLASSES.value,
            data_dir=DATA_DIR.value,
            emnist_only_digits=EMNIST_ONLY_DIGITS.value,
        ),
        train=TrainConfig(
            model=MODEL.value,
            rounds=ROUNDS.value,
            clients_per_round=CLIENTS_PER_ROUND.value,
            client_sampling=CLIENT_SAMPLING.value,
            client_epochs=CLIENT_EPOCHS.value,
            client_batch_size=CLIENT_BATCH_SIZE.value,
            client_optimizer=CLIENT_OPTIMIZER.value,
            client_learning_rate=CLIENT_LR.value,
            server_optimizer=SERVER_OPTIMIZER.value,
            server_learning_rate=SERVER_LR.value,
            client_shuffle_buffer=CLIENT_SHUFFLE_BUFFER.value,
            client_max_examples=CLIENT_MAX_EXAMPLES.value,
            fedavg_impl=FEDAVG_IMPL.value,
            clients_per_call=CLIENTS_PER_CALL.value,
            eval_every=EVAL_EVERY.value,
            checkpoint_every=CHECKPOINT_EVERY.value,
            seed=SEED.value,
            sampling_seed=SAMPLING_SEED.value,
        ),
        dp=DPConfig(
            mode=DP_MODE.value,
            local_mechanism=LOCAL_MECHANISM.value,
            noise_multiplier=NOISE_MULTIPLIER.value,
            clip_norm=CLIP_NORM.value,
            adaptive_clipping=ADAPTIVE_CLIPPING.value,
            target_unclipped_quantile=TARGET_QUANTILE.value,
            clip_learning_rate=CLIP_LR.value,
            clipped_count_stddev=CLIPPED_COUNT_STDDEV.value,
            target_delta=TARGET_DELTA.value,
            accountant=ACCOUNTANT.value,
            noise_seed=NOISE_SEED.value,
            target_epsilon=TARGET_EPSILON.value,
            max_epsilon=MAX_EPSILON.value,
        ),
        output_dir=OUTPUT_DIR.value,
        workers=tuple(WORKERS.value),
        worker_timeout=WORKER_TIMEOUT.value,
        log_cohorts=LOG_COHORTS.value,
        client_metrics=CLIENT_METRICS.value,
    )
