"""Epsilons against dp-accounting called directly, and golden values from the literature."""

import dp_accounting
import pytest
from dp_accounting import pld
from dp_accounting.rdp import RdpAccountant

from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff import plan
from dpfl_tff.privacy import accounting, events
from dpfl_tff.privacy.noise import central_noise


def _cfg(n, m, z, sampling="poisson", adaptive=False, delta=1e-5, rounds=100):
    return ExperimentConfig(
        task=TaskConfig(num_clients=n),
        train=TrainConfig(clients_per_round=m, rounds=rounds, client_sampling=sampling),
        dp=DPConfig(noise_multiplier=z, adaptive_clipping=adaptive, target_delta=delta),
    ).validate()


def test_tff_tutorial_golden_epsilon():
    # TFF tutorial "Differential Privacy in TFF": N=3383, 120 clients/round, z=1.2,
    # 100 rounds, delta=1e-5, Poisson, RDP -> epsilon about 1.986.
    cfg = _cfg(3383, 120, 1.2)
    tracker = events.EpsilonTracker(accounting.round_privacy(cfg), 1e-5, "rdp")
    direct = RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(120 / 3383, dp_accounting.GaussianDpEvent(1.2)), 100)
    assert tracker.epsilon(100) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert tracker.epsilon(100) == pytest.approx(1.986, abs=5e-3)


def test_abadi_golden_epsilon():
    # Abadi et al. 2016 (arXiv:1607.00133), Sec. 3.1: q=0.01, sigma=4, 10,000 steps, delta=1e-5;
    # their moments accountant reports epsilon 1.26. RDP with dp-accounting's default orders is
    # tighter: 1.0355 (dp-accounting 0.4.3, computed directly below as the cross-check).
    rp = events.RoundPrivacy(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(4.0)),
        events.ADD_OR_REMOVE_ONE, 4.0, "abadi")
    direct = RdpAccountant()
    direct.compose(rp.event, 10_000)
    eps = events.EpsilonTracker(rp, 1e-5, "rdp").epsilon(10_000)
    assert eps == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(1.0355, abs=1e-3) and eps <= 1.26


@pytest.mark.parametrize("rounds", [1, 7, 50, 100])
def test_incremental_tracker_equals_fresh_composition(rounds):
    cfg = _cfg(1000, 50, 0.9, delta=1e-4)
    rp = accounting.round_privacy(cfg)
    for kind in ("rdp", "pld"):
        tracker = events.EpsilonTracker(rp, 1e-4, kind)
        assert tracker.epsilon(rounds) == pytest.approx(events.epsilon_after(rp, rounds, 1e-4, kind), rel=1e-6)


def test_pld_is_not_looser_than_rdp_on_poisson():
    rp = accounting.round_privacy(_cfg(3383, 120, 1.2))
    eps_rdp = events.EpsilonTracker(rp, 1e-5, "rdp").epsilon(100)
    eps_pld = events.EpsilonTracker(rp, 1e-5, "pld").epsilon(100)
    assert eps_pld <= eps_rdp
    direct = pld.PLDAccountant()  # dp-accounting's finer default discretisation (1e-4)
    direct.compose(rp.event, 100)
    # Our coarser pessimistic discretisation is still an upper bound, and close.
    assert direct.get_epsilon(1e-5) <= eps_pld <= direct.get_epsilon(1e-5) * (1 + 1e-4)


def test_uniform_sampling_uses_replace_one_and_half_the_noise_multiplier():
    cfg = _cfg(3383, 120, 1.2, sampling="uniform")
    rp = accounting.round_privacy(cfg)
    assert rp.neighboring_relation == events.REPLACE_ONE
    assert rp.event == dp_accounting.SampledWithoutReplacementDpEvent(3383, 120, dp_accounting.GaussianDpEvent(0.6))

    def direct(z):
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(3383, 120, dp_accounting.GaussianDpEvent(z)), 100)
        return acc.get_epsilon(1e-5)

    eps = events.EpsilonTracker(rp, 1e-5, "rdp").epsilon(100)
    assert eps == pytest.approx(direct(0.6), rel=1e-9)
    assert eps > 1.5 * direct(1.2)  # passing z instead of z/2 would under-report


def test_pld_refuses_uniform_sampling_with_clear_error():
    rp = accounting.round_privacy(_cfg(3383, 120, 1.2, sampling="uniform"))
    with pytest.raises(ConfigError, match="--accountant=pld"):
        events.EpsilonTracker(rp, 1e-5, "pld")


def test_adaptive_clipping_accounts_both_releases():
    cfg = _cfg(3383, 120, 1.2, adaptive=True)
    noise = central_noise(cfg.dp, 120)
    # TFF's split: value noise raised so that value + clipped count == one Gaussian with z=1.2.
    assert noise.clipped_count_stddev == pytest.approx(0.05 * 120)
    assert noise.value_noise_multiplier > 1.2
    assert noise.effective_noise_multiplier == pytest.approx(1.2, rel=1e-9)
    composed = RdpAccountant()
    composed.compose(
        dp_accounting.PoissonSampledDpEvent(
            120 / 3383,
            dp_accounting.ComposedDpEvent([
                dp_accounting.GaussianDpEvent(noise.value_noise_multiplier),
                dp_accounting.GaussianDpEvent(2 * noise.clipped_count_stddev),  # sensitivity 1/2
            ]),
        ),
        100,
    )
    eps = events.EpsilonTracker(accounting.round_privacy(cfg), 1e-5, "rdp").epsilon(100)
    assert eps == pytest.approx(composed.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_budget_search():
    tracker = events.EpsilonTracker(accounting.round_privacy(_cfg(3383, 120, 1.2)), 1e-5, "rdp")
    eps = [tracker.epsilon(t) for t in range(0, 101, 10)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:]))
    t = events.rounds_within_budget(tracker, 1.5, 1000)
    assert tracker.epsilon(t) <= 1.5 < tracker.epsilon(t + 1)


def test_no_dp_has_no_event():
    cfg = ExperimentConfig(dp=DPConfig(mode="none", noise_multiplier=0.0)).validate()
    assert accounting.round_privacy(cfg) is None


@pytest.mark.parametrize(
    "kind, target", [("rdp", 0.5), ("rdp", 2.0), ("rdp", 8.0), ("pld", 0.5), ("pld", 2.0)]
)
def test_calibration_never_exceeds_target_and_is_tight(kind, target):
    cfg = ExperimentConfig(
        task=TaskConfig(num_clients=3383),
        train=TrainConfig(clients_per_round=120, rounds=100),
        dp=DPConfig(target_epsilon=target, target_delta=1e-5, accountant=kind),
    ).validate()
    z = accounting.calibrate_noise_multiplier(cfg, target)

    def eps(noise):
        event = dp_accounting.PoissonSampledDpEvent(120 / 3383, dp_accounting.GaussianDpEvent(noise))
        acc = RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
        return acc.compose(event, 100).get_epsilon(1e-5)

    assert eps(z) <= target
    assert eps(z * 0.999) > target  # smallest: 0.1% less noise already breaks the target
    assert accounting.with_calibrated_noise(cfg).dp.noise_multiplier == z


def test_adaptive_noise_split_error_names_flags_and_smallest_cohort():
    cfg = ExperimentConfig(
        task=TaskConfig(num_clients=3383),
        train=TrainConfig(clients_per_round=5),
        dp=DPConfig(noise_multiplier=1.2, adaptive_clipping=True),
    )
    with pytest.raises(ConfigError) as e:
        plan.check(cfg)
    msg = str(e.value)
    # TFF needs 0.05 * m > z / 2, i.e. m > 10 z = 12: smallest m is 13.
    assert "--clients_per_round >= 13" in msg and "--clipped_count_stddev" in msg and "--noise_multiplier" in msg
    ok = ExperimentConfig(task=TaskConfig(num_clients=3383), train=TrainConfig(clients_per_round=13),
                          dp=DPConfig(noise_multiplier=1.2, adaptive_clipping=True))
    plan.check(ok)


@pytest.mark.parametrize(
    "dp, train, flag",
    [
        (DPConfig(target_epsilon=0.0), TrainConfig(), "--target_epsilon=0.0: must be > 0"),
        (DPConfig(max_epsilon=-1.0), TrainConfig(), "--max_epsilon=-1.0: must be > 0"),
        (DPConfig(accountant="pld"), TrainConfig(client_sampling="uniform"), "--accountant=pld: dp-accounting cannot"),
        (DPConfig(target_delta=1.5), TrainConfig(), "--target_delta=1.5: must be in the open interval (0, 1)"),
    ],
)
def test_bad_accounting_flags(dp, train, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        plan.check(ExperimentConfig(dp=dp, train=train))


def test_noise_split_is_tffs_and_needs_no_tensorflow():
    """`noise.value_split` reproduces TFF's `adaptive_clip_noise_params`; config and accounting import no TF."""
    import subprocess
    import sys

    from tensorflow_federated.python.aggregators.differential_privacy import adaptive_clip_noise_params

    from dpfl_tff.privacy import noise

    for z, m, std in [(1.2, 120, None), (0.5, 20, 0.3), (3.0, 1000, None), (0.0, 10, None), (0.0, 10, 2.0)]:
        assert noise.value_split(z, m, std) == pytest.approx(adaptive_clip_noise_params(z, m, std), rel=1e-12)
    with pytest.raises(ValueError):
        adaptive_clip_noise_params(1.2, 10, None)
    with pytest.raises(ValueError):
        noise.value_split(1.2, 10, None)
    code = ("import sys, dpfl_tff.config, dpfl_tff.plan, dpfl_tff.privacy.accounting, experiments.compute_epsilon; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_federated', 'tensorflow_privacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_the_cached_rdp_accountant_gives_dp_accountings_numbers_exactly():
    """`events.CachedRdpAccountant`: the same RDP curve, bit for bit, as dp-accounting's accountant, for every
    event kind it memoizes (nested and self-composed too) and for those it passes through; a repeat is a hit."""
    import dp_accounting as dpa
    import numpy as np

    from dpfl_tff.privacy import events

    g = dpa.GaussianDpEvent
    cases = [
        (dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.37, g(1.3)), 7)),
        (dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.ComposedDpEvent([
            dpa.PoissonSampledDpEvent(0.1, dpa.ComposedDpEvent([g(2.0), g(3.0)])), g(0.9), dpa.LaplaceDpEvent(2.0)])),
        (dpa.NeighboringRelation.REPLACE_ONE, dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(20, 7, g(1.1)), 5)),
        (dpa.NeighboringRelation.REPLACE_ONE, dpa.ComposedDpEvent([g(1.7), dpa.SelfComposedDpEvent(g(2.5), 3)])),
    ]
    for orders in (None, [2.0, 3.5, 8.0, 64.0]):
        for relation, event in cases:
            plain = dpa.rdp.RdpAccountant(orders=orders, neighboring_relation=relation)
            cached = events.CachedRdpAccountant(orders=orders, neighboring_relation=relation)
            plain.compose(event, 2)
            cached.compose(event, 2)
            assert np.array_equal(cached._rdp, plain._rdp), (orders, event)  # noqa: SLF001
            assert cached.get_epsilon(1e-5) == plain.get_epsilon(1e-5)
    before = events._subsampled_gaussian_rdp.cache_info().hits  # noqa: SLF001
    events.CachedRdpAccountant(neighboring_relation=cases[2][0]).compose(cases[2][1])
    assert events._subsampled_gaussian_rdp.cache_info().hits == before + 1  # noqa: SLF001
    # What dp-accounting refuses, this refuses too (Poisson needs add-or-remove-one).
    refused = events.CachedRdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    assert not refused.supports(cases[0][1])
    with pytest.raises(dpa.UnsupportedEventError):
        refused.compose(cases[0][1])
