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
from dpfl_tff.privacy import events
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
    assert got["epsilon"] == pytest.approx(events.epsilon_after(central.round_privacy(), 15, 1e-4, "rdp"))
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
    # The sweep's plan of that folder reads the same verified ledger.
    from dpfl_tff import sweep

    plan_cfg = ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=N, num_clients_known=True),
        train=TrainConfig(rounds=15, clients_per_round=M, client_sampling="shuffle", server_optimizer="sgd"),
        dp=DPConfig(mode="ftrl", noise_multiplier=Z, target_delta=DELTA), output_dir=str(out)).validate()
    planned = sweep.planned_epsilon(plan_cfg)
    assert planned["epsilon"] == pytest.approx(truth, rel=1e-12) and planned["releases_so_far"] == 8
    assert run_driver([*FTRL, "--rounds=15", "--checkpoint_every=5", f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert _start_epsilon(printed) == pytest.approx(truth, rel=1e-3)
    summary = json.load(open(out / "summary.json"))
    assert summary["epsilon"] == pytest.approx(truth, rel=1e-12) and summary["rounds_accounted"] == 18
    ledger = _lines(out / "ledger.jsonl")
    assert [e["tree"] for e in ledger] == [1] * 8 + [2] * 5 + [3] * 5


@pytest.mark.parametrize("mode", ["ftrl", "central"])
def test_resumed_calibrated_run_never_ends_above_its_target(tmp_path, capsys, mode):
    """A calibrated run resumed from an older checkpoint: the note says so and the target guard stops it."""
    out, target = tmp_path / "cal", 1.0
    args = [*[a for a in FTRL if not a.startswith("--noise_multiplier")], f"--target_epsilon={target}",
            "--rounds=8", "--checkpoint_every=5", f"--output_dir={out}"]
    if mode == "central":  # Poisson sampling: the re-run rounds are 3 more sampled releases
        args = [*[a for a in args if not a.startswith("--dp_mode")], "--dp_mode=central", "--client_sampling=poisson"]
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


# Item 3: the budget guard caps the epsilon the mode promises.

LOCAL = ["--dp_mode=local", "--task=synthetic", "--num_clients=20", "--synthetic_examples_per_client=5",
         "--synthetic_input_dim=4", "--model=logistic", "--clients_per_round=10", "--client_sampling=uniform",
         "--noise_multiplier=1", "--clip_norm=0.5", "--eval_every=0", "--target_delta=1e-3", "--noise_seed=1",
         "--sampling_seed=4", "--rounds=10"]


def _local_epsilon(participations: int) -> float:
    """One local release is GaussianDpEvent(z/2) (replace-one sensitivity 2C); composed over participations."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return acc.compose(dp_accounting.GaussianDpEvent(0.5), participations).get_epsilon(1e-3)


def test_local_max_epsilon_caps_local_epsilon_unless_the_central_view_is_chosen(tmp_path, capsys):
    budget = (_local_epsilon(2) + _local_epsilon(3)) / 2
    out = tmp_path / "local"
    # 10 rounds of 10 of 20 clients: some client takes part >= 5 times, so the guard must stop the run.
    assert run_driver([*LOCAL, f"--max_epsilon={budget}", f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "would bring local_epsilon to" in printed and f"> --max_epsilon={budget:g}" in printed
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "stopped_at_budget" and summary["stop_guard"] == "max_epsilon"
    assert summary["guarded_epsilon"] == "local_epsilon" and summary["max_participations"] == 2
    assert summary["local_epsilon"] == pytest.approx(_local_epsilon(2)) and summary["local_epsilon"] <= budget
    # The central view, when chosen, is what the guard caps: it runs longer, the central epsilon stays below.
    central = tmp_path / "central"
    assert run_driver([*LOCAL, f"--max_epsilon={budget}", "--max_epsilon_view=central",
                       f"--output_dir={central}"]) == 0
    capsys.readouterr()
    view = json.load(open(central / "summary.json"))
    assert view["guarded_epsilon"] == "epsilon" and view["epsilon"] <= budget
    assert view["rounds"] > summary["rounds"] and view["local_epsilon"] > budget


def test_local_guard_holds_after_a_resume(tmp_path, capsys):
    budget = (_local_epsilon(3) + _local_epsilon(4)) / 2
    out = tmp_path / "run"
    assert run_driver([*LOCAL, "--rounds=2", "--checkpoint_every=1", f"--output_dir={out}"]) == 0
    assert run_driver([*LOCAL, f"--max_epsilon={budget}", f"--output_dir={out}"]) == 0
    capsys.readouterr()
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "stopped_at_budget" and summary["resumed_from_round"] == 2
    assert summary["max_participations"] == 3 and summary["local_epsilon"] <= budget


def test_guard_without_dp_stops_before_the_first_round(tmp_path, capsys):
    out = tmp_path / "none"
    args = [a for a in LOCAL if not a.startswith(("--dp_mode", "--noise"))]
    assert run_driver([*args, "--dp_mode=none", "--max_epsilon=10", f"--output_dir={out}"]) == 0
    assert "stopped: privacy budget: round 1 would bring epsilon to inf > --max_epsilon=10" in capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "stopped_at_budget" and summary["rounds"] == 0


def test_calibrated_central_run_completes_and_ends_at_or_below_its_target(tmp_path, capsys):
    """Calibration's z is on the safe side: the --target_epsilon guard never cuts a fresh calibrated run short."""
    out = tmp_path / "central"
    args = [a for a in LOCAL if not a.startswith(("--dp_mode", "--noise_multiplier"))]
    assert run_driver([*args, "--dp_mode=central", "--target_epsilon=3", "--rounds=6", f"--output_dir={out}"]) == 0
    capsys.readouterr()
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "completed" and summary["rounds"] == 6 and summary["epsilon"] <= 3
    assert summary["stop_guard"] is None and summary["guarded_epsilon"] is None


def test_guard_flag_is_checked():
    from dpfl_tff.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--max_epsilon_view=local: must be one of guarantee, central$"):
        DPConfig(max_epsilon_view="local").validate()


# Item 2: cohorts in the folder and an epsilon that needs them secret never go together.

def _worst_participations(ledger_lines) -> int:
    counts = {}
    for e in ledger_lines:
        for c in e["cohort"]:
            counts[c] = counts.get(c, 0) + 1
    return max(counts.values())


def _gaussian_epsilon(sigma: float, times: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return acc.compose(dp_accounting.GaussianDpEvent(sigma), times).get_epsilon(delta)


def test_local_dp_lists_the_cohorts_so_its_central_view_is_not_amplified(tmp_path, capsys):
    out = tmp_path / "local"
    assert run_driver([*LOCAL, "--rounds=6", f"--output_dir={out}"]) == 0
    capsys.readouterr()
    summary = json.load(open(out / "summary.json"))
    ledger = _lines(out / "ledger.jsonl")
    p = _worst_participations(ledger)  # what a reader of the folder can count
    # The sum of m = 10 local Gaussian noises (std sqrt(10) z C) on replace-one sensitivity 2C, over the
    # worst client's p rounds, or the post-processing bound (local epsilon), whichever is smaller.
    expected = min(_gaussian_epsilon(10 ** 0.5 / 2, p, 1e-3), _local_epsilon(p))
    assert summary["cohorts_logged"] is True and summary["cohorts_in_folder"] is True
    assert summary["max_participations"] == p and summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["epsilon_amplified_by_sampling"] is False
    assert "ledger.jsonl" in summary["epsilon_not_amplified_because"]
    # The amplified figure is labelled beside it, never the headline.
    assert summary["epsilon_if_cohorts_secret"] <= summary["epsilon"]


def test_central_with_logged_cohorts_reports_the_unamplified_epsilon(tmp_path, capsys):
    args = [a for a in LOCAL if not a.startswith(("--dp_mode", "--client_sampling"))]
    args = [*args, "--dp_mode=central", "--client_sampling=poisson", "--rounds=4"]
    secret, listed = tmp_path / "secret", tmp_path / "listed"
    assert run_driver([*args, f"--output_dir={secret}"]) == 0
    assert run_driver([*args, "--log_cohorts", f"--output_dir={listed}"]) == 0
    capsys.readouterr()
    a, b = json.load(open(secret / "summary.json")), json.load(open(listed / "summary.json"))
    assert a["epsilon_amplified_by_sampling"] is True and a["epsilon_not_amplified_because"] is None
    assert a["cohorts_in_folder"] is False and "epsilon_if_cohorts_secret" not in a
    p = _worst_participations(_lines(listed / "ledger.jsonl"))
    # Poisson, cohorts public: the Gaussian release (z = 1 on sensitivity C) over the worst client's rounds.
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    expected = acc.compose(dp_accounting.GaussianDpEvent(1.0), p).get_epsilon(1e-3)
    assert b["epsilon"] == pytest.approx(expected, rel=1e-9) and b["max_participations"] == p
    assert b["epsilon_amplified_by_sampling"] is False and "--log_cohorts" not in b["epsilon_not_amplified_because"]
    assert b["epsilon_if_cohorts_secret"] == pytest.approx(a["epsilon"], rel=1e-9)  # same rounds, same sampling
    assert b["epsilon_analysis"] == "gaussian_cohorts_known"
