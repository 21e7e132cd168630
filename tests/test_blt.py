"""--dp_mode=blt (BLT-DP-FTRL, cyclic participation): strategy, sensitivity, streamed noise, accounting, runs."""

import itertools
import json
import math
import os
import shutil

import dp_accounting
import numpy as np
import pytest

from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.errors import LedgerError
from dpfl_tff.privacy import accounting, blt_strategy
from dpfl_tff.privacy.blt import BLTLedger
from dpfl_tff.sampling import CyclicSampler, sampler_for
from tests.conftest import run_driver
from tests.test_compute_epsilon import _run as compute_epsilon

N, M, Z, DELTA = 30, 10, 1.3, 1e-3  # b = 3 cyclic groups
ARGS = [
    "--dp_mode=blt", "--task=synthetic", f"--num_clients={N}", "--synthetic_examples_per_client=10",
    "--synthetic_input_dim=8", "--model=logistic", f"--clients_per_round={M}", f"--noise_multiplier={Z}",
    "--clip_norm=0.5", "--server_optimizer=sgd", "--eval_every=0", f"--target_delta={DELTA}",
    "--noise_seed=5", "--sampling_seed=2", "--client_metrics=false", "--blt_buffers=2",
]


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _dense(coefs):
    n = len(coefs)
    return np.array([[coefs[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])


def _brute_sensitivity_squared(c_matrix, b, k):
    """max ||C u||^2 over every participation pattern u in {0,1}^n with <= k ones, any two >= b apart.

    For a C with non-negative entries (C^T C >= 0) the worst unit-norm updates are all aligned, so this is
    the L2 sensitivity squared over vector-valued updates too.
    """
    n, best = c_matrix.shape[1], 0.0
    for size in range(1, k + 1):
        for idx in itertools.combinations(range(n), size):
            if any(j - i < b for i, j in zip(idx, idx[1:])):
                continue
            best = max(best, float(np.sum(c_matrix[:, list(idx)].sum(axis=1) ** 2)))
    return best


# (1) The strategy: coefficients, inverse, recurrence, sensitivity.

def test_blt_coefficients_follow_the_buffer_recurrence_and_the_inverse_is_exact():
    theta, omega = [0.93, 0.6, 0.2], [0.25, 0.15, 0.1]
    n = 12
    c = blt_strategy.toeplitz_coefs(theta, omega, n)
    # Multiplying by C with the buffers (y_t = x_t + sum_i omega_i s_i, s_i <- theta_i s_i + x_t) on an impulse.
    s, rec = np.zeros(3), []
    for t in range(n):
        x = 1.0 if t == 0 else 0.0
        rec.append(x + omega @ np.asarray(s) if t else x)
        s = np.asarray(theta) * s + x
    assert c[0] == 1.0 and c[1] == pytest.approx(sum(omega), rel=1e-15)
    np.testing.assert_allclose(c, rec, rtol=1e-14)
    np.testing.assert_allclose(c[1:], [sum(w * t**j for w, t in zip(omega, theta)) for j in range(n - 1)], rtol=1e-14)
    inverse = np.linalg.inv(_dense(c))
    np.testing.assert_allclose(blt_strategy.inverse_coefs(theta, omega, n), inverse[:, 0], rtol=1e-12, atol=1e-15)
    xi = np.random.default_rng(0).normal(size=(n, 4))
    np.testing.assert_allclose(blt_strategy.stream_inverse(theta, omega, xi), inverse @ xi, rtol=1e-11, atol=1e-13)
    # The loss: sens^2 times the mean over t of ||(A C^-1)[t]||^2, A the prefix-sum workload.
    a = np.tril(np.ones((n, n)))
    err = np.mean(np.sum((a @ inverse) ** 2, axis=1))
    sens2 = _brute_sensitivity_squared(_dense(c), 4, 3)
    assert blt_strategy.loss(theta, omega, n, 4, 3) == pytest.approx(sens2 * err, rel=1e-12)


@pytest.mark.parametrize("n, b", [(9, 1), (9, 2), (10, 3), (10, 4), (8, 8)])
def test_minsep_sensitivity_equals_brute_force_over_every_participation_pattern(n, b):
    k = blt_strategy.max_participations(n, b)
    strategy = blt_strategy.optimize(n, b, k)
    dense = _dense(strategy.coefs())
    assert np.all(np.diff(strategy.coefs()) <= 0) and np.all(strategy.coefs() > 0)
    for kk in range(1, k + 1):
        exact = _brute_sensitivity_squared(dense, b, kk)
        assert blt_strategy.minsep_sensitivity_squared(strategy.coefs(), b, kk) == pytest.approx(exact, rel=1e-12)
    assert strategy.sensitivity(n) ** 2 == pytest.approx(_brute_sensitivity_squared(dense, b, k), rel=1e-12)
    # The prefix of t rounds: the t x t block, ceil(t / b) participations.
    for t in range(1, n + 1):
        block = _brute_sensitivity_squared(dense[:t, :t], b, blt_strategy.max_participations(t, b))
        assert strategy.sensitivity(t) ** 2 == pytest.approx(block, rel=1e-12)
    # Coefficients that are not non-increasing: an upper bound, never below the truth.
    wavy = np.array([1.0, 0.2, 0.7, -0.5, 0.4, 0.0, 0.3, 0.1])[:n]
    wavy = np.pad(wavy, (0, n - wavy.size))
    w = _dense(wavy)
    true = max(float(np.linalg.norm(w[:, list(idx)] @ np.asarray(signs)) ** 2)
               for size in range(1, k + 1) for idx in itertools.combinations(range(n), size)
               if all(j - i >= b for i, j in zip(idx, idx[1:])) for signs in itertools.product((1, -1), repeat=size))
    assert blt_strategy.minsep_sensitivity_squared(wavy, b, k) >= true * (1 - 1e-12)


def test_optimizer_beats_uncorrelated_noise_and_is_cached():
    a = blt_strategy.optimize(200, 10, 20)
    assert blt_strategy.optimize(200, 10, 20) is a  # cached by its inputs
    assert 1 <= a.buffers <= blt_strategy.MAX_BUFFERS and a.loss < a.identity_loss / 2
    assert a.loss == pytest.approx(blt_strategy.loss(a.theta, a.omega, 200, 10, 20), rel=1e-12)
    three = blt_strategy.optimize(200, 10, 20, buffers=3)
    assert three.buffers == 3 and all(0 < t < 1 for t in three.theta) and all(w > 0 for w in three.omega)
    assert sum(three.omega) < 1  # c_1 < c_0: non-increasing coefficients, the exact min-sep sensitivity
    # Buffers are added warm-started from the previous solution: more buffers never lose (up to L-BFGS-B's tolerance).
    assert three.loss <= blt_strategy.optimize(200, 10, 20, buffers=2).loss * (1 + 1e-6)
    assert blt_strategy.optimize(200, 10, 20, buffers=2).loss <= blt_strategy.optimize(200, 10, 20, 1).loss * (1 + 1e-6)


# (2) The streamed noise in TensorFlow: exactly C^-1 xi, restarted with a new stream.

def test_streamed_noise_equals_dense_inverse_of_the_seeded_xi_and_restarts():
    import tensorflow as tf

    from dpfl_tff.privacy import blt_query, sampler

    theta, omega = (0.9, 0.4), (0.3, 0.2)
    specs = [tf.TensorSpec((5,), tf.float32), tf.TensorSpec((2, 3), tf.float32)]
    clip, z, m, n = 0.5, 1.7, 4.0, 9
    q = blt_query.blt_query(clip, z, m, theta, omega, specs, [11, 12])
    state = q.initial_global_state()
    zeros = [tf.zeros(s.shape, tf.float32) for s in specs]
    outputs, restart_at = [], 6
    for t in range(n):
        if t == restart_at:
            state = blt_query.with_new_stream(tf.nest.map_structure(np.asarray, state), [21, 22])
        result, state, _ = q.get_noised_result(zeros, state)
        outputs.append([np.asarray(r, np.float64).reshape(-1) for r in result])

    def xi(seed, steps):
        return np.stack([np.concatenate([np.asarray(sampler.normal(s.shape, seed=blt_query.noise_key(
            tf.constant(seed, tf.int64), step, i))).reshape(-1) for i, s in enumerate(specs)]) for step in range(steps)])

    first, second = xi([11, 12], restart_at), xi([21, 22], n - restart_at)
    expected = np.concatenate([
        np.linalg.solve(_dense(blt_strategy.toeplitz_coefs(theta, omega, restart_at)), first),
        np.linalg.solve(_dense(blt_strategy.toeplitz_coefs(theta, omega, n - restart_at)), second),
    ]) * clip * z / m
    got = np.stack([np.concatenate(o) for o in outputs])
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert np.asarray(state.numerator_state.buffers[0]).dtype == np.float64  # the buffers are float64
    assert int(state.numerator_state.step) == n - restart_at


def test_streamed_noise_covariance_is_zc_squared_times_c_inverse_gram():
    """Zero records, one coordinate per draw: x = C^-1 xi has covariance C^-1 C^-T (times (zC/m)^2).

    Each of the 4 checked variances is a chi-square over d = 200,000 coordinates; each bound is its
    1e-8 two-sided quantile, so a correct sampler fails with probability < 4 * 2e-8 < 1e-6 per run.
    The whitened prefix x' = C x must be i.i.d. N(0, (zC/m)^2): its lag-1 correlations are checked
    within 6.5 / sqrt(d) (normal tail 8e-11 each).
    """
    import tensorflow as tf
    from scipy import stats

    from dpfl_tff.privacy import blt_query

    theta, omega, d, n = (0.8,), (0.45,), 200_000, 4
    clip, z, m = 1.0, 1.0, 1.0
    q = blt_query.blt_query(clip, z, m, theta, omega, [tf.TensorSpec((d,), tf.float32)], [3, 4])
    state, rows = q.initial_global_state(), []
    for _ in range(n):
        result, state, _ = q.get_noised_result([tf.zeros((d,), tf.float32)], state)
        rows.append(np.asarray(result[0], np.float64))
    x = np.stack(rows)
    inv = np.linalg.inv(_dense(blt_strategy.toeplitz_coefs(theta, omega, n)))
    cov = inv @ inv.T
    lo, hi = stats.chi2.ppf(1e-8, d) / d, stats.chi2.isf(1e-8, d) / d
    for t in range(n):
        ratio = np.mean(x[t] ** 2) / cov[t, t]
        assert lo < ratio < hi, (t, ratio)
    white = _dense(blt_strategy.toeplitz_coefs(theta, omega, n)) @ x
    for t in range(n - 1):
        assert abs(np.mean(white[t] * white[t + 1])) < 6.5 / math.sqrt(d)


# (3) Accounting: the ledger against dp-accounting by hand.

def _by_hand(z, sens_squared, delta, kind="rdp", interval=1e-4):
    """dp-accounting's figure for one Gaussian of multiplier z / sqrt(sum of the streams' sensitivities^2)."""
    event = dp_accounting.GaussianDpEvent(z / math.sqrt(sum(sens_squared)))
    acc = (dp_accounting.rdp.RdpAccountant() if kind == "rdp"
           else dp_accounting.pld.PLDAccountant(value_discretization_interval=interval))
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_ledger_epsilon_per_round_and_after_a_resumed_stream_equal_dp_accounting_by_hand():
    n, b = 8, 3
    strategy = blt_strategy.optimize(n, b, blt_strategy.max_participations(n, b), 2)
    dense = _dense(strategy.coefs())

    def brute(t):
        return _brute_sensitivity_squared(dense[:t, :t], b, blt_strategy.max_participations(t, b))

    sampler = sampler_for("cyclic", 9, 3, sampling_seed=1)
    ledger = BLTLedger(strategy, Z, DELTA, "rdp")
    for r in range(1, n + 1):
        assert ledger.begin_round(r) == {"blt_stream": 1, "blt_stream_round": r, "blt_strategy_rounds": n}
        fields = ledger.commit(sampler.cohort(r))
        assert fields["epsilon"] == pytest.approx(_by_hand(Z, [brute(r)], DELTA), rel=1e-9)
    assert ledger.planned(n)["epsilon"] == pytest.approx(_by_hand(Z, [brute(n)], DELTA), rel=1e-9)
    # A resume from round 4's checkpoint after round 6 was released: rounds 5.. re-run in stream 2.
    resumed, lines = BLTLedger(strategy, Z, DELTA, "rdp"), []
    for r in range(1, 7):
        lines.append({"round": r, "cohort": sampler.cohort(r).tolist(), **resumed.begin_round(r)})
        resumed.commit(sampler.cohort(r))
    assert resumed.begin_round(5) == {"blt_stream": 2, "blt_stream_round": 1, "blt_strategy_rounds": n}
    assert resumed.preview(None) == pytest.approx(_by_hand(Z, [brute(6), brute(1)], DELTA), rel=1e-9)
    resumed.commit(sampler.cohort(5))
    for r in (6, 7, 8):
        resumed.begin_round(r)
        last = resumed.commit(sampler.cohort(r))
    assert resumed.streams == [6, 4]
    assert last["epsilon"] == pytest.approx(_by_hand(Z, [brute(6), brute(4)], DELTA), rel=1e-9)
    # = two Gaussians composed (Gaussian composition is exact): the same RDP curve.
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(Z / math.sqrt(brute(6))),
                                               dp_accounting.GaussianDpEvent(Z / math.sqrt(brute(4)))]))
    assert last["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert last["epsilon"] > ledger.epsilon()  # a re-run costs privacy
    # PLD, the same event (the project's pessimistic discretisation 1e-3: never below the finer 1e-4's).
    pld = BLTLedger(strategy, Z, DELTA, "pld").epsilon([6, 4])
    assert pld == pytest.approx(_by_hand(Z, [brute(6), brute(4)], DELTA, "pld", 1e-3), rel=1e-9)
    assert pld >= _by_hand(Z, [brute(6), brute(4)], DELTA, "pld")
    # Replaying the ledger's lines rebuilds the streams.
    lines.append({"round": 5, "cohort": sampler.cohort(5).tolist(), "blt_stream": 2, "blt_stream_round": 1,
                  "blt_strategy_rounds": n})
    replayed = BLTLedger(strategy, Z, DELTA, "rdp")
    for line in lines:
        replayed.replay_entry(line)
    assert replayed.streams == [6, 1] and replayed.released == 7
    assert replayed.projected_streams(5, 8) == [6, 4]  # resumed at the ledger's end: stream 2 goes on
    assert replayed.projected_streams(3, 8) == [6, 1, 5]  # from an older checkpoint: stream 3
    assert replayed.projected(3, 8)["epsilon"] == pytest.approx(_by_hand(Z, [brute(6), brute(1), brute(5)],
                                                                         DELTA), rel=1e-9)


def test_ledger_refuses_a_client_sooner_than_b_rounds_and_another_strategy():
    strategy = blt_strategy.optimize(6, 3, 2, 1)
    ledger = BLTLedger(strategy, Z, DELTA, "rdp")
    ledger.replay_entry({"round": 1, "blt_stream": 1, "blt_stream_round": 1, "blt_strategy_rounds": 6,
                         "cohort": [1, 2]})
    with pytest.raises(LedgerError, match="fewer than b=3 rounds before"):
        ledger.replay_entry({"round": 2, "blt_stream": 1, "blt_stream_round": 2, "blt_strategy_rounds": 6,
                             "cohort": [2, 3]})
    with pytest.raises(LedgerError, match="keep --rounds=7"):
        BLTLedger(strategy, Z, DELTA, "rdp").replay_entry({"round": 1, "blt_stream": 1, "blt_stream_round": 1,
                                                           "blt_strategy_rounds": 7, "cohort": [1]})


def test_calibration_and_compute_epsilon_match_dp_accounting():
    cfg = ExperimentConfig(task=TaskConfig(num_clients=700, num_clients_known=True),
                           train=TrainConfig(clients_per_round=70, rounds=25, client_sampling="cyclic",
                                             server_optimizer="sgd"),
                           dp=DPConfig(mode="blt", target_delta=1e-5)).validate()
    sens2 = blt_strategy.optimize(25, 10, 3).sensitivity(25) ** 2
    z = accounting.calibrate_noise_multiplier(cfg, 5.0)
    assert _by_hand(z, [sens2], 1e-5) <= 5.0 < _by_hand(z * (1 - 1e-4), [sens2], 1e-5)
    proc = compute_epsilon("--dp_mode=blt", "--num_clients=700", "--clients_per_round=70", "--rounds=25",
                           "--noise_multiplier=3", "--target_delta=1e-5")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epsilon"] == pytest.approx(_by_hand(3.0, [sens2], 1e-5), rel=1e-9)
    assert (result["neighboring_relation"], result["client_sampling"], result["blt_min_separation"],
            result["blt_max_participations"]) == ("add_or_remove_one", "cyclic", 10, 3)
    pld = compute_epsilon("--dp_mode=blt", "--num_clients=700", "--clients_per_round=70", "--rounds=25",
                          "--target_epsilon=5", "--target_delta=1e-5", "--accountant=pld")
    assert pld.returncode == 0, pld.stderr
    z_pld = json.loads(pld.stdout.strip().splitlines()[-1])["noise_multiplier"]
    assert _by_hand(z_pld, [sens2], 1e-5, "pld") <= 5.0 + 1e-9 and z_pld <= z


# (4) The cyclic sampler.

def test_cyclic_groups_partition_the_clients_and_resume_rebuilds_them():
    n, m = 23, 5  # b = 4 groups of 6, 6, 6, 5
    for sampler in (sampler_for("cyclic", n, m, sampling_seed=7), sampler_for("cyclic", n, m)):
        assert isinstance(sampler, CyclicSampler) and sampler.groups_count == 4
        groups = [sampler.cohort(r).tolist() for r in range(1, 5)]
        assert sorted(sum(groups, [])) == list(range(n)) and [len(g) for g in groups] == [6, 6, 6, 5]
        assert all(sampler.cohort(r).tolist() == groups[(r - 1) % 4] for r in range(1, 13))
    first = sampler_for("cyclic", n, m)
    entries = [{"round": r, "cohort": first.cohort(r).tolist()} for r in (1, 2)]
    resumed = sampler_for("cyclic", n, m)
    resumed.restore(entries)
    assert [resumed.cohort(r).tolist() for r in (1, 2, 5, 6)] == [e["cohort"] for e in entries] * 2
    assert sorted(sum((resumed.cohort(r).tolist() for r in range(1, 5)), [])) == list(range(n))


# (5) Runs: the participation rule from the ledger, strategy.json, resume.

def test_blt_trains_writes_strategy_and_the_ledger_shows_cyclic_participation(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_driver([*ARGS, "--rounds=7", f"--output_dir={out}"]) == 0  # --client_sampling unset: cyclic
    printed = capsys.readouterr().out
    assert "BLT-DP-FTRL" in printed and "sampling cyclic" in printed and "add-or-remove-one" in printed
    ledger = _lines(out / "ledger.jsonl")
    b = N // M
    seen: dict[int, list[int]] = {}
    for e in ledger:
        for c in e["cohort"]:
            seen.setdefault(c, []).append(e["round"])
    assert sorted(seen) == list(range(N))
    assert all(np.all(np.diff(rounds) == b) and rounds[0] <= b for rounds in seen.values())
    strategy = json.load(open(out / "strategy.json"))
    assert (strategy["rounds"], strategy["min_separation"], strategy["max_participations"],
            strategy["buffers"]) == (7, 3, 3, 2)
    coefs = np.array(strategy["toeplitz_coefs"])
    np.testing.assert_allclose(coefs, blt_strategy.toeplitz_coefs(strategy["theta"], strategy["omega"], 7),
                               rtol=1e-12)
    sens2 = _brute_sensitivity_squared(_dense(coefs), 3, 3)
    assert strategy["sensitivity"] ** 2 == pytest.approx(sens2, rel=1e-12)
    rows = _lines(out / "metrics.jsonl")
    assert rows[-1]["epsilon"] == pytest.approx(_by_hand(Z, [sens2], DELTA), rel=1e-9)
    assert [r["blt_stream_round"] for r in rows] == list(range(1, 8))
    assert {(r["neighboring_relation"], r["client_sampling"]) for r in rows} == {("add_or_remove_one", "cyclic")}
    summary = json.load(open(out / "summary.json"))
    assert summary["dp_mode"] == "blt" and summary["blt_min_separation"] == 3
    assert np.isfinite(rows[-1]["test_accuracy"])


def test_resume_continues_the_stream_or_reruns_released_rounds_in_a_fresh_stream(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={whole}"]) == 0
    a = _lines(whole / "metrics.jsonl")
    budget = (a[4]["epsilon"] + a[5]["epsilon"]) / 2  # stops before round 6
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--max_epsilon={budget}",
                       f"--output_dir={part}"]) == 0
    rerun = tmp_path / "rerun"
    shutil.copytree(part, rerun)
    shutil.rmtree(rerun / "checkpoints" / "ckpt_000005")  # as if killed after round 5's ledger line
    # Continued from round 5's checkpoint: the same stream, noise and model as without a stop.
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={part}"]) == 0
    b = _lines(part / "metrics.jsonl")
    assert [r["blt_stream"] for r in b] == [r["blt_stream"] for r in a] == [1] * 7
    assert b[-1]["test_loss"] == pytest.approx(a[-1]["test_loss"], rel=1e-5)
    assert b[-1]["epsilon"] == pytest.approx(a[-1]["epsilon"], rel=1e-12)
    # Resumed from round 4: round 5 was released, so it re-runs (same clients) in a new stream.
    assert run_driver([*ARGS, "--rounds=7", "--checkpoint_every=2", f"--output_dir={rerun}"]) == 0
    ledger = _lines(rerun / "ledger.jsonl")
    assert [(e["round"], e["execution"], e["blt_stream"], e["blt_stream_round"]) for e in ledger] == [
        (1, 1, 1, 1), (2, 1, 1, 2), (3, 1, 1, 3), (4, 1, 1, 4), (5, 1, 1, 5),
        (5, 2, 2, 1), (6, 1, 2, 2), (7, 1, 2, 3)]
    assert ledger[5]["cohort"] == ledger[4]["cohort"]
    strategy = blt_strategy.optimize(7, 3, 3, 2)
    dense = _dense(strategy.coefs())
    s5 = _brute_sensitivity_squared(dense[:5, :5], 3, 2)
    s3 = _brute_sensitivity_squared(dense[:3, :3], 3, 1)
    rows = _lines(rerun / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 8))
    assert rows[-1]["epsilon"] == pytest.approx(_by_hand(Z, [s5, s3], DELTA), rel=1e-9)
    assert rows[-1]["rounds_accounted"] == 8


@pytest.mark.parametrize("extra, needle", [
    (["--client_sampling=poisson"], "--client_sampling=poisson with --dp_mode=blt"),
    (["--server_optimizer=adam"], "--server_optimizer=adam with --dp_mode=blt: must be one of sgd, sgdm"),
    (["--adaptive_clipping"], "--adaptive_clipping with --dp_mode=blt"),
    (["--fedavg_impl=tff"], "--fedavg_impl=tff with --dp_mode=blt"),
    (["--noise_multiplier=0"], "--noise_multiplier=0 with --dp_mode=blt"),
    (["--blt_buffers=11"], "--blt_buffers=11: must be an integer in 1..10"),
    (["--dp_mode=central", "--client_sampling=cyclic"], "--client_sampling=cyclic with --dp_mode=central"),
    (["--dp_mode=ftrl", "--client_sampling=cyclic"], "--client_sampling=cyclic with --dp_mode=ftrl"),
])
def test_refusals_are_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    assert run_driver([*ARGS, *extra, f"--output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not os.path.exists(tmp_path / "r")
