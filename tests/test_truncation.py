"""The noise sampler's truncation term (privacy.truncation): bounds, their validity, the refusal, the reported delta."""

import math

import numpy as np
import pytest
from scipy import stats

from dpfl_tff import plan
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import accounting, truncation
from dpfl_tff.privacy.registry import mechanism_for

# TensorFlow's normal samplers (float32 and float64) floor their uniform at 1e-7 before Box-Muller's log.
TF_BOUND = math.sqrt(-2 * math.log(1e-7))


def test_bounds_are_the_samplers():
    # v >= 2^-156: R = sqrt(-2 ln v) <= sqrt(312 ln 2); -ln v <= 156 ln 2 (privacy.sampler).
    assert truncation.GAUSSIAN_BOUND == pytest.approx(math.sqrt(312 * math.log(2)), rel=1e-11)
    assert truncation.GAUSSIAN_BOUND > math.sqrt(312 * math.log(2))
    assert truncation.GAUSSIAN_BOUND == pytest.approx(14.7058, abs=1e-4)
    assert truncation.LAPLACE_BOUND == pytest.approx(108.1310, abs=1e-4) and TF_BOUND == pytest.approx(5.678, abs=1e-3)


def test_tf_float32_sampler_breaks_the_stated_delta_and_the_float64_one_does_not():
    # The review's case: local Gaussian, z=1, replace-one (shift 2 std), 21 releases of one client. With
    # TensorFlow's bound the out-of-reach probability is at least P(Z > 5.678 - 2) per release (one coordinate
    # carries the whole shift): 1.2e-4 each, 21 of them 2.5e-3, above the delta the run reported (7.4e-4).
    one_coordinate = stats.norm.sf(TF_BOUND - 2)
    assert one_coordinate == pytest.approx(1.18e-4, rel=1e-2) and 21 * one_coordinate > 3 * 7.4e-4
    assert truncation.gaussian_out_of_reach(2, bound=TF_BOUND) >= one_coordinate
    # This project's sampler: the same 21 releases add less than 1e-32.
    assert 21 * truncation.gaussian_out_of_reach(2) < 1e-32
    assert truncation.laplace_out_of_reach(2) < 1e-45  # the float32 Laplace's bound 15.94 b gave 0.5 e^-13.9
    # The README study's smallest noise, z = 0.25 with a fixed cohort (shift 8 std), 100 rounds: far below
    # 1% of its delta 7.4e-4 (TensorFlow's sampler could not even reach the shift: probability 1).
    assert 100 * truncation.gaussian_out_of_reach(8) < 1e-7 and truncation.gaussian_out_of_reach(8, TF_BOUND) == 1


def test_gaussian_bound_is_at_least_every_way_of_spreading_the_shift():
    # Concentrated in one pair (h(s)) or spread evenly over k pairs (k h(s / sqrt k)): the bound covers each.
    for b in (3.0, TF_BOUND, truncation.GAUSSIAN_BOUND):
        for s in (0.1, 0.5, 1.0, 2.0, 2.9):
            bound = truncation.gaussian_out_of_reach(s, bound=b)
            for k in (1, 2, 4, 16, 1000, 10**6):
                spread = k * truncation.pair_out_of_reach(s / math.sqrt(k), b)
                assert bound >= min(1.0, spread) * (1 - 1e-12), (b, s, k)
    assert truncation.gaussian_out_of_reach(0) == 0 and truncation.gaussian_out_of_reach(15) == 1.0
    assert truncation.gaussian_out_of_reach(math.inf) == 1.0 and truncation.laplace_out_of_reach(110) == 1.0


@pytest.mark.parametrize("layout", ["one_pair", "within_a_pair", "two_pairs", "many_pairs"])
def test_gaussian_bound_holds_for_sampled_truncated_noise(layout):
    # Monte Carlo at a small bound B = 3 (where the event is frequent): pairs drawn exactly as privacy.sampler
    # draws them (R = sqrt(-2 ln v), v uniform on [exp(-B^2/2), 1]), shifted by Delta with ||Delta||_2 = s;
    # out of reach when some shifted pair leaves the disc of radius B. Hoeffding: the frequency exceeds the
    # probability by t = sqrt(ln(1e7) / (2n)) with probability <= 1e-7.
    b, s, n = 3.0, 1.0, 100_000
    pairs = {"one_pair": [(s, 0.0)], "within_a_pair": [(s / 2**0.5, s / 2**0.5)],
             "two_pairs": [(s / 2**0.5, 0.0)] * 2, "many_pairs": [(s / 10, 0.0)] * 100}[layout]
    rng = np.random.default_rng(7)
    out = np.zeros(n, bool)
    for a in pairs:
        v = rng.uniform(math.exp(-b * b / 2), 1.0, n)
        r, theta = np.sqrt(-2 * np.log(v)), rng.uniform(0, 2 * math.pi, n)
        x, y = r * np.cos(theta) + a[0], r * np.sin(theta) + a[1]
        out |= x * x + y * y > b * b
    t = math.sqrt(math.log(1e7) / (2 * n))
    assert out.mean() <= truncation.gaussian_out_of_reach(s, bound=b) + t
    if layout == "one_pair":  # and h(s) is the right size: the event is not rare here
        assert out.mean() >= 0.3 * truncation.pair_out_of_reach(s, b) - t


def test_laplace_bound_holds_for_sampled_truncated_noise():
    # Laplace conditioned on |L| <= B = 3 (sign times Exp(1) conditioned on <= B), shift s in L1 over d coordinates;
    # Hoeffding slack as above (failure probability <= 1e-7).
    b, s, n = 3.0, 1.0, 100_000
    rng = np.random.default_rng(8)
    for shifts in ([s], [s / 2, s / 2], [s / 10] * 10):
        out = np.zeros(n, bool)
        for d in shifts:
            e = -np.log(rng.uniform(math.exp(-b), 1.0, n))
            lap = np.where(rng.uniform(size=n) < 0.5, e, -e)
            out |= np.abs(lap + d) > b
        assert out.mean() <= truncation.laplace_out_of_reach(s, bound=b) + math.sqrt(math.log(1e7) / (2 * n))


def test_tree_levels_match_dp_accounting():
    # SingleEpochTreeAggregationDpEvent(z, T): RDP alpha ceil(log2(T + 1)) / (2 z^2), one Gaussian per level.
    for t in range(1, 70):
        assert truncation.tree_levels(t) == math.ceil(math.log2(t + 1))
    assert truncation.tree_levels(0) == 0


def _quickstart(**dp) -> ExperimentConfig:
    return ExperimentConfig(
        task=TaskConfig(num_clients=700), train=TrainConfig(clients_per_round=70, rounds=100),
        dp=DPConfig(**{"noise_multiplier": 1.0, **dp})).validate()


def test_every_mode_reports_its_planned_sampler_term():
    delta = _quickstart().target_delta
    central = accounting.sampler_delta(_quickstart())
    assert central == pytest.approx(100 * truncation.gaussian_out_of_reach(1.0) + delta * 2**-92, rel=1e-9)
    local = mechanism_for(_quickstart(mode="local")).planned_out_of_reach(100)
    assert local == pytest.approx(100 * truncation.gaussian_out_of_reach(2.0), rel=1e-12)
    laplace = mechanism_for(_quickstart(mode="local", local_mechanism="laplace")).planned_out_of_reach(100)
    assert laplace == pytest.approx(100 * truncation.laplace_out_of_reach(2.0), rel=1e-12)
    ftrl = ExperimentConfig(task=TaskConfig(num_clients=700),
                            train=TrainConfig(clients_per_round=70, rounds=25, client_sampling="shuffle"),
                            dp=DPConfig(mode="ftrl", noise_multiplier=1.0)).validate()
    # 10 rounds per epoch: trees of 10, 10 and 5 steps hold the worst client's leaf in 4 + 4 + 3 nodes.
    assert mechanism_for(ftrl).planned_out_of_reach(25) == pytest.approx(11 * truncation.gaussian_out_of_reach(1.0))
    # Adaptive clipping: the clipped-count release (std 0.05 m = 3.5, shift 1/2 / 3.5) adds its term.
    adaptive = mechanism_for(_quickstart(adaptive_clipping=True))
    n = adaptive.noise
    assert adaptive.out_of_reach_per_round() == pytest.approx(
        truncation.gaussian_out_of_reach(1 / n.value_noise_multiplier)
        + truncation.gaussian_out_of_reach(0.5 / n.clipped_count_stddev))
    # A fixed cohort (replace-one): sensitivity 2C.
    uniform = mechanism_for(_quickstart(noise_multiplier=0.5)).out_of_reach_per_round()
    fixed = mechanism_for(ExperimentConfig(
        task=TaskConfig(num_clients=700), train=TrainConfig(clients_per_round=70, rounds=100, client_sampling="uniform"),
        dp=DPConfig(noise_multiplier=0.5)).validate()).out_of_reach_per_round()
    assert fixed == pytest.approx(truncation.gaussian_out_of_reach(4.0)) and uniform < fixed


def test_small_noise_is_refused_naming_the_smallest_noise_that_passes():
    cfg = _quickstart(noise_multiplier=0.05)
    with pytest.raises(ConfigError, match=r"--noise_multiplier=0.05: the noise sampler's bound adds delta_sampler="
                                          r".* above 1% of the delta .* smallest noise multiplier that passes is") as e:
        plan.check(cfg)
    smallest = float(str(e.value).rsplit(" ", 1)[-1])
    limit = 0.01 * cfg.target_delta
    assert accounting.sampler_delta(cfg, smallest) <= limit < accounting.sampler_delta(cfg, smallest * (1 - 1e-5))
    assert plan.check(_quickstart(noise_multiplier=smallest)) is not None
    # Local DP (shift 2/z) needs twice the noise; seeded noise (tests only) and zero noise are not checked.
    with pytest.raises(ConfigError, match="--noise_multiplier=0.2"):
        plan.check(_quickstart(mode="local", noise_multiplier=0.2))
    plan.check(_quickstart(noise_multiplier=0.05, noise_seed=1))


def test_a_calibrated_noise_is_checked_too():
    # --target_epsilon large enough that the calibrated z is tiny.
    cfg = ExperimentConfig(task=TaskConfig(num_clients=700), train=TrainConfig(clients_per_round=700, rounds=10,
                                                                               client_sampling="poisson"),
                           dp=DPConfig(target_epsilon=2000.0)).validate()
    with pytest.raises(ConfigError, match="noise sampler's bound adds delta_sampler"):
        accounting.with_calibrated_noise(cfg)
