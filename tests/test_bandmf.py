"""Banded matrix-factorization noise (`--dp_mode=bandmf`): strategy, streamed noise, sampling, accounting, a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from dpfl_tff import config as C
from dpfl_tff import plan, training
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import banded_strategy as bs
from dpfl_tff.privacy import bandmf_query, registry
from dpfl_tff.sampling import BandedSampler

N, M = 40, 4


def _cfg(bands=2, rounds=6, tmp_path=None, **dp) -> C.ExperimentConfig:
    return C.ExperimentConfig(
        task=C.TaskConfig(task="digits", num_clients=N),
        train=C.TrainConfig(model="logistic", rounds=rounds, clients_per_round=M, client_sampling="banded",
                            eval_every=0, sampling_seed=5),
        dp=C.DPConfig(mode="bandmf", bands=bands, noise_multiplier=dp.pop("noise_multiplier", 1.5), clip_norm=0.5,
                      target_delta=1e-3, **dp),
        output_dir=str(tmp_path / "run") if tmp_path else "runs/x",
    ).validate()


def _hand_epsilon(q, z, compositions, delta, kind="rdp"):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), compositions)
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(event)
    return acc.get_epsilon(delta)


# --- the strategy (NumPy) --------------------------------------------------------------------------------------------

def test_the_inverse_and_the_loss_are_the_dense_matrices():
    rng = np.random.default_rng(0)
    c = np.concatenate([[1.0], rng.normal(size=2) * 0.3])
    T = 12
    dense = bs.toeplitz(c, T)
    np.testing.assert_allclose(bs.inverse_column(c, T), np.linalg.inv(dense)[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bs.toeplitz(bs.inverse_column(c, T), T), np.linalg.inv(dense), atol=1e-12)
    prefix = np.tril(np.ones((T, T)))
    assert bs.prefix_loss(c, T) == pytest.approx(np.linalg.norm(prefix @ np.linalg.inv(dense)) ** 2 / T, rel=1e-12)


@pytest.mark.parametrize("rounds,bands", [(10, 1), (10, 3), (100, 8), (300, 16)])
def test_the_optimized_strategy_has_unit_columns_and_beats_independent_noise(rounds, bands):
    s = bs.optimize_banded(rounds, bands)
    c = np.asarray(s.coefficients)
    assert len(c) == bands and c[0] > 0 and np.linalg.norm(c) == pytest.approx(1.0, abs=1e-12)
    # Every column of C (c shifted, cut at the bottom) has norm <= 1: the sensitivity the accounting uses.
    assert np.linalg.norm(bs.toeplitz(c, rounds), axis=0).max() <= 1 + 1e-12
    assert s.independent_loss == pytest.approx((rounds + 1) / 2)
    assert s.loss == pytest.approx(bs.prefix_loss(c, rounds), rel=1e-12)
    if bands == 1:
        assert s.coefficients == (1.0,) and s.loss == s.independent_loss
    else:
        assert s.loss < bs.prefix_loss(bs.sqrt_factorization(bands), rounds) <= s.independent_loss
    assert json.loads(json.dumps(s.as_json()))["first_column_of_C"][:bands] == list(s.coefficients)


# --- the noise (TensorFlow) ------------------------------------------------------------------------------------------

SHAPES = [(3,), (2, 2)]


def _noises(query, rounds, state=None, restart_at=None):
    """The noise each round adds (result of a zero sum), per tensor: arrays (rounds, *shape), in float64."""
    state = state or query.initial_global_state()
    zero = [tf.zeros(s, tf.float32) for s in SHAPES]
    out = [[] for _ in SHAPES]
    for t in range(rounds):
        if restart_at is not None and t == restart_at:
            state = bandmf_query.with_new_stream(_numpy(state), 2)
        noised, state, _ = query.get_noised_result(zero, state)
        for i, v in enumerate(noised):
            out[i].append(np.asarray(v, np.float64))
    return [np.stack(o) for o in out], state


def _numpy(state):
    return tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, state)


def _dense(coefficients, xi, rounds, std):
    inv = np.linalg.inv(bs.toeplitz(coefficients, rounds))
    return [std * np.tensordot(inv, x, axes=(1, 0)) for x in xi]


def test_the_streamed_noise_is_c_inverse_xi_and_a_restart_is_a_fresh_stream():
    """Seeded: the noise the query adds online equals z C (C^-1 xi) computed densely from the same xi, before
    and after a restart (which starts over from the strategy's first row with stream 2's xi)."""
    c, z, clip, T = (0.8, 0.5, 0.33), 1.3, 0.7, 7
    c = tuple(np.asarray(c) / np.linalg.norm(c))
    query = bandmf_query.BandedNoiseSumQuery(clip, z, c, [tf.TensorSpec(s, tf.float32) for s in SHAPES], noise_seed=9)
    got, _ = _noises(query, T)
    want = _dense(c, bandmf_query.stream_normals(9, 0, T, SHAPES), T, z * clip)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)  # float32 outputs of float64 noise
    assert np.abs(got[0][1:] - got[0][:-1]).max() > 1e-3  # not one value repeated
    restarted, _ = _noises(query, T, restart_at=4)
    fresh = _dense(c, bandmf_query.stream_normals(9, 2, T - 4, SHAPES), T - 4, z * clip)
    for g, w, first in zip(restarted, fresh, got):
        np.testing.assert_allclose(g[:4], first[:4], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g[4:], w, rtol=1e-5, atol=1e-6)


def test_the_noise_covariance_is_the_strategys():
    """Unseeded (the production sampler): over d = 60,000 coordinates, each round's noise variance is
    (zC)^2 sum_{k<=t} d_k^2 and the lag-1 covariance (zC)^2 sum_k d_k d_{k+1} (d: C^-1's first column).
    Tolerance 6 standard errors of a mean of d i.i.d. products (normal approximation, fourth moments of
    Gaussians): each of the 2T - 1 checks fails with probability < 2e-9, all < 3e-8 per run."""
    c = bs.optimize_banded(6, 3).coefficients
    T, d, std = 6, 60_000, 2.0
    query = bandmf_query.BandedNoiseSumQuery(1.0, std, c, [tf.TensorSpec((d,), tf.float32)])
    state = query.initial_global_state()
    rows = []
    for _ in range(T):
        noised, state, _ = query.get_noised_result([tf.zeros((d,), tf.float32)], state)
        rows.append(np.asarray(noised[0], np.float64) / std)
    x = np.stack(rows)
    cov = np.linalg.inv(bs.toeplitz(c, T)) @ np.linalg.inv(bs.toeplitz(c, T)).T  # Cov(C^-1 xi)
    for t in range(T):
        se = math.sqrt(2 * cov[t, t] ** 2 / d)
        assert abs(np.mean(x[t] ** 2) - cov[t, t]) <= 6 * se, t
        if t:
            se = math.sqrt((cov[t, t] * cov[t - 1, t - 1] + cov[t, t - 1] ** 2) / d)
            assert abs(np.mean(x[t] * x[t - 1]) - cov[t, t - 1]) <= 6 * se, t
    assert abs(cov[1, 0]) > 0.05  # the check above is of a real correlation


# --- sampling and accounting (pure Python) ---------------------------------------------------------------------------

def test_the_banded_sampler_samples_only_the_rounds_group_at_q():
    """Each client is sampled only in rounds of its group ((r - 1) mod B); over R rounds the cohort sizes sum to
    a Binomial-like total of mean R m (6 standard deviations: failure probability < 2e-9)."""
    n, m, b, rounds = 300, 12, 5, 400
    sampler = BandedSampler("banded", n, m, sampling_seed=None, bands=b)
    total = 0
    for r in range(1, rounds + 1):
        cohort = sampler.cohort(r)
        assert set(sampler.groups[cohort].tolist()) <= {(r - 1) % b}
        assert len(set(cohort.tolist())) == len(cohort)
        total += len(cohort)
    q = m * b / n
    sizes = np.bincount(sampler.groups, minlength=b)
    mean = sum(sizes[(r - 1) % b] for r in range(1, rounds + 1)) * q
    assert abs(total - mean) <= 6 * math.sqrt(mean * (1 - q))
    with pytest.raises(ValueError, match=r"--bands=30: q = clients_per_round \* bands / N = 1\.2 must be <= 1"):
        BandedSampler("banded", n, m, bands=30)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_planned_epsilon_is_the_amplified_bandmf_event_by_hand(accountant):
    cfg = plan.check(_cfg(bands=4, rounds=10, accountant=accountant))
    planned = registry.mechanism_for(cfg).projected([], 0, 10)
    assert planned["participations_accounted"] == 3  # ceil(10 / 4)
    want = _hand_epsilon(M * 4 / N, 1.5, 3, 1e-3, accountant)
    assert planned["epsilon"] == pytest.approx(want, rel=1e-6)


def test_one_band_is_dp_fedavg_with_poisson_sampling():
    banded = plan.check(_cfg(bands=1, rounds=10))
    central = plan.check(dataclasses.replace(banded, train=dataclasses.replace(banded.train, client_sampling="poisson"),
                                             dp=dataclasses.replace(banded.dp, mode="central")))
    a = registry.mechanism_for(banded).projected([], 0, 10)["epsilon"]
    b = registry.mechanism_for(central).projected([], 0, 10)["epsilon"]
    assert a == pytest.approx(b, rel=1e-12)


def test_a_resume_opens_a_new_stream_and_the_streams_compose():
    """6 rounds in stream 1, then a resumed process runs 3 more: ceil(6/4) + ceil(3/4) = 3 participations."""
    cfg = plan.check(_cfg(bands=4, rounds=9))
    mechanism = registry.mechanism_for(cfg)
    first, entries = mechanism.ledger(), []
    for r in range(1, 7):
        fields = first.begin_round(r)
        first.commit(None)
        entries.append({**fields, "round": r, "release": r, "execution": 1})
    assert [e["stream"] for e in entries] == [1] * 6 and [e["stream_round"] for e in entries] == list(range(1, 7))
    assert mechanism.projected(entries, 6, 9)["participations_accounted"] == 3
    resumed = mechanism.ledger()
    for entry in entries:
        resumed.replay_entry(entry)
    assert resumed.begin_round(7) == {"stream": 2, "stream_round": 1}
    preview = resumed.preview(None)
    out = resumed.commit(None)
    for r in (8, 9):
        assert resumed.begin_round(r)["stream_round"] == r - 6
        out = resumed.commit(None)
    assert out["participations_accounted"] == 3 and out["noise_streams"] == 2
    assert out["epsilon"] == pytest.approx(_hand_epsilon(M * 4 / N, 1.5, 3, 1e-3), rel=1e-9)
    assert preview == pytest.approx(_hand_epsilon(M * 4 / N, 1.5, 3, 1e-3), rel=1e-9)  # 2 + 1 already
    bad = dict(entries[3], stream_round=9)
    with pytest.raises(Exception, match="does not follow"):
        fresh = mechanism.ledger()
        for entry in [*entries[:3], bad]:
            fresh.replay_entry(entry)


def test_calibration_meets_the_target_with_the_bandmf_event():
    cfg = _cfg(bands=2, rounds=8, target_epsilon=3.0)
    calibrated, _ = plan.calibrated(plan.check(cfg))
    z = calibrated.dp.noise_multiplier
    assert _hand_epsilon(M * 2 / N, z, 4, 1e-3) <= 3.0 < _hand_epsilon(M * 2 / N, z * 0.99, 4, 1e-3)


@pytest.mark.parametrize("change,message", [
    (lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, client_sampling="poisson")),
     "--client_sampling=poisson with --dp_mode=bandmf: banded MF's analysis needs --client_sampling=banded"),
    (lambda c: dataclasses.replace(c, dp=dataclasses.replace(c.dp, bands=11),
                                   train=dataclasses.replace(c.train, rounds=12)),
     r"--bands=11: q = clients_per_round \* bands / N = 4 \* 11 / 40 must be <= 1"),
    (lambda c: dataclasses.replace(c, dp=dataclasses.replace(c.dp, bands=7)), "--bands=7: must be <= --rounds=6"),
    (lambda c: dataclasses.replace(c, log_cohorts=True), "--log_cohorts with --dp_mode=bandmf: not supported"),
    (lambda c: dataclasses.replace(c, dp=dataclasses.replace(c.dp, mode="central")),
     "--client_sampling=banded with --dp_mode=central: banded sampling is banded MF's"),
])
def test_settings_banded_mf_cannot_account_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        plan.check(change(_cfg()))


# --- a run (TFF) -----------------------------------------------------------------------------------------------------

def test_a_run_and_its_resume_write_the_strategy_and_compose_their_streams(tff_context, tmp_path):
    cfg = plan.check(_cfg(bands=2, rounds=5, tmp_path=tmp_path))
    result = training.run(cfg, log=lambda s: None)
    out = cfg.output_dir
    strategy = json.load(open(os.path.join(out, "strategy.json")))
    assert strategy["bands"] == 2 and np.linalg.norm(strategy["coefficients"]) == pytest.approx(1.0)
    assert len(strategy["first_column_of_C"]) == 5 and strategy["sampling_probability"] == M * 2 / N
    assert result.summary["participations_accounted"] == 3 and result.summary["bands"] == 2
    assert result.summary["epsilon"] == pytest.approx(_hand_epsilon(0.2, 1.5, 3, 1e-3), rel=1e-9)
    resumed = training.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=7)),
                           log=lambda s: None)
    lines = [json.loads(line) for line in open(os.path.join(out, "ledger.jsonl"))]
    assert [(e["stream"], e["stream_round"]) for e in lines] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1), (2, 2)]
    assert resumed.summary["participations_accounted"] == 4 and resumed.summary["noise_streams"] == 2
    assert resumed.summary["epsilon"] == pytest.approx(_hand_epsilon(0.2, 1.5, 4, 1e-3), rel=1e-9)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["round"] for m in metrics] == list(range(1, 8))
    assert [(m["stream"], m["noise_streams"]) for m in metrics] == [(1, 1)] * 5 + [(2, 2)] * 2
