"""--dp_level=example on the EMNIST and CIFAR-10 tasks (issue 26), through the real loaders on tiny files written in
their exact formats (tests/data_fixtures.py): one round through the driver, each client's record count from the
data, the record epsilon against dp-accounting by hand, and compute_epsilon counting the records from the files."""

from __future__ import annotations

import json
import math
import os

import pytest

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks import load_task
from tests.conftest import run_driver
from tests.data_fixtures import write_cifar10_batches, write_emnist_sqlite
from tests.test_compute_epsilon import _run as run_compute_epsilon
from tests.test_example_level_planning import _by_hand as planning_by_hand

EMNIST_COUNTS = [5, 9, 3, 7]  # unequal: each client's n_i must come from the file
B, Z = 4, 1.5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_emnist_sqlite(str(d), num_clients=4, examples_per_client=EMNIST_COUNTS)
    write_cifar10_batches(str(d), examples_per_batch=12)
    return str(d)


def _by_hand(counts, participations, delta) -> list[float]:
    """Each client's epsilon: ceil(n/B) Poisson-sampled Gaussian steps a round (one epoch), by dp-accounting."""
    return planning_by_hand(counts, B, 1, Z, participations, delta)


def _flags(task_flags, out):
    return [*task_flags, "--dp_level=example", f"--example_noise_multiplier={Z}", "--example_clip_norm=1.0",
            f"--client_batch_size={B}", "--clients_per_round=2", "--client_sampling=uniform", "--rounds=1",
            "--eval_every=0", "--accountant=rdp", f"--output_dir={out}"]


TASKS = {
    "emnist": lambda d: ["--task=emnist", f"--data_dir={d}", "--model=emnist_cnn_dropout"],
    "cifar10": lambda d: ["--task=cifar10", f"--data_dir={d}", "--num_clients=6", "--partition=dirichlet",
                          "--model=cifar_cnn"],
}


def _task_config(name, d) -> TaskConfig:
    if name == "emnist":
        return TaskConfig(task="emnist", data_dir=d)
    return TaskConfig(task="cifar10", data_dir=d, num_clients=6, partition="dirichlet")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_one_round_of_dp_sgd_with_each_clients_record_count_from_the_files(data_dir, tmp_path, capsys, task):
    data = load_task(_task_config(task, data_dir), seed=0)
    counts = [data.client_size(c) for c in range(data.num_clients)]
    if task == "emnist":
        assert counts == EMNIST_COUNTS
    else:
        assert sum(counts) == 60 and len(set(counts)) > 1  # 5 batches of 12, an unequal Dirichlet split
    out = str(tmp_path / "run")
    assert run_driver(_flags(TASKS[task](data_dir), out)) == 0, capsys.readouterr().err
    assert "privacy: record-level DP (--dp_level=example)" in capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "summary.json")))
    (line,) = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    assert summary["dp_level"] == "example" and summary["record_counts"] == counts
    assert math.isinf(float(summary["epsilon"])) and line["clients_this_round"] == 2
    with open(os.path.join(out, "ledger.jsonl")) as f:
        (cohort,) = [json.loads(r)["cohort"] for r in f]
    parts = [int(c in cohort) for c in range(len(counts))]
    want = _by_hand(counts, parts, summary["delta"])
    assert summary["record_epsilon_per_client"] == pytest.approx(want, rel=1e-9)
    assert line["record_epsilon"] == pytest.approx(max(want), rel=1e-9) == summary["record_epsilon"]
    assert line["record_steps_max"] == max(math.ceil(counts[c] / B) for c in cohort)
    assert math.isfinite(summary["final_test_loss"])


def test_compute_epsilon_counts_each_clients_records_in_the_emnist_file(data_dir):
    proc = run_compute_epsilon("--task=emnist", f"--data_dir={data_dir}", "--dp_level=example",
                               f"--example_noise_multiplier={Z}", f"--client_batch_size={B}", "--clients_per_round=4",
                               "--client_sampling=uniform", "--rounds=3", "--accountant=rdp")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    want = _by_hand(EMNIST_COUNTS, [3] * 4, result["delta"])
    assert result["record_epsilon_per_client"] == pytest.approx(want, rel=1e-9)
    assert result["record_epsilon"] == pytest.approx(max(want), rel=1e-9)
