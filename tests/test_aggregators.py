"""The central DP aggregator, run through TFF: clipping, denominator, noise."""

import numpy as np
import pytest
import tensorflow_federated as tff

from dpfl_tff import runtime
from dpfl_tff.config import DPConfig
from tests.aggregation import build_aggregator

DIM = 20_000


def _process(dp: DPConfig, m: float, dim: int = DIM):
    return build_aggregator(dp, m).create(tff.TensorType(np.float32, [dim]))


def _one_round(dp, m, values, dim=DIM):
    p = _process(dp, m, dim)
    out = p.next(p.initialize(), [np.asarray(v, np.float32) for v in values])
    return np.asarray(out.result)


def test_no_dp_is_the_plain_mean(tff_context):
    values = [np.full(3, 1.0), np.array([5.0, -2.0, 0.0]), np.zeros(3)]
    got = _one_round(DPConfig(mode="none", noise_multiplier=0.0), 10, values, dim=3)
    np.testing.assert_allclose(got, np.mean(values, axis=0), rtol=0, atol=1e-6)


def test_clips_and_divides_by_expected_not_realised_cohort(tff_context):
    # Near-zero noise (z=1e-6): result = sum of clipped updates / m with m=10, not / 2.
    a = np.array([0.3, 0.4, 0.0])  # norm 0.5 < C=1: unchanged
    b = np.array([3.0, 4.0, 0.0])  # norm 5 > C=1: scaled to norm 1
    got = _one_round(DPConfig(noise_multiplier=1e-6, clip_norm=1.0), 10, [a, b], dim=3)
    np.testing.assert_allclose(got, (a + b / 5.0) / 10, atol=1e-5)


@pytest.mark.parametrize("z, clip, m, k", [(1.0, 0.5, 10, 3), (2.5, 2.0, 40, 1)])
def test_noise_std_is_clip_times_z_over_expected_cohort(tff_context, z, clip, m, k):
    # k clients send zeros; each of the DIM coordinates of the result is N(0, (z C / m)^2).
    got = _one_round(DPConfig(noise_multiplier=z, clip_norm=clip), m, [np.zeros(DIM)] * k)
    sigma = z * clip / m
    # Unseeded noise. Each check allows 6 standard errors of its (asymptotically normal, n = 20,000)
    # estimate: P(|Z| > 6) = 2e-9 per check, 6 checks over both cases: failure probability < 1.2e-8 per run.
    # Sample std over n iid normals has relative std 1/sqrt(2n) = 0.5%.
    assert got.std() == pytest.approx(sigma, rel=6 / np.sqrt(2 * DIM))
    # Sample mean has std sigma/sqrt(n).
    assert abs(got.mean()) < 6 * sigma / np.sqrt(DIM)
    # Gaussian, not e.g. Laplace (excess kurtosis 3): excess kurtosis 0, std of the estimate sqrt(24/n) = 0.035.
    kurt = np.mean((got - got.mean()) ** 4) / got.var() ** 2 - 3
    assert abs(kurt) < 6 * np.sqrt(24 / DIM)


def test_noise_is_fresh_unless_seeded():
    def noise(seed):
        with runtime.local_context():
            return _one_round(DPConfig(noise_multiplier=1.0, noise_seed=seed), 5, [np.zeros(64)], dim=64)

    a, b = noise(None), noise(None)
    # Two independent N(0, (zC/m)^2)^64 draws are allclose (|a - b| <= 1e-8 + 1e-5 |b| everywhere) with
    # probability < 1e-200: not a flake.
    assert not np.allclose(a, b)
    c, d = noise(7), noise(7)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(c, noise(8))


def test_seeded_noise_differs_between_rounds_and_tensors(tff_context):
    dp = DPConfig(noise_multiplier=1.0, noise_seed=3)
    p = build_aggregator(dp, 1.0).create(
        tff.types.to_type([(np.float32, [256]), (np.float32, [256])])
    )
    state = p.initialize()
    zeros = [np.zeros(256, np.float32), np.zeros(256, np.float32)]
    r1 = p.next(state, [zeros])
    r2 = p.next(r1.state, [zeros])
    first, second = np.asarray(r1.result[0]), np.asarray(r1.result[1])
    assert not np.allclose(first, second)  # equal-shape tensors get independent noise
    assert not np.allclose(first, np.asarray(r2.result[0]))  # and rounds do too
    # Seeded, hence deterministic. Independent N(0,1) draws: correlation ~ N(0, 1/256); 5 sigma.
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / 16


def test_adaptive_clip_moves_towards_the_update_norm_quantile(tff_context):
    # All updates have norm 10 >> initial clip 0.1: everything is clipped, so the clip grows
    # geometrically by up to exp(0.2) per round (learning rate 0.2, target quantile 0.5).
    dp = DPConfig(noise_multiplier=0.1, clip_norm=0.1, adaptive_clipping=True, noise_seed=0)
    p = _process(dp, 20, dim=4)
    state = p.initialize()
    clips = []
    for _ in range(5):
        out = p.next(state, [np.array([10.0, 0, 0, 0], np.float32)] * 20)
        state = out.state
        clips.append(float(out.measurements["dp_query_metrics"]["clip"]))
    assert all(b > a for a, b in zip(clips, clips[1:]))
    assert clips[-1] == pytest.approx(0.1 * np.exp(0.2 * 0.5 * 5), rel=0.2)


def test_small_tensors_share_one_draw_of_independent_noise_of_the_right_std_shape_and_dtype():
    """`Float64GaussianSumQuery`: tensors of at most 2^16 coordinates share one draw, split back; a larger one,
    or one of unknown shape (inside a tf.function without it), is drawn on its own. Every tensor keeps its
    shape and dtype and has std sigma; the tensors' noise is uncorrelated, also when seeded (the shared draw
    and tensor 0's never use the same op seed)."""
    import tensorflow as tf

    from dpfl_tff.privacy import queries
    from dpfl_tff.privacy.queries import Float64GaussianSumQuery

    sigma = 0.7
    big_shape = (300, 250)  # 75,000 coordinates: its own draw
    assert np.prod(big_shape) > queries._JOINT_DRAW_MAX_ELEMENTS >= 200 * 100
    specs = [(big_shape, tf.float32), ((200, 100), tf.float32), ((20_000,), tf.float32), ((3, 3, 3), tf.float64),
             ((), tf.float32)]
    zeros = [tf.zeros(shape, dtype) for shape, dtype in specs]
    n = 20_000
    # Each check allows 6 standard errors of an asymptotically normal estimate over n >= 20,000 iid normals:
    # P(|Z| > 6) = 2e-9; 2 x 9 checks: failure probability < 4e-8 per run.
    for seed in (None, 5):
        query = Float64GaussianSumQuery(1.0, sigma, seed)
        noised, _, _ = query.get_noised_result(zeros, query.initial_global_state())
        assert [(tuple(t.shape), t.dtype) for t in noised] == [(s, d) for s, d in specs]
        big, joint_a, joint_b = (np.asarray(noised[i], np.float64).ravel() for i in range(3))
        for x in (big, joint_a, joint_b):
            assert x.std() == pytest.approx(sigma, rel=6 / np.sqrt(2 * x.size))
            assert abs(x.mean()) < 6 * sigma / np.sqrt(x.size)
        # Independent tensors: the sample correlation of n pairs is ~ N(0, 1/n).
        assert abs(np.corrcoef(joint_a, joint_b)[0, 1]) < 6 / np.sqrt(n)
        assert abs(np.corrcoef(big[:n], joint_a)[0, 1]) < 6 / np.sqrt(n)
        assert abs(np.corrcoef(big[:n], joint_b)[0, 1]) < 6 / np.sqrt(n)
        assert np.all(np.asarray(noised[3]) != 0) and np.asarray(noised[4]) != 0  # the small ones are noised too

    query = Float64GaussianSumQuery(1.0, sigma)
    state = query.initial_global_state()

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec([5], tf.float32)])
    def unknown(a, b):
        return query.get_noised_result([a, b], state)[0]

    a, b = unknown(tf.zeros([4, 5]), tf.zeros([5]))
    assert tuple(a.shape) == (4, 5) and tuple(b.shape) == (5,) and np.all(np.asarray(a) != 0)
