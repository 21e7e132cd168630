"""Predictions compose the run's history, and the budget guards keep the promised epsilon (issue 23, items 3-4).

Every predicted epsilon (the start-up privacy line, `--dry_run` on an existing
folder, the calibration note, the sweep's plan) replays the verified ledger
first; `--max_epsilon` caps the epsilon the mode promises (local DP:
`local_epsilon`); `--target_epsilon` is a guard as well. The golden figures
are dp-accounting's own, recomputed here from the trees or participations.
"""

import json
import re
import shutil

import dp_accounting
import pytest

from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import accounting
from dpfl_tff.privacy.registry import mechanism_for
from dpfl_tff.privacy.tree_ledger import TreeLedger
from tests.conftest import run_driver

N, M, Z, DELTA = 100, 10, 4.0, 1e-3  # DP-FTRL: 10 rounds per epoch
FTRL = [
    "--dp_mode=ftrl", "--task=synthetic", f"--num_clients={N}", "--synthetic_examples_per_client=5",
    "--synthetic_input_dim=4", "--model=logistic", f"--clients_per_round={M}", f"--noise_multiplier={Z}",
    "--clip_norm=0.5", "--server_optimizer=sgd", "--eval_every=0", f"--target_delta={DELTA}",
    "--noise_seed=5", "--sampling_seed=2", "--client_metrics=false",
]


def _trees_epsilon(trees, z=Z, delta=DELTA):
    """dp-accounting's figure: one SingleEpochTreeAggregationDpEvent per tree, composed, REPLACE_SPECIAL."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for steps in trees:
        acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps))
    return acc.get_epsilon(delta)


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _start_epsilon(printed: str) -> float:
    """The epsilon of the start-up privacy line ("epsilon after R rounds: X")."""
    return float(re.search(r"epsilon after \d+ rounds: ([0-9.e+-]+)", printed).group(1))


def test_projected_trees_compose_the_replayed_ledger_then_the_rounds_left():
    ledger = TreeLedger(Z, DELTA, rounds_per_epoch=10)
    for r in range(1, 9):
        ledger.replay_entry({"round": r, "epoch": 1, "tree": 1, "tree_round": r})
    # Resumed from round 5 with rounds 6..15: round 6 starts a fresh tree (round 8 was released), 11 an epoch.
    assert ledger.projected_trees(5, 15) == [8, 5, 5]
    assert ledger.projected(5, 15)["epsilon"] == pytest.approx(_trees_epsilon([8, 5, 5]), rel=1e-12)
    assert ledger.projected(8, 15)["epsilon"] == pytest.approx(_trees_epsilon([10, 5]), rel=1e-12)
    assert ledger.projected(8, 8)["epsilon"] == pytest.approx(_trees_epsilon([8]), rel=1e-12)  # nothing left
    assert ledger.trees == [8] and ledger.released == 8  # a projection changes nothing


def test_projected_central_and_local_count_every_release_and_every_round_left():
    cfg = ExperimentConfig(task=TaskConfig(num_clients=100, num_clients_known=True),
                           train=TrainConfig(clients_per_round=10, rounds=12, client_sampling="uniform"),
                           dp=DPConfig(mode="central", noise_multiplier=1.0, target_delta=1e-4)).validate()
    central = mechanism_for(cfg)
    history = [{"round": r, "release": r} for r in range(1, 9)]
    got = central.projected(history, 5, 12)  # 8 released, 7 left: 15 releases
    assert got["epsilon"] == pytest.approx(accounting.epsilon_after(central.round_privacy(), 15, 1e-4, "rdp"))
    local = mechanism_for(ExperimentConfig(task=cfg.task, train=cfg.train,
                                           dp=DPConfig(mode="local", noise_multiplier=1.0, target_delta=1e-4)))
    history = [{"round": r, "release": r, "cohort": list(range(10))} for r in range(1, 4)]  # client 0: 3 times
    got = local.projected(history, 2, 12)
    assert got["max_participations"] == 3 + 10 and got["rounds_accounted"] == 13
    ledger = local.ledger()
    assert got["local_epsilon"] == pytest.approx(ledger.local_epsilon(13))


def test_resumed_ftrl_start_line_dry_run_and_end_compose_the_ledger(tmp_path, capsys):
    """The issue's reproduction: 8 rounds, ckpt_000008 deleted, resumed with --rounds=15: trees [8, 5, 5]."""
    out = tmp_path / "run"
    assert run_driver([*FTRL, "--rounds=8", "--checkpoint_every=5", f"--output_dir={out}"]) == 0
    capsys.readouterr()
    shutil.rmtree(out / "checkpoints" / "ckpt_000008")
    truth = _trees_epsilon([8, 5, 5])
    assert run_driver([*FTRL, "--rounds=15", "--checkpoint_every=5", "--dry_run", f"--output_dir={out}"]) == 0
    dry = capsys.readouterr().out
    assert _start_epsilon(dry) == pytest.approx(truth, rel=1e-3)
    assert "composed after the ledger's 8 release(s), resuming from round 5" in dry
    assert run_driver([*FTRL, "--rounds=15", "--checkpoint_every=5", f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert _start_epsilon(printed) == pytest.approx(truth, rel=1e-3)
    summary = json.load(open(out / "summary.json"))
    assert summary["epsilon"] == pytest.approx(truth, rel=1e-12) and summary["rounds_accounted"] == 18
    ledger = _lines(out / "ledger.jsonl")
    assert [e["tree"] for e in ledger] == [1] * 8 + [2] * 5 + [3] * 5


def test_resumed_calibrated_run_never_ends_above_its_target(tmp_path, capsys):
    """A calibrated DP-FTRL run resumed from an older checkpoint: the note says so and the target guard stops it."""
    out, target = tmp_path / "cal", 1.0
    args = [*[a for a in FTRL if not a.startswith("--noise_multiplier")], f"--target_epsilon={target}",
            "--rounds=8", "--checkpoint_every=5", f"--output_dir={out}"]
    assert run_driver(args) == 0
    first = json.load(open(out / "summary.json"))
    assert first["status"] == "completed" and first["epsilon"] <= target
    capsys.readouterr()
    # As if killed after round 8's ledger line, before its checkpoint and summary: rounds 6..8 re-run.
    shutil.rmtree(out / "checkpoints" / "ckpt_000008")
    (out / "summary.json").unlink()
    assert run_driver([*args, "--dry_run"]) == 0
    dry = capsys.readouterr().out
    assert "calibration: with the ledger's 8 release(s)" in dry and f"> --target_epsilon={target:g}" in dry
    assert run_driver(args) == 0
    printed = capsys.readouterr().out
    assert "stopped: privacy budget: round 6 would bring epsilon to" in printed
    assert f"> --target_epsilon={target:g}" in printed
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "stopped_at_budget" and summary["stop_guard"] == "target_epsilon"
    assert summary["epsilon"] <= target and summary["rounds_accounted"] == 8
    # Rerunning leaves the stopped run as it is: the target cannot change.
    assert run_driver(args) == 0
    assert "already complete" in capsys.readouterr().out
