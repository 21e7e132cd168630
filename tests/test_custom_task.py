"""--task=package.module:function: a CSV task trains; bad task functions stop the run with one line, exit 2."""

import inspect
import json
import os
import re

import numpy as np
import pytest

from dpfl_tff import plan
from dpfl_tff.config import ConfigError, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.tasks import load_task
from tests import custom_tasks
from tests.conftest import run_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_csv_task_splits_by_user(tmp_path):
    custom_tasks.write_examples_csv(str(tmp_path), users=30, rows_per_user=8, features=4)
    data = load_task(TaskConfig(task="tests.custom_tasks:csv_by_user", data_dir=str(tmp_path)), seed=1)
    assert data.num_clients == 24 and len(data.test) == 6 * 8  # a fifth of the 30 users is the test set
    assert data.input_shape == (4,) and data.num_classes == 3
    assert all(len(c) == 8 and c.x.dtype == np.float32 and c.y.dtype == np.int32 for c in data.clients)
    assert data.description == "examples.csv: 24 users as clients, 6 test users"


def test_csv_task_trains_and_n_is_the_tasks_client_count(tmp_path, capsys):
    custom_tasks.write_examples_csv(str(tmp_path), users=30, rows_per_user=8, features=4)
    out = tmp_path / "run"
    code = run_driver(["--task=tests.custom_tasks:csv_by_user", f"--data_dir={tmp_path}", "--num_clients=100",
                       "--clients_per_round=4", "--rounds=2", "--eval_every=1", "--model=logistic",
                       "--noise_multiplier=1.0", f"--output_dir={out}"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "N = 24 clients" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [1, 2] and all(np.isfinite(r["test_loss"]) for r in rows)
    hparams = json.load(open(out / "hparams.json"))
    assert hparams["task"]["num_clients"] == 24  # the accounting's N is the task's, not --num_clients=100
    assert hparams["resolved_target_delta"] == pytest.approx(1 / 24**1.1)


def test_plan_uses_the_custom_tasks_n_for_the_epsilon():
    """N is the task's 7 clients, not --num_clients=100: the epsilon is that of N = 7."""
    from dpfl_tff.privacy import accounting

    def cfg(task, n):
        return ExperimentConfig(task=TaskConfig(task=task, num_clients=n),
                                train=TrainConfig(model="logistic", clients_per_round=3, rounds=5))

    custom = cfg("tests.custom_tasks:seven_clients", 100)
    assert not custom.task.n_is_known  # unknown until the function has run
    run_plan = plan.prepare(custom, log=lambda s: None)
    resolved, data = run_plan.cfg, run_plan.data
    assert data.num_clients == 7 and resolved.task.n_is_known and resolved.task.num_clients == 7
    eps = lambda c: accounting.make_ledger(c).planned(5)["epsilon"]  # noqa: E731
    assert eps(resolved) == pytest.approx(eps(cfg("synthetic", 7)), rel=1e-12)
    assert eps(resolved) > 1.5 * eps(cfg("synthetic", 100))  # sampling 3 of 7 amplifies far less than 3 of 100


@pytest.mark.parametrize(
    "fn, words",
    [
        ("returns_tuple", "returned tuple, not a dpfl_tff.tasks.FederatedData"),
        ("float64_features", "client 0: x has dtype float64; must be float32"),
        ("int64_labels", "client 0: y has dtype int64; must be int32"),
        ("label_out_of_range", "client 0: labels must be in [0, 2) (num_classes=2); found min 0, max 2"),
        ("empty_client", "client 1: no examples"),
        ("no_clients", "clients must be a non-empty sequence"),
        ("nan_feature", "client 0: 1 non-finite feature value(s)"),
        ("shape_mismatch", "client 0: x has shape (3, 2); must be (3, 3)"),
        ("no_test_set", "test set: is a NoneType, not a dpfl_tff.tasks.ClientArrays"),
        ("one_class", "num_classes=1; must be an integer >= 2"),
        ("raises", "the function failed (FileNotFoundError: data/examples.csv missing)"),
        ("needs_path", "must take only keyword arguments among data_dir, num_clients, seed, config; it requires path"),
        ("missing", "tests.custom_tasks has no function missing"),
    ],
)
def test_bad_task_functions_fail_clearly(fn, words):
    name = f"tests.custom_tasks:{fn}"
    with pytest.raises(ConfigError) as e:
        load_task(TaskConfig(task=name), seed=0)
    msg = str(e.value)
    assert msg.startswith(f"--task={name}: ") and words in msg and "\n" not in msg, msg


def test_driver_exits_2_with_one_line(tmp_path, capsys):
    for task, words in [("tests.custom_tasks:empty_client", "client 1: no examples"),
                        ("tests.no_such_module:load", "cannot import tests.no_such_module (ModuleNotFoundError"),
                        ("not a module:fn", "must be one of digits")]:
        assert run_driver([f"--task={task}", f"--output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --task={task}: ") and words in err[-1], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_docs_show_the_tested_example():
    """docs/tasks-and-models.md "Your own task" shows csv_by_user exactly as tests/custom_tasks.py defines it."""
    page = open(os.path.join(ROOT, "docs", "tasks-and-models.md"), encoding="utf-8").read()
    block = re.search(r"## Your own task\n.*?```python\n(.*?)```", page, re.S).group(1)
    source = inspect.getsource(custom_tasks.csv_by_user)
    assert source in block
    assert "--task=mytasks:csv_by_user" in page
