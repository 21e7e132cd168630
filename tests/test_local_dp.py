"""Local (client-level) DP: noise at CLIENTS, clipping, accounting, end-to-end effect."""

import dataclasses
import json

import dp_accounting
import numpy as np
import pytest
import tensorflow_federated as tff
from dp_accounting.rdp import RdpAccountant

from dpfl_tff import training
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import accounting
from tests.aggregation import build_aggregator

DIM = 20_000
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _mean_of(dp, values, m=16.0, dim=DIM):
    p = build_aggregator(dp, m).create(tff.TensorType(np.float32, [dim]))
    out = p.next(p.initialize(), [np.asarray(v, np.float32) for v in values])
    return np.asarray(out.result), out.measurements


def test_noise_is_added_at_each_client_not_once_at_the_server(tff_context):
    # m clients send zeros. Local: mean of m independent N(0,(zC)^2) -> std zC/sqrt(m) = 0.25 zC.
    # Central (same z, C, m): one N(0,(zC)^2) on the sum / m -> std zC/m = 0.0625 zC.
    z, clip, m = 1.0, 2.0, 16
    local, _ = _mean_of(DPConfig(mode="local", noise_multiplier=z, clip_norm=clip), [np.zeros(DIM)] * m)
    central, _ = _mean_of(DPConfig(mode="central", noise_multiplier=z, clip_norm=clip), [np.zeros(DIM)] * m)
    # Unseeded: relative sd of a sample std over 20,000 normals is 0.5%; 6 sd per check,
    # P(|Z| > 6) = 2e-9, two checks: failure probability < 4e-9 per run.
    tol = 6 / np.sqrt(2 * DIM)
    assert local.std() == pytest.approx(z * clip / np.sqrt(m), rel=tol)
    assert central.std() == pytest.approx(z * clip / m, rel=tol)


def test_laplace_noise_at_clients_has_laplace_shape(tff_context):
    z, clip = 0.5, 1.0
    got, meas = _mean_of(DPConfig(mode="local", local_mechanism="laplace", noise_multiplier=z, clip_norm=clip),
                         [np.zeros(DIM)], m=1)
    b = z * clip
    assert meas["dp_query_metrics"]["laplace_scale"] == pytest.approx(b)
    # Unseeded; n = 20,000 draws of Laplace(0, b), 6 standard errors per check (P(|Z| > 6) = 2e-9; both
    # estimates have finite fourth moments, so the normal approximation holds): failure probability < 4e-9.
    # Variance 2b^2: relative sd of the estimate sqrt(20/n)/2 = 1.6%.
    assert got.var() == pytest.approx(2 * b**2, rel=6 * np.sqrt(20 / DIM) / 2)
    # Shape: E[X^2] / E[|X|]^2 is 2 for Laplace and pi/2 = 1.57 for a Gaussian; by the delta method the
    # estimate has sd 2/sqrt(n) = 0.014 (Var X^2 = 20b^4, Var|X| = b^2, Cov(X^2, |X|) = 4b^3).
    ratio = np.mean(got**2) / np.mean(np.abs(got)) ** 2
    assert ratio == pytest.approx(2.0, abs=6 * 2 / np.sqrt(DIM))


def test_clipping_and_only_data_free_measurements(tff_context):
    tiny = 1e-7  # noise std 1e-7 C: negligible
    a = np.array([3.0, 4.0, 0.0])  # L2 5, L1 7
    b = np.array([0.1, 0.0, 0.0])
    nan = np.array([np.nan, 1.0, 0.0])  # zeroed at the client, before clipping and noise
    got, meas = _mean_of(DPConfig(mode="local", noise_multiplier=tiny, clip_norm=1.0), [a, b, nan], dim=3)
    np.testing.assert_allclose(got, (a / 5 + b + 0) / 3, atol=1e-5)  # L2 clip, mean over the 3 clients
    # Nothing computed from a client's data (norm, clipped flag, non-finite flag) reaches the server: the
    # measurements are the query's settings and TFF's (empty) record-sum measurements.
    assert set(meas) == {"dp_query_metrics", "dp"} and len(meas["dp"]) == 0
    assert dict(meas["dp_query_metrics"]) == {"noise_std": pytest.approx(tiny)}
    got, meas = _mean_of(DPConfig(mode="local", local_mechanism="laplace", noise_multiplier=tiny, clip_norm=1.0),
                         [a, b], dim=3)
    np.testing.assert_allclose(got, (a / 7 + b) / 2, atol=1e-5)  # L1 clip
    assert set(meas["dp_query_metrics"]) == {"laplace_scale"}


def _cfg(tmp_path, name, **dp):
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=20, synthetic_examples_per_client=30, synthetic_input_dim=10,
                        synthetic_num_classes=4),
        train=TrainConfig(model="logistic", rounds=4, clients_per_round=10, client_sampling="uniform",
                          client_batch_size=10, client_learning_rate=0.5, server_optimizer="sgd",
                          server_learning_rate=1.0, eval_every=0, seed=1, sampling_seed=1),
        dp=DPConfig(**dp),
        output_dir=str(tmp_path / name),
    )


def test_tiny_local_noise_matches_no_dp_and_huge_noise_is_chance(tmp_path):
    # Seeded noise and cohorts (--noise_seed, --sampling_seed): deterministic, so the accuracy thresholds
    # below cannot flake.
    none = training.run(_cfg(tmp_path, "none", mode="none", noise_multiplier=0.0), log=lambda s: None)
    tiny = training.run(_cfg(tmp_path, "tiny", mode="local", noise_multiplier=1e-9, clip_norm=100.0, noise_seed=1),
                        log=lambda s: None)
    huge = training.run(_cfg(tmp_path, "huge", mode="local", noise_multiplier=1e3, clip_norm=1.0, noise_seed=2),
                        log=lambda s: None)
    acc_none = none.summary["final_test_accuracy"]
    assert acc_none > 0.6  # the task is learnable in 4 rounds without DP
    assert tiny.summary["final_test_accuracy"] == pytest.approx(acc_none, abs=1e-6)
    assert tiny.records[-1]["test_loss"] == pytest.approx(none.records[-1]["test_loss"], rel=1e-4)
    # 4 classes: chance is 0.25; the test set has 120 examples, so 0.45 is > 4 sd above chance.
    assert huge.summary["final_test_accuracy"] < 0.45
    rec = huge.records[-1]
    assert rec["noise_std"] == pytest.approx(1e3)


def test_local_ledger_matches_dp_accounting(tmp_path):
    n, m, z, delta = 20, 10, 3.0, 1e-4
    cfg = dataclasses.replace(
        _cfg(tmp_path, "x", mode="local", noise_multiplier=z, target_delta=delta), task=TaskConfig(num_clients=n)
    ).validate()
    ledger = accounting.make_ledger(cfg)
    fields = [ledger.commit(np.arange(m) + (r % 2) * m) for r in range(1, 5)]  # alternate halves
    assert [f["max_participations"] for f in fields] == [1, 1, 2, 2]

    def gaussian(p):  # one local release: Gaussian with multiplier z/2 (replace-one, sensitivity 2C)
        acc = RdpAccountant(neighboring_relation=REPLACE_ONE)
        return acc.compose(dp_accounting.GaussianDpEvent(z / 2), p).get_epsilon(delta)

    summed = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(
        dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(np.sqrt(m) * z / 2)), 4
    ).get_epsilon(delta)
    # ledger.jsonl lists the cohorts (the participation counts need them): the headline central view is the
    # sum of the m local noises without amplification by sampling, over the worst client's 2 participations.
    known = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(
        dp_accounting.GaussianDpEvent(np.sqrt(m) * z / 2), 2).get_epsilon(delta)
    last = fields[-1]
    assert last["local_epsilon"] == pytest.approx(gaussian(2), rel=1e-9)
    assert last["epsilon"] == pytest.approx(min(known, gaussian(2)), rel=1e-9)
    assert last["epsilon_analysis"] == ("sum_gaussian_cohorts_known" if known < gaussian(2) else "post_processing")
    # The amplified figure, for a reader who never sees the cohorts, is labelled beside it.
    assert last["epsilon_if_cohorts_secret"] == pytest.approx(min(summed, known, gaussian(2)), rel=1e-9)
    assert ledger.unamplified_reason.startswith("local_epsilon needs every client's participation count")

    poisson = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, client_sampling="poisson"))
    f = accounting.make_ledger(poisson).commit(np.arange(m))
    assert f["epsilon_analysis"] == "post_processing" and f["epsilon"] == f["local_epsilon"]

    laplace = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, local_mechanism="laplace"))
    f = accounting.make_ledger(laplace).planned(4, participations=3)
    assert f["local_epsilon_per_release"] == pytest.approx(2 / z)  # L1 sensitivity 2C, scale zC
    assert f["local_epsilon_pure"] == pytest.approx(3 * 2 / z)
    assert f["local_epsilon"] <= f["local_epsilon_pure"]


def test_driver_fields_for_local_mode(tmp_path):
    cfg = _cfg(tmp_path, "drv", mode="local", noise_multiplier=2.0, clip_norm=0.5)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=2, eval_every=1))
    training.run(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in open(tmp_path / "drv" / "metrics.jsonl")]
    for r in rows:
        assert {"noise_std", "local_epsilon", "epsilon", "epsilon_analysis", "max_participations",
                "neighboring_relation", "clients_this_round", "test_accuracy"} <= set(r)
        assert r["neighboring_relation"] == "replace_one"
        # Nothing computed from one client's data leaves it unnoised: no client statistic is recorded.
        assert not {"train_loss", "train_accuracy", "nonfinite_clients", "fraction_clipped",
                    "mean_norm_before_clipping"} & set(r)
    summary = json.load(open(tmp_path / "drv" / "summary.json"))
    assert summary["local_epsilon"] == rows[-1]["local_epsilon"] and summary["local_mechanism"] == "gaussian"
    assert summary["outputs_not_covered_by_epsilon"] == ["round_seconds", "accounting_seconds", "wall_seconds"]
    # Local DP needs every client's participations: its ledger records the cohorts.
    ledger = [json.loads(line) for line in open(tmp_path / "drv" / "ledger.jsonl")]
    assert [len(e["cohort"]) for e in ledger] == [10, 10] and summary["cohorts_logged"] is True
