"""Private hyperparameter selection (dpfl_tff.selection, experiments.sweep --select): accounting, K's law, resume."""

import dataclasses
import json
import math
import signal

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from dpfl_tff import selection as S
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import events
from experiments import sweep as sweep_app
from tests.conftest import run_app

BASE = ExperimentConfig(task=TaskConfig(task="digits", num_clients=700),
                        train=TrainConfig(clients_per_round=70, rounds=100, client_sampling="poisson"),
                        dp=DPConfig(noise_multiplier=1.0), output_dir="/tmp/sel")
DELTA = BASE.target_delta


def _by_hand(z: float, sel: S.SelectionConfig, mean: float, shape: float, cfg=BASE) -> float:
    """The procedure's epsilon built directly from dp-accounting's events (no dpfl_tff code)."""
    q = cfg.train.clients_per_round / cfg.task.num_clients
    training = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), cfg.train.rounds)
    score = dp_accounting.GaussianDpEvent(sel.score_noise_multiplier)
    if sel.score_sampling_rate < 1:
        score = dp_accounting.PoissonSampledDpEvent(sel.score_sampling_rate, score)
    event = dp_accounting.dp_event.RepeatAndSelectDpEvent(dp_accounting.ComposedDpEvent([training, score]), mean,
                                                          shape)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(cfg.target_delta)


def _candidate(z: float, sel: S.SelectionConfig) -> S.Candidate:
    cfg = dataclasses.replace(BASE, dp=dataclasses.replace(BASE.dp, noise_multiplier=z))
    return S.candidate_for(f"noise_multiplier={z:g}", cfg, sel)


@pytest.mark.parametrize("repetitions,mean,shape", [
    ("negative_binomial", 4.0, 1.0), ("negative_binomial", 10.0, 0.0), ("negative_binomial", 3.0, 0.5),
    ("poisson", 5.0, 1.0),
    ("negative_binomial", 1.0, 1.0), ("poisson", 1.0, 1.0),  # limit cases: a mean of 1
])
def test_procedure_epsilon_is_dp_accountings_repeat_and_select(repetitions, mean, shape):
    sel = S.SelectionConfig("private", repetitions, mean, shape, score_noise_multiplier=8.0, score_sampling_rate=0.5)
    law = S.count_distribution(sel)
    # The law sampled is accounted at its exact mean, never below the mean asked for.
    assert law.mean >= mean and law.mean == pytest.approx(mean, rel=1e-8)
    one = _candidate(1.0, sel)  # one candidate setting (the limit case of a grid of one)
    got = S.procedure_privacy([one], sel, DELTA)
    want = _by_hand(1.0, sel, law.mean, law.shape)
    assert got["procedure_epsilon"] == pytest.approx(want, rel=1e-12)
    # Selection never reports less than one run with its score (K >= 1 runs happen with mean 1: K = 1).
    assert got["procedure_epsilon"] >= got["per_run_epsilon_with_score"] > got["per_run_epsilon"]
    if repetitions == "negative_binomial" and mean == 1.0:
        assert law.gamma == 1.0 and law.sample(np.random.default_rng(0)) == 1


def test_a_grid_is_bounded_by_its_dominant_setting_and_composition_is_reported():
    sel = S.SelectionConfig("private")
    cands = [_candidate(z, sel) for z in (2.0, 0.8, 1.0)]
    got = S.procedure_privacy(cands, sel, DELTA, trained=[cands[0], cands[2], cands[2]])
    assert got["dominant_setting"] == "noise_multiplier=0.8"  # the least noise: the largest RDP at every order
    assert got["procedure_epsilon"] == pytest.approx(_by_hand(0.8, sel, 4.0, 1.0), rel=1e-12)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([cands[0].event, cands[2].event, cands[2].event]))
    assert got["plain_composition_epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    assert got["runs_composed"] == 3


def test_without_a_dominant_setting_the_pointwise_largest_curve_is_repeated():
    """A Gaussian and a Laplace release cross (Laplace's RDP is at most its epsilon): neither dominates."""
    sel = S.SelectionConfig("private", "poisson", 3.0)
    score = events.score_release(sel.score_noise_multiplier, 1.0, events.ADD_OR_REMOVE_ONE)
    a = S.Candidate("a", dp_accounting.GaussianDpEvent(1.0), score, events.ADD_OR_REMOVE_ONE, 0.0)
    b = S.Candidate("b", dp_accounting.LaplaceDpEvent(0.5), score, events.ADD_OR_REMOVE_ONE, 0.0)
    got = S.procedure_privacy([a, b], sel, 1e-5)
    assert got["dominant_setting"] is None
    orders = rdp_lib.DEFAULT_RDP_ORDERS
    curves = []
    for c in (a, b):
        acc = dp_accounting.rdp.RdpAccountant(orders)
        acc.compose(c.event)
        curves.append(acc._rdp)
    rdp = rdp_lib._compute_rdp_repeat_and_select(orders, np.maximum(*curves), 3.0, math.inf)
    assert got["procedure_epsilon"] == pytest.approx(rdp_lib.compute_epsilon(orders, rdp, 1e-5)[0], rel=1e-12)
    for c in (a, b):  # at least each setting's own procedure
        assert got["procedure_epsilon"] >= S.procedure_privacy([c], sel, 1e-5)["procedure_epsilon"] - 1e-12


def test_refused_settings_name_the_flag():
    sel = S.SelectionConfig("private")
    with pytest.raises(ConfigError, match="no DP guarantee"):
        S.candidate_for("dp_mode=none", dataclasses.replace(BASE, dp=DPConfig(mode="none", noise_multiplier=0.0)),
                        sel)
    fixed = dataclasses.replace(BASE, train=dataclasses.replace(BASE.train, client_sampling="uniform"))
    with pytest.raises(ConfigError, match=r"--score_sampling_rate=0.5: must be 1 for runs accounted under replace-one"):
        S.candidate_for("", fixed, dataclasses.replace(sel, score_sampling_rate=0.5))
    for bad, message in ((dict(select="best"), "--select=best: must be one of plain, private, public"),
                         (dict(repetitions_mean=0.5), r"--repetitions_mean=0.5: must be in \[1, 10000\]"),
                         (dict(repetitions_shape=-1.0), r"--repetitions_shape=-1.0: must be in \[0, 1000\]"),
                         (dict(score_noise_multiplier=0.0), "--score_noise_multiplier=0.0: must be > 0"),
                         (dict(score_sampling_rate=1.5), r"--score_sampling_rate=1.5: must be in \(0, 1\]")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(sel, **bad).validate()


# --- K's law ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repetitions,mean,shape", [
    ("negative_binomial", 4.0, 1.0), ("negative_binomial", 4.0, 0.0), ("negative_binomial", 6.0, 0.5),
    ("negative_binomial", 3.0, 3.0), ("poisson", 3.0, 1.0)])
def test_repetition_count_law_and_its_samples(repetitions, mean, shape):
    law = S.count_distribution(S.SelectionConfig("private", repetitions, mean, shape))
    pmf = law.pmf(4000)
    assert pmf.sum() == pytest.approx(1.0, abs=1e-9)
    assert (np.arange(pmf.size) * pmf).sum() == pytest.approx(law.mean, rel=1e-6)
    k = np.arange(1, 50)
    if repetitions == "negative_binomial":
        assert pmf[0] == 0.0
        # dp-accounting's own mean of this gamma and shape (an independent formula)
        assert law.mean == pytest.approx(rdp_lib._truncated_negative_binomial_mean(law.gamma, shape), rel=1e-12)
        g = law.gamma
        if shape == 1.0:  # geometric: g (1 - g)^(k - 1)
            np.testing.assert_allclose(pmf[1:50], g * (1 - g) ** (k - 1), rtol=1e-10)
        if shape == 0.0:  # logarithmic: (1 - g)^k / (k ln(1/g))
            np.testing.assert_allclose(pmf[1:50], (1 - g) ** k / (k * math.log(1 / g)), rtol=1e-10)
    # Samples against the law: a chi-square test over cells of expected count >= 20 (the tail lumped). Its
    # false-failure probability is 1e-7 (the chi-square approximation is good at these counts), below 1e-6.
    n = 20000
    rng = np.random.default_rng(12345)
    draws = np.array([law.sample(rng) for _ in range(n)])
    expected = n * pmf
    cells = int(np.nonzero(expected >= 20)[0].max()) + 1
    observed = np.bincount(np.minimum(draws, cells), minlength=cells + 1)[: cells + 1].astype(float)
    exp_cells = np.append(expected[:cells], n - expected[:cells].sum())
    keep = exp_cells > 0
    chi2 = float(np.sum((observed[keep] - exp_cells[keep]) ** 2 / exp_cells[keep]))
    assert chi2 < stats.chi2.isf(1e-7, int(keep.sum()) - 1), chi2


# --- the state file --------------------------------------------------------------------------------------------------

def test_draws_are_written_once_and_read_back(tmp_path):
    sel = S.SelectionConfig("private", repetitions_mean=5.0)
    settings = ["noise_multiplier=1", "noise_multiplier=2"]
    state, drawn = S.load_or_draw(str(tmp_path), settings, sel, 7, 100, np.random.default_rng(1))
    assert drawn and state["count"] == len(state["candidates"]) >= 1
    assert [c["seed"] for c in state["candidates"]] == list(range(7, 7 + state["count"]))
    again, drawn = S.load_or_draw(str(tmp_path), settings, sel, 7, 100, np.random.default_rng(2))
    assert not drawn and again == state
    with pytest.raises(ConfigError, match="holds the draws of another grid"):
        S.load_or_draw(str(tmp_path), settings, dataclasses.replace(sel, repetitions_mean=6.0), 7, 100,
                       np.random.default_rng(3))
    (tmp_path / S.STATE_FILE).write_text("{")
    with pytest.raises(ConfigError, match="is damaged"):
        S.load_or_draw(str(tmp_path), settings, sel, 7, 100, np.random.default_rng(3))


def test_the_best_noisy_score_is_selected():
    state = {"count": 3, "candidates": [{"index": i, "score": s} for i, s in enumerate((0.5, 0.7, 0.7))]}
    assert S.selected(state)["index"] == 1  # the first of ties
    state["candidates"][0]["score"] = None
    assert S.selected(state) is None
    assert S.selected({"count": 0, "candidates": []}) is None


# --- the driver: a tiny private sweep, killed and resumed ------------------------------------------------------------

TINY = ["--task=digits", "--num_clients=10", "--clients_per_round=10", "--rounds=2", "--eval_every=0",
        "--checkpoint_every=1", "--model=logistic", "--client_max_examples=20"]


def test_private_sweep_killed_and_resumed_keeps_its_draws(tmp_path, monkeypatch, capfd, own_signals):
    out = tmp_path / "sel"
    args = [*TINY, "--grid=noise_multiplier=1,2", "--select=private", "--repetitions_mean=2",
            "--score_noise_multiplier=2", "--noise_seed=5", f"--output_dir={out}"]
    lines: list[str] = []

    def log(line):  # Ctrl-C during round 1 of the first candidate
        lines.append(line)
        if line.startswith("round 1/2") and sum(x.startswith("[1/") for x in lines) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(sweep_app, "_log", log)
    assert run_app(sweep_app, "sweep", args) == 130
    assert any(x.startswith("privacy: the whole sweep may spend epsilon ") for x in lines)
    state = json.loads((out / S.STATE_FILE).read_text())
    assert state["count"] >= 1 and all(c["score"] is None for c in state["candidates"])
    drawn = [(c["setting"], c["seed"]) for c in state["candidates"]]

    lines.clear()
    assert run_app(sweep_app, "sweep", args) == 0
    assert any("drawn earlier" in x for x in lines)
    after = json.loads((out / S.STATE_FILE).read_text())
    assert after["count"] == state["count"] and [(c["setting"], c["seed"]) for c in after["candidates"]] == drawn
    assert all(isinstance(c["score"], float) for c in after["candidates"])
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    best = S.selected(after)
    assert summary["selected_run"] == f"{best['setting']},seed={best['seed']}"
    assert summary["procedure_epsilon"] >= summary["per_run_epsilon_with_score"] > 0
    assert summary["runs_composed"] == after["count"] and 0 < summary["delta"] < 1
    md = (out / "results.md").read_text()
    assert "## Private selection (--select=private)" in md and f"Released: run `{summary['selected_run']}`" in md
    # A third run trains and scores nothing again.
    lines.clear()
    assert run_app(sweep_app, "sweep", args) == 0
    assert json.loads((out / S.STATE_FILE).read_text()) == after


def test_compute_epsilon_computes_the_procedure(capsys):
    from experiments import compute_epsilon

    args = ["--num_clients=700", "--clients_per_round=70", "--rounds=100", "--noise_multiplier=1",
            "--select=private", "--repetitions=poisson", "--repetitions_mean=3", "--score_noise_multiplier=8"]
    assert run_app(compute_epsilon, "compute_epsilon", args) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    sel = S.SelectionConfig("private", "poisson", 3.0, score_noise_multiplier=8.0)
    assert result["procedure_epsilon"] == pytest.approx(_by_hand(1.0, sel, 3.0, math.inf), rel=1e-12)
    assert result["per_run_epsilon"] < result["procedure_epsilon"] < result["plain_composition_epsilon"]
    assert run_app(compute_epsilon, "compute_epsilon", [*args, "--repetitions_mean=0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --repetitions_mean=0.0: must be in [1, 10000]\n"


def test_results_md_labels_plain_selection_and_an_empty_procedure():
    from dpfl_tff import sweep_results

    assert "selection: not covered by epsilon" in sweep_results.markdown([], 0)
    sel = S.SelectionConfig("private", "poisson", 1.0)
    summary = {**S.procedure_privacy([_candidate(1.0, sel)], sel, DELTA), "count": 0, "scored": 0,
               "selected_run": None}
    md = S.markdown(summary)
    assert "K = 0 was drawn: nothing was trained or released." in md and "procedure_epsilon " in md


def test_public_selection_is_covered_by_the_composition_of_all_runs(tmp_path):
    out = tmp_path / "pub"
    assert run_app(sweep_app, "sweep", [*TINY, "--grid=noise_multiplier=1,2", "--select=public",
                                        "--eval_every=2", f"--output_dir={out}"]) == 0
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    accs = {name: json.loads((out / f"{name},seed=0" / "summary.json").read_text())["final_test_accuracy"]
            for name in ("noise_multiplier=1", "noise_multiplier=2")}
    assert summary["selected_setting"] == max(accs, key=lambda k: (accs[k], k == "noise_multiplier=1"))
    q_all = dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0))
    half = dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(2.0))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(q_all, 2),
                                               dp_accounting.SelfComposedDpEvent(half, 2)]))
    assert summary["composition_epsilon"] == pytest.approx(acc.get_epsilon(10 ** -1.1), rel=1e-9)
    assert "## Public selection (--select=public)" in (out / "results.md").read_text()


def test_private_dry_run_writes_nothing_and_bad_selection_flags_exit_2(tmp_path, capsys):
    out = tmp_path / "dry"
    base = [*TINY, "--grid=noise_multiplier=1,2", f"--output_dir={out}"]
    assert run_app(sweep_app, "sweep", [*base, "--select=private", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "privacy: the whole sweep may spend epsilon " in printed and "this dry run's draw is not kept" in printed
    assert not out.exists()
    for extra, message in ((["--select=private", "--seeds=2"], "error: --seeds=2: with --select=private"),
                           (["--select=best"], "error: --select=best: must be one of plain, private, public"),
                           (["--select=private", "--grid=dp_mode=central,none"],
                            "error: --select=private: setting dp_mode=none has no DP guarantee")):
        assert run_app(sweep_app, "sweep", [*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()
