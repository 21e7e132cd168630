"""--dp_level=example end to end (issue 26): the driver on the cross-silo config, the record epsilon against
dp-accounting by hand, a resume that keeps every client's history, the DP-SGD loop's steps and batches,
calibration, compute_epsilon and the refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff.privacy import dp_sgd, events, example_level
from tests.conftest import run_driver
from tests.test_compute_epsilon import _run as run_compute_epsilon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "cross_silo_digits.cfg")
# Five silos, two rounds: the smallest run of the config that still has unequal silos.
FAST = ["--num_clients=5", "--clients_per_round=5", "--eval_every=0", "--checkpoint_every=1"]


def _driver(out, *extra) -> int:
    return run_driver([f"--flagfile={CFG}", *FAST, f"--output_dir={out}", *extra])


def _lines(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _by_hand(counts, b, z, participations, delta) -> list[float]:
    """Each client's epsilon: ceil(n/b) steps a round (one local epoch), composed by dp-accounting directly."""
    out = []
    for n in counts:
        acc = dp_accounting.rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(min(1.0, b / n), dp_accounting.GaussianDpEvent(z))
        acc.compose(event, math.ceil(n / b) * participations)
        out.append(acc.get_epsilon(delta))
    return out


def test_two_rounds_through_the_driver_report_record_epsilon_as_dp_accounting_by_hand(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _driver(out, "--rounds=2") == 0
    printed = capsys.readouterr().out
    assert "privacy: record-level DP (--dp_level=example)" in printed and "add-or-remove-one record" in printed
    assert "record epsilon" in printed.splitlines()[-1]
    lines, summary = _lines(out), _summary(out)
    assert [r["round"] for r in lines] == [1, 2]
    counts, delta = summary["record_counts"], summary["delta"]
    assert len(counts) == 5 and len(set(counts)) == 5  # unequal silos, each a client's own n_i
    assert summary["dp_level"] == "example" and summary["dp_mode"] == "none" and math.isinf(float(summary["epsilon"]))
    for r, line in enumerate(lines, 1):
        want = _by_hand(counts, 16, 2.0, r, delta)
        assert line["record_epsilon"] == pytest.approx(max(want), rel=1e-9)
        assert line["record_epsilon_client"] == int(np.argmax(want))
        assert line["record_steps_max"] == max(math.ceil(n / 16) for n in counts) * r
        assert "train_loss" not in line  # no client statistic leaves a client
    assert lines[0]["record_epsilon"] < lines[1]["record_epsilon"]
    assert summary["record_epsilon"] == lines[-1]["record_epsilon"]
    assert summary["record_epsilon_per_client"] == pytest.approx(_by_hand(counts, 16, 2.0, 2, delta), rel=1e-9)
    assert summary["final_test_accuracy"] is not None


def test_the_record_epsilon_survives_a_resume_and_never_decreases(tmp_path):
    out = str(tmp_path / "run")
    assert _driver(out, "--rounds=2") == 0
    first = _lines(out)
    # Lose the newest checkpoint: the resume restarts from round 1 and round 2 is released again.
    shutil.rmtree(os.path.join(out, "checkpoints", "ckpt_000002"))
    assert _driver(out, "--rounds=3") == 0
    lines, summary = _lines(out), _summary(out)
    assert [r["round"] for r in lines] == [1, 2, 3]
    with open(os.path.join(out, "ledger.jsonl")) as f:
        assert len(f.readlines()) == 4  # rounds 1, 2, 2 again, 3: every release counts
    counts, delta = summary["record_counts"], summary["delta"]
    seen = [r["record_epsilon"] for r in first] + [r["record_epsilon"] for r in lines[1:]]
    assert all(a < b for a, b in zip(seen, seen[1:])), seen
    assert lines[1]["record_epsilon"] == pytest.approx(max(_by_hand(counts, 16, 2.0, 3, delta)), rel=1e-9)
    assert summary["record_epsilon"] == pytest.approx(max(_by_hand(counts, 16, 2.0, 4, delta)), rel=1e-9)
    assert summary["record_participations_max"] == 4


def test_max_epsilon_stops_the_run_on_record_epsilon(tmp_path):
    from dpfl_tff.config import TaskConfig, default_delta
    from dpfl_tff.tasks import cross_silo

    counts = [len(c) for c in cross_silo.load(TaskConfig(task="cross_silo_digits", num_clients=5), 0).clients]
    delta = default_delta(sum(counts))
    after = [max(_by_hand(counts, 16, 2.0, r, delta)) for r in (2, 3)]
    budget = (after[0] + after[1]) / 2  # room for two rounds, not three
    out = str(tmp_path / "run")
    assert _driver(out, "--rounds=5", f"--max_epsilon={budget}") == 0
    summary, lines = _summary(out), _lines(out)
    assert summary["record_counts"] == counts
    assert summary["status"] == "stopped_at_budget" and summary["guarded_epsilon"] == "record_epsilon"
    assert [r["round"] for r in lines] == [1, 2] and lines[-1]["record_epsilon"] == pytest.approx(after[0], rel=1e-9)
    assert "record_epsilon" in summary["stop_reason"]


@pytest.mark.parametrize("flags, words", [
    (["--dp_level=sample"], "--dp_level=sample: must be one of client, example"),
    (["--dp_mode=central"], "--dp_level=example with --dp_mode=central"),
    (["--example_clip_norm=0"], "--example_clip_norm=0.0: must be > 0"),
    (["--example_noise_multiplier=-1"], "--example_noise_multiplier=-1.0: must be >= 0"),
    (["--example_noise_multiplier=0"], "--example_noise_multiplier=0 with --dp_level=example"),
    (["--canary_clients=2"], "--canary_clients=2 with --dp_level=example"),
    (["--fedavg_impl=tff"], "--fedavg_impl=tff with --dp_level=example"),
    (["--client_max_examples=10"], "--client_max_examples=10 with --dp_level=example"),
    (["--num_clients=3", "--clients_per_round=3"], "--num_clients=3: --task=cross_silo_digits splits"),
])
def test_bad_flags_exit_2_with_one_error_line(tmp_path, capsys, flags, words):
    out = str(tmp_path / "run")
    assert run_driver([f"--flagfile={CFG}", f"--output_dir={out}", *flags]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and words in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_local_dp_sgd_runs_epochs_times_ceil_n_over_b_steps_on_poisson_batches():
    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(4,))])
    n, b, epochs = 203, 8, 3
    x = tf.random.normal([n + 5, 4])  # 5 rows of padding past the client's n records are never drawn
    y = tf.zeros([n + 5], tf.int32)
    spec = dp_sgd.LocalDPSGD(clip=1.0, noise_multiplier=1.0, expected_batch=b, epochs=epochs)
    import tensorflow_federated as tff

    opt = tff.learning.optimizers.build_sgdm(learning_rate=0.01)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps, drawn = tf.function(lambda: dp_sgd.local_dp_sgd_training(spec, model, loss, opt, x, y, tf.constant(n)))()
    assert int(steps) == example_level.local_steps(n, b, epochs) == epochs * math.ceil(n / b) == 78
    # Examples drawn over all steps: Binomial(78 n, q = b/n), mean 78 b = 624, std sqrt(624 (1 - b/n)) = 24.5;
    # 6 std -> two-sided failure probability 2e-9.
    mean, std = 78 * b, math.sqrt(78 * b * (1 - b / n))
    assert abs(int(drawn) - mean) < 6 * std


def test_calibration_meets_the_target_on_the_safe_side():
    from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig

    cfg = ExperimentConfig(
        task=TaskConfig(task="cross_silo_digits", num_clients=5),
        train=TrainConfig(rounds=10, clients_per_round=5, client_sampling="uniform", client_batch_size=16),
        dp=DPConfig(mode="none", dp_level="example", target_epsilon=3.0, record_counts=(40, 90, 200, 300, 500)))
    z = example_level.calibrate_example_noise(cfg, 3.0)
    assert example_level.planned_record_epsilon(cfg, z) <= 3.0
    # The search's own accountant (RDP at the integer orders) is just above the target 0.1% below z.
    orders = events.integer_orders()
    assert example_level.planned_record_epsilon(cfg, z * 0.999, "rdp", orders) > 3.0
    # The planned figure is the worst client's, in every round, by hand.
    delta = cfg.target_delta
    assert delta == pytest.approx(1 / 1130**1.1)
    want = _by_hand((40, 90, 200, 300, 500), 16, z, 10, delta)
    assert example_level.planned_record_epsilon(cfg, z) == pytest.approx(max(want), rel=1e-9)
    # Through the driver's configuration: plan.calibrated sets z_ex, not the client-level multiplier.
    from dpfl_tff import plan

    out, notes = plan.calibrated(dataclasses.replace(cfg))
    assert out.dp.example_noise_multiplier == pytest.approx(z) and out.dp.noise_multiplier == cfg.dp.noise_multiplier
    assert "--example_noise_multiplier=" in notes[0]


def test_compute_epsilon_gives_the_runs_record_epsilon():
    proc = run_compute_epsilon(f"--flagfile={CFG}", "--num_clients=5", "--clients_per_round=5",
                               "--records_per_client=41,60,90,150,250", "--rounds=4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    want = _by_hand([41, 60, 90, 150, 250], 16, 2.0, 4, result["delta"])
    assert result["record_epsilon"] == pytest.approx(max(want), rel=1e-9)
    assert result["record_epsilon_per_client"] == pytest.approx(want, rel=1e-9)
    assert proc.stdout.startswith("record epsilon ")
    bad = run_compute_epsilon(f"--flagfile={CFG}", "--records_per_client=1,2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --records_per_client=1,2")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_record_ledger_composes_each_clients_own_participations_as_dp_accounting_by_hand(accountant):
    from dpfl_tff.privacy.events import PLD_DISCRETIZATION

    counts, b, epochs, z, delta = [30, 100, 400], 10, 2, 1.1, 1e-5
    cohorts = [[0, 1, 2], [1], [0, 2], [1, 2]]
    ledger = example_level.RecordLedger(counts, b, epochs, z, delta, accountant)
    seen = []
    for cohort in cohorts:
        preview, field = ledger.preview_of(cohort, "guarantee")
        out = ledger.commit(cohort)
        assert field == "record_epsilon" and preview == pytest.approx(out["record_epsilon"], rel=1e-12)
        seen.append(out["record_epsilon"])
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    parts = [2, 3, 3]
    want = []
    for n, p in zip(counts, parts):
        acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
               else dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION))
        acc.compose(dp_accounting.PoissonSampledDpEvent(min(1.0, b / n), dp_accounting.GaussianDpEvent(z)),
                    epochs * math.ceil(n / b) * p)
        want.append(acc.get_epsilon(delta))
    assert ledger.epsilons() == pytest.approx(want, rel=1e-9)
    assert seen[-1] == max(ledger.epsilons())
    # A resume replays the cohorts of ledger.jsonl into a fresh ledger: the same per-client figures.
    replayed = example_level.RecordLedger(counts, b, epochs, z, delta, accountant)
    for r, cohort in enumerate(cohorts, 1):
        replayed.replay_entry({"round": r, "cohort": cohort})
    assert replayed.epsilons() == ledger.epsilons() and replayed.summary_fields() == ledger.summary_fields()
    assert ledger.summary_fields()["record_participations_max"] == 3


def test_a_sweep_of_z_ex_is_not_collapsed_into_the_no_dp_run():
    from dpfl_tff import sweep
    from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig

    base = ExperimentConfig(task=TaskConfig(task="cross_silo_digits", num_clients=5),
                            train=TrainConfig(rounds=2, clients_per_round=5, client_sampling="uniform"),
                            dp=DPConfig(mode="none", dp_level="example"))
    plan = sweep.expand(base, [sweep.Axis("example_noise_multiplier", (1.0, 2.0))], seeds=1)
    assert [r.cfg.dp.example_noise_multiplier for r in plan.runs] == [1.0, 2.0]
    assert all(r.cfg.dp.dp_level == "example" for r in plan.runs)


def test_dp_level_example_without_dp_mode_means_the_server_adds_no_noise():
    import dpfl_tff

    cfg = dpfl_tff.make_config(flagfile=CFG, dp_level="example", num_clients=5, clients_per_round=5)
    assert cfg.dp.mode == "none"
    assert _driver_config(["--dp_level=example", "--task=cross_silo_digits", "--num_clients=5",
                           "--clients_per_round=5"]).dp.mode == "none"


def _driver_config(args):
    from absl import flags
    from absl.testing import flagsaver

    from experiments import flags as dpfl_flags

    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["run_federated", *args])
        return dpfl_flags.experiment_config()


def test_more_than_100_clients_get_quantiles_in_the_summary():
    eps = [float(i) for i in range(101)]
    assert example_level.per_client(eps[:100]) == {"record_epsilon_per_client": eps[:100]}
    q = example_level.per_client(eps[::-1])["record_epsilon_quantiles"]
    assert q == {"0": 0.0, "0.5": 50.0, "0.9": 90.0, "0.99": 99.0, "1": 100.0}
