"""--dp_mode=ftrl (DP-FTRL): the tree's noise, its accounting, the epoch shuffle, training, resume, refusals."""

import json
import os
import shutil

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import accounting
from dpfl_tff.privacy.tree_ledger import TreeLedger, planned_trees
from dpfl_tff.sampling import EpochShuffler, sampler_for
from tests.conftest import run_driver
from tests.test_compute_epsilon import _run as compute_epsilon

N, M, Z, DELTA = 30, 10, 1.3, 1e-3  # 3 rounds per epoch
ARGS = [
    "--dp_mode=ftrl", "--task=synthetic", f"--num_clients={N}", "--synthetic_examples_per_client=10",
    "--synthetic_input_dim=8", "--model=logistic", f"--clients_per_round={M}", f"--noise_multiplier={Z}",
    "--clip_norm=0.5", "--server_optimizer=sgd", "--eval_every=0", f"--target_delta={DELTA}",
    "--noise_seed=5", "--sampling_seed=2", "--client_metrics=false",
]


def _direct_epsilon(tree_steps, z=Z, delta=DELTA):
    """dp-accounting's own figure: one SingleEpochTreeAggregationDpEvent per tree, composed, REPLACE_SPECIAL."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for steps in tree_steps:
        acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps))
    return acc.get_epsilon(delta)


def _lines(path):
    return [json.loads(line) for line in open(path)]


# (1) The noise of the residual tree.

def test_residual_tree_noise_variance_grows_with_the_nodes_covering_the_prefix_not_with_t():
    """Zero records: the sum of a tree's first t outputs is the tree's noise for [1, t] alone.

    Its d coordinates are i.i.d. N(0, v_t), v_t = prefix_noise_variance(t) (the efficient tree: the nodes of
    t's binary expansion, height h adding s^2 / (2 - 2^-h)), so d * mean(x^2) / v_t ~ chi2(d). Each of the 19
    checks fails with probability 2e-8 (two-sided chi-square quantiles): < 1e-6 per run. The same bounds
    exclude v_t = t s^2 (plain noise every round) for every t >= 2, and a restarted tree starts again at v_1.
    """
    import tensorflow as tf

    from dpfl_tff.privacy import tree_query

    d, s, m = 100_000, 0.7, 4.0  # noise std per node z*C = 0.7 (z=1.4, C=0.5); the output is divided by m
    q = tree_query.ftrl_query(0.5, 1.4, m, [tf.TensorSpec((d,), tf.float32)], 16, [1, 2])
    state = tree_query.with_new_tree(tf.nest.map_structure(np.asarray, q.initial_global_state()), [3, 4])
    lo, hi = stats.chi2.ppf(1e-8, d) / d, stats.chi2.isf(1e-8, d) / d
    total, t = np.zeros(d), 0
    for step in range(1, 20):
        if step == 17:  # a new tree
            state, total, t = tree_query.with_new_tree(state, [5, 6]), np.zeros(d), 0
        out, state, _ = q.get_noised_result([tf.zeros(d)], state)
        state = tf.nest.map_structure(np.asarray, state)
        total, t = total + m * out[0].numpy().astype(np.float64), t + 1
        v = tree_query.prefix_noise_variance(t, s)
        ratio = np.mean(total**2) / v
        assert lo < ratio < hi, (t, ratio)
        if t >= 2:
            assert np.mean(total**2) / (t * s**2) < lo  # not the variance of t independent noises
    assert [tree_query.prefix_noise_variance(t, 1.0, efficient=False) for t in (1, 2, 3, 7, 8)] == [1, 1, 2, 3, 1]


# (2) The accounting.

def _ledger_run(ledger, rounds, cohorts=None):
    eps = []
    for r in rounds:
        ledger.begin_round(r)
        eps.append(ledger.commit(None if cohorts is None else cohorts[r])["epsilon"])
    return eps


def test_ledger_equals_dp_accounting_per_round_with_partial_epochs_and_a_resumed_tree():
    ledger = TreeLedger(Z, DELTA, rounds_per_epoch=3)
    eps = _ledger_run(ledger, range(1, 8))  # epochs [1-3], [4-6], [7]
    expected_trees = [[1], [2], [3], [3, 1], [3, 2], [3, 3], [3, 3, 1]]
    assert eps == [pytest.approx(_direct_epsilon(t), rel=1e-12) for t in expected_trees]
    assert ledger.planned(7)["epsilon"] == pytest.approx(_direct_epsilon([3, 3, 1]), rel=1e-12)
    assert ledger.planned(7)["trees"] == 3 and planned_trees(7, 3) == [3, 3, 1]
    # A resume from round 4's checkpoint after round 5 was released: round 5 re-runs in a fresh tree.
    resumed = TreeLedger(Z, DELTA, rounds_per_epoch=3)
    fields = []
    for r in range(1, 6):
        fields.append(resumed.begin_round(r))
        resumed.commit(None)
    assert resumed.begin_round(5) == {"epoch": 2, "tree": 3, "tree_round": 1}
    assert resumed.preview(None) == pytest.approx(_direct_epsilon([3, 2, 1]), rel=1e-12)
    resumed.commit(None)
    assert _ledger_run(resumed, [6, 7])[-1] == pytest.approx(_direct_epsilon([3, 2, 2, 1]), rel=1e-12)
    # Replaying those ledger lines rebuilds the same trees.
    lines = [{"round": r, "release": i + 1, **f} for i, (r, f) in enumerate(zip(range(1, 6), fields))]
    lines += [{"round": 5, "epoch": 2, "tree": 3, "tree_round": 1}, {"round": 6, "epoch": 2, "tree": 3, "tree_round": 2}]
    replayed = TreeLedger(Z, DELTA, rounds_per_epoch=3)
    for line in lines:
        replayed.replay_entry(line)
    assert replayed.trees == [3, 2, 2] and replayed.released == 7


def test_ledger_refuses_a_client_twice_in_a_tree():
    from dpfl_tff.errors import LedgerError

    replayed = TreeLedger(Z, DELTA, rounds_per_epoch=3)
    replayed.replay_entry({"round": 1, "epoch": 1, "tree": 1, "tree_round": 1, "cohort": [1, 2]})
    with pytest.raises(LedgerError, match="twice in tree 1"):
        replayed.replay_entry({"round": 2, "epoch": 1, "tree": 1, "tree_round": 2, "cohort": [2, 3]})


def test_calibration_and_compute_epsilon_match_dp_accounting():
    cfg = ExperimentConfig(task=TaskConfig(num_clients=700, num_clients_known=True),
                           train=TrainConfig(clients_per_round=70, rounds=25, client_sampling="shuffle",
                                             server_optimizer="sgd"),
                           dp=DPConfig(mode="ftrl", target_delta=1e-5)).validate()
    z = accounting.calibrate_noise_multiplier(cfg, 5.0)
    assert _direct_epsilon([10, 10, 5], z, 1e-5) <= 5.0 < _direct_epsilon([10, 10, 5], z * (1 - 1e-4), 1e-5)
    proc = compute_epsilon("--dp_mode=ftrl", "--num_clients=700", "--clients_per_round=70", "--rounds=25",
                           "--noise_multiplier=3", "--target_delta=1e-5")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epsilon"] == pytest.approx(_direct_epsilon([10, 10, 5], 3.0, 1e-5), rel=1e-12)
    assert (result["neighboring_relation"], result["client_sampling"], result["trees"]) == ("replace_special",
                                                                                              "shuffle", 3)
    calibrated = compute_epsilon("--dp_mode=ftrl", "--num_clients=700", "--clients_per_round=70", "--rounds=25",
                                 "--target_epsilon=5", "--target_delta=1e-5")
    assert json.loads(calibrated.stdout.strip().splitlines()[-1])["noise_multiplier"] == pytest.approx(z, rel=1e-9)


# (3) The epoch shuffle.

def test_shuffle_every_client_at_most_once_per_epoch_remainder_sits_out_and_resume_keeps_the_epoch():
    n, m = 23, 5  # 4 rounds per epoch, 3 clients sit each epoch out
    for sampler in (sampler_for("shuffle", n, m, sampling_seed=7), sampler_for("shuffle", n, m)):
        assert isinstance(sampler, EpochShuffler) and sampler.rounds_per_epoch == 4
        for epoch in range(3):
            cohorts = [sampler.cohort(epoch * 4 + k + 1) for k in range(4)]
            together = np.concatenate(cohorts)
            assert all(len(c) == m for c in cohorts) and len(set(together.tolist())) == 20
            left_out = set(range(n)) - set(together.tolist())
            assert left_out == set(sampler.permutation(epoch)[20:].tolist()) and len(left_out) == 3
        assert sampler.cohort(6, execution=2).tolist() == sampler.cohort(6).tolist()  # a re-run: same clients
    seeded = [sampler_for("shuffle", n, m, sampling_seed=7).cohort(r).tolist() for r in range(1, 9)]
    assert seeded == [sampler_for("shuffle", n, m, sampling_seed=7).cohort(r).tolist() for r in range(1, 9)]
    # Unseeded, a resumed run takes the epoch's released cohorts from the ledger and shares out the rest.
    first = sampler_for("shuffle", n, m)
    entries = [{"round": r, "cohort": first.cohort(r).tolist()} for r in (1, 2, 3, 4, 5, 6)]
    resumed = sampler_for("shuffle", n, m)
    resumed.restore(entries)
    assert [resumed.cohort(r).tolist() for r in range(1, 7)] == [e["cohort"] for e in entries]
    epoch2 = np.concatenate([resumed.cohort(r) for r in (5, 6, 7, 8)])
    assert len(set(epoch2.tolist())) == 20


# (4) Training: epsilon per round.

def test_ftrl_trains_and_logs_dp_accounting_epsilon_every_round(tmp_path, capsys):
    out = tmp_path / "run"
    budget = (_direct_epsilon([3, 1]) + _direct_epsilon([3, 2])) / 2  # the budget guard stops before round 5
    # --client_sampling unset: shuffle
    assert run_driver([*ARGS, "--rounds=6", f"--max_epsilon={budget}", f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "DP-FTRL" in printed and "stopped: privacy budget: round 5 would bring epsilon to" in printed
    rows = _lines(out / "metrics.jsonl")
    assert [(r["epoch"], r["tree"], r["tree_round"]) for r in rows] == [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 2, 1)]
    trees = [[1], [2], [3], [3, 1]]
    assert [r["epsilon"] for r in rows] == [pytest.approx(_direct_epsilon(t), rel=1e-12) for t in trees]
    assert {(r["neighboring_relation"], r["client_sampling"]) for r in rows} == {("replace_special", "shuffle")}
    ledger = _lines(out / "ledger.jsonl")
    epoch1 = np.concatenate([e["cohort"] for e in ledger[:3]])
    assert len(set(epoch1.tolist())) == 3 * M == N
    summary = json.load(open(out / "summary.json"))
    assert summary["dp_mode"] == "ftrl" and summary["rounds_per_epoch"] == 3 and summary["trees"] == 2
    assert summary["status"] == "stopped_at_budget" and summary["clients_left_out_per_epoch"] == 0
    assert np.isfinite(rows[-1]["test_accuracy"])


# (5) Resume: the tree survives a resume at the ledger's end; re-run rounds get a fresh tree and the same clients.

def test_resume_continues_the_tree_or_reruns_released_rounds_in_a_fresh_tree(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={whole}"]) == 0
    assert run_driver([*ARGS, "--rounds=5", "--checkpoint_every=2", f"--output_dir={part}"]) == 0
    rerun = tmp_path / "rerun"
    shutil.copytree(part, rerun)
    shutil.rmtree(rerun / "checkpoints" / "ckpt_000005")  # as if killed after round 5's ledger line
    # Continued from round 5's checkpoint: the same trees, the same noise, the same model as without a stop.
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={part}"]) == 0
    a, b = _lines(whole / "metrics.jsonl"), _lines(part / "metrics.jsonl")
    assert [r["tree"] for r in b] == [r["tree"] for r in a] == [1, 1, 1, 2, 2, 2, 3]
    assert b[-1]["test_loss"] == pytest.approx(a[-1]["test_loss"], rel=1e-5)
    assert b[-1]["epsilon"] == pytest.approx(_direct_epsilon([3, 3, 1]), rel=1e-12)
    # Resumed from round 4: round 5 was released, so it re-runs with the same clients in a new tree (tree 3).
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={rerun}"]) == 0
    ledger = _lines(rerun / "ledger.jsonl")
    assert [(e["round"], e["execution"], e["tree"], e["tree_round"]) for e in ledger] == [
        (1, 1, 1, 1), (2, 1, 1, 2), (3, 1, 1, 3), (4, 1, 2, 1), (5, 1, 2, 2),
        (5, 2, 3, 1), (6, 1, 3, 2), (7, 1, 4, 1)]
    assert ledger[5]["cohort"] == ledger[4]["cohort"]
    epoch2 = np.concatenate([e["cohort"] for e in ledger[3:7] if e["execution"] == 1])
    assert len(set(epoch2.tolist())) == N
    rows = _lines(rerun / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 8))
    assert rows[-1]["epsilon"] == pytest.approx(_direct_epsilon([3, 2, 2, 1]), rel=1e-12)
    assert rows[-1]["rounds_accounted"] == 8


# (6) Refusals: one line, exit 2.

@pytest.mark.parametrize("extra, needle", [
    (["--accountant=pld"], "--accountant=pld with --dp_mode=ftrl"),
    (["--server_optimizer=adam"], "--server_optimizer=adam with --dp_mode=ftrl: must be one of sgd, sgdm"),
    (["--client_sampling=poisson"], "--client_sampling=poisson with --dp_mode=ftrl"),
    (["--adaptive_clipping"], "--adaptive_clipping with --dp_mode=ftrl"),
    (["--dp_mode=central", "--client_sampling=shuffle"], "--client_sampling=shuffle with --dp_mode=central"),
])
def test_refusals_are_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    assert run_driver([*ARGS, *extra, f"--output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not os.path.exists(tmp_path / "r")


def test_shuffle_with_local_dp_counts_each_participation():
    cfg = ExperimentConfig(task=TaskConfig(num_clients=20, num_clients_known=True),
                           train=TrainConfig(clients_per_round=5, rounds=8, client_sampling="shuffle"),
                           dp=DPConfig(mode="local", target_delta=1e-3)).validate()
    ledger = accounting.make_ledger(cfg)
    sampler = sampler_for("shuffle", 20, 5, sampling_seed=1)
    for r in range(1, 9):
        ledger.begin_round(r)
        fields = ledger.commit(sampler.cohort(r))
    assert fields["max_participations"] == 2 and fields["epsilon_analysis"] == "post_processing"
