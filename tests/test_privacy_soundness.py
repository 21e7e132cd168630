"""What a run releases is what its epsilon covers: secret cohorts, an intact ledger, classified outputs."""

import dataclasses
import hashlib
import json
import os
import shutil

import pytest

from dpfl_tff import folder_lock, round_record, training
from dpfl_tff.errors import LedgerError
from dpfl_tff.release_log import LedgerLog
from dpfl_tff.config import SEED_REDACTED, ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import coverage, truncation

# One xdist worker runs this module (`--dist loadgroup`): its module fixture is a finished run, set up once.
pytestmark = pytest.mark.xdist_group("privacy_soundness")


def _cfg(out, **kw) -> ExperimentConfig:
    train = dict(model="logistic", rounds=4, clients_per_round=10, client_batch_size=10, eval_every=2,
                 checkpoint_every=2)
    train.update(kw.pop("train", {}))
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=100, synthetic_examples_per_client=5, synthetic_input_dim=6),
        train=TrainConfig(**train),
        dp=kw.pop("dp", DPConfig(noise_multiplier=1.0, clip_norm=0.5)),
        output_dir=str(out), **kw,
    )


def _quiet(cfg, **kw):
    return training.run(cfg, log=lambda s: None, **kw)


def _ledger(out):
    return [json.loads(line) for line in open(os.path.join(out, "ledger.jsonl"))]


def _snapshot(folder):
    """sha256 and mtime of every file under `folder` but the folder lock (each run attempt names itself there)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == folder_lock.LOCK_FILE:
                continue
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-round central-DP run (checkpoints at rounds 2 and 4) with its cohorts logged."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _quiet(_cfg(out, log_cohorts=True))
    assert result.summary["status"] == "completed"
    return out


def test_cohorts_are_secret_by_default_and_reproducible_only_with_sampling_seed(tmp_path):
    def cohorts(name, **train):
        out = tmp_path / name
        _quiet(_cfg(out, log_cohorts=True, train=dict(rounds=2, **train)))
        return [e["cohort"] for e in _ledger(out)]

    # Same --seed, no --sampling_seed: fresh OS-entropy cohorts. Two independent Poisson(q=0.1) cohorts of 100
    # clients coincide with probability (0.1^2 + 0.9^2)^100 < 3e-9 per round, so both rounds do with < 1e-17.
    assert cohorts("a") != cohorts("b")
    seeded = cohorts("c", sampling_seed=9)
    assert seeded == cohorts("d", sampling_seed=9)
    hparams = json.load(open(tmp_path / "d" / "hparams.json"))
    assert hparams["train"]["sampling_seed"] == SEED_REDACTED  # the seed would reveal every cohort
    assert json.load(open(tmp_path / "d" / "summary.json"))["sampling_seeded"] is True
    assert json.load(open(tmp_path / "a" / "summary.json"))["sampling_seeded"] is False


def test_no_file_lists_the_cohorts_unless_asked(tmp_path):
    out = tmp_path / "run"
    _quiet(_cfg(out, train=dict(rounds=2)))
    ledger = _ledger(out)
    assert [e["round"] for e in ledger] == [1, 2] and not any("cohort" in e for e in ledger)
    for name in ("metrics.jsonl", "summary.json", "hparams.json"):
        assert "cohort\"" not in open(out / name).read()


@pytest.mark.parametrize(
    "damage",
    ["corrupt_line", "swapped_lines", "truncated", "torn_last_line", "deleted", "rewritten_shorter"],
)
def test_a_damaged_ledger_refuses_the_resume_and_changes_nothing(finished_run, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / "ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    if damage == "corrupt_line":
        lines[1] = lines[1].replace('"round": 2', '"round": 3')
    elif damage == "swapped_lines":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "truncated":
        lines = lines[:2]
    elif damage == "torn_last_line":
        lines[-1] = lines[-1][:20]
    elif damage == "rewritten_shorter":  # a valid chain of 3 lines: only the other files show what is missing
        lines = lines[:3]
    if damage == "deleted":
        path.unlink()
    else:
        path.write_text("".join(lines))
    before = _snapshot(out)
    more = _cfg(out, log_cohorts=True, train=dict(rounds=6))  # a resumable change: more rounds
    with pytest.raises(LedgerError) as e:
        _quiet(more)
    assert str(path) in str(e.value)
    assert _snapshot(out) == before  # nothing in the folder was written, not even hparams.json or summary.json


def test_the_driver_refuses_a_damaged_ledger_with_exit_2(finished_run, tmp_path, capsys):
    from absl import flags
    from absl.testing import flagsaver

    from experiments import run_federated

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(lines[:3]))
    argv = ["run_federated", "--task=synthetic", "--num_clients=100", "--synthetic_examples_per_client=5",
            "--synthetic_input_dim=6", "--model=logistic", "--rounds=4", "--clients_per_round=10",
            "--client_batch_size=10", "--eval_every=2", "--checkpoint_every=2", "--noise_multiplier=1.0",
            "--clip_norm=0.5", "--log_cohorts", f"--output_dir={out}"]
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        run_federated.main(argv[:1])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume: {out}/ledger.jsonl holds 3 release(s)")
    assert "it lacks release 4 (round 4)" in err[0] and "--overwrite" in err[0]


def test_ledger_chain_detects_edits_and_needs_cohorts_where_accounting_does(tmp_path):
    ledger = LedgerLog(str(tmp_path))
    ledger.append(1, [3, 5])
    ledger.append(2, [1])
    ledger.append(2, [4])  # round 2 re-run after a resume: its second execution
    again = LedgerLog(str(tmp_path))
    assert [(e["round"], e["execution"], e["cohort"]) for e in again.load(needs_cohorts=True)] == [
        (1, 1, [3, 5]), (2, 1, [1]), (2, 2, [4])]
    assert again.head == ledger.head and again.executions(2) == 2
    text = (tmp_path / "ledger.jsonl").read_text()
    (tmp_path / "ledger.jsonl").write_text(text.replace("[3, 5]", "[3, 6]"))
    with pytest.raises(LedgerError, match="line 1 is damaged"):
        LedgerLog(str(tmp_path)).load(needs_cohorts=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    LedgerLog(str(plain)).append(1)
    assert LedgerLog(str(plain)).load(needs_cohorts=False)[0]["round"] == 1
    with pytest.raises(LedgerError, match="line 1 has no cohort"):
        LedgerLog(str(plain)).load(needs_cohorts=True)


def test_a_finished_run_is_left_unchanged_and_more_rounds_continue(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    lines = []
    result = training.run(_cfg(out, log_cohorts=True), log=lines.append)
    assert result.already_complete and lines == [f"already complete: 4 rounds, epsilon "
                                                 f"{result.summary['epsilon']:.4g}; outputs in {out}"]
    assert _snapshot(out) == before
    longer = _quiet(_cfg(out, log_cohorts=True, train=dict(rounds=5)))
    assert not longer.already_complete and longer.summary["rounds"] == 5 and longer.summary["rounds_accounted"] == 5
    assert [e["round"] for e in _ledger(out)] == [1, 2, 3, 4, 5]


def test_a_calibrated_run_cannot_be_continued_past_its_rounds(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, dp=DPConfig(target_epsilon=8.0, clip_norm=0.5), train=dict(rounds=2))
    _quiet(cfg)
    with pytest.raises(ConfigError, match=r"--rounds=3: .*calibrated its noise to --target_epsilon=8.0 over 2 rounds"):
        _quiet(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=3)))


def test_every_released_number_is_classified(tmp_path):
    # Central DP, Poisson: the clients' metrics, the realised cohort size and timings are not covered.
    default = _quiet(_cfg(tmp_path / "default", train=dict(rounds=2)))
    assert default.summary["outputs_not_covered_by_epsilon"] == [
        "train_loss", "train_accuracy", "nonfinite_clients", "clients_this_round",
        "round_seconds", "accounting_seconds", "wall_seconds"]
    assert set(default.summary["outputs_not_covered_by_epsilon"]) <= set(default.records[-1]) | {"wall_seconds"}
    # --client_metrics=false: every released number is covered by epsilon, computed on the test set, or
    # a setting of the run.
    strict = _quiet(_cfg(tmp_path / "strict", client_metrics=False, train=dict(rounds=2)))
    assert strict.summary["outputs_not_covered_by_epsilon"] == []
    allowed = set(round_record.names(round_record.COVERED))  # what epsilon covers (or the test set gives)
    for row in map(json.loads, open(tmp_path / "strict" / "metrics.jsonl")):
        assert set(row) <= allowed, set(row) - allowed
    summary = json.load(open(tmp_path / "strict" / "summary.json"))
    assert "wall_seconds" not in summary and summary["client_metrics"] is False
    # Uniform sampling: the cohort size is always m, so it stays (and is covered).
    uniform = _cfg(tmp_path / "u", client_metrics=False, train=dict(client_sampling="uniform"))
    assert coverage.cohort_size_released(uniform) and coverage.not_covered(uniform) == []


def test_every_stated_delta_adds_the_samplers_term(finished_run):
    # privacy.truncation: the worst client may be in every round (central, Poisson, z=1: shift 1 std per round).
    cfg = _cfg(finished_run, log_cohorts=True)
    rows = [json.loads(line) for line in open(finished_run / "metrics.jsonl")]
    for row in rows:
        term = truncation.delta_sampler(row["round"] * truncation.gaussian_out_of_reach(1.0), cfg.target_delta)
        assert row["delta_sampler"] == pytest.approx(term, rel=1e-12) and 0 < term < 1e-29
        assert row["delta"] == cfg.target_delta + row["delta_sampler"]
    summary = json.load(open(finished_run / "summary.json"))
    assert (summary["delta"], summary["delta_sampler"]) == (rows[-1]["delta"], rows[-1]["delta_sampler"])
    assert summary["delta_accountant"] == cfg.target_delta
