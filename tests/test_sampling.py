"""Cohort sampling: the law of each scheme, secrecy by default, reproducibility only when seeded."""

import numpy as np

from dpfl_tff.sampling import CohortSampler


def _seeded(scheme, n, m, seed):
    return CohortSampler(scheme, n, m, sampling_seed=seed)


def test_poisson_cohort_size_is_binomial():
    # K ~ Binomial(N, q): mean N q = 50, variance N q (1 - q) = 47.5 for N=1000, m=50.
    # Seeded: deterministic, so this cannot be flaky; the 5-sigma bounds only say the law is right.
    n, m, rounds = 1000, 50, 4000
    s = _seeded("poisson", n, m, 0)
    sizes = np.array([len(s.cohort(r)) for r in range(1, rounds + 1)])
    var = n * (m / n) * (1 - m / n)
    # The sample mean has std sqrt(var/rounds) = 0.109; 5 sigma.
    assert abs(sizes.mean() - m) < 5 * np.sqrt(var / rounds)
    # The sample variance has relative std about sqrt(2/rounds) = 2.2%; 5 sigma.
    assert abs(sizes.var() / var - 1) < 5 * np.sqrt(2 / rounds)


def test_poisson_includes_each_client_with_probability_q():
    n, m, rounds = 40, 10, 4000
    counts = np.zeros(n)
    s = _seeded("poisson", n, m, 1)
    for r in range(1, rounds + 1):
        counts[s.cohort(r)] += 1
    q = m / n
    # Each count ~ Binomial(rounds, q): std = sqrt(4000 * .25 * .75) = 27.4; 5 sigma for all 40 clients.
    assert np.all(np.abs(counts - rounds * q) < 5 * np.sqrt(rounds * q * (1 - q)))


def test_uniform_draws_exactly_m_distinct_clients():
    for sampler in (_seeded("uniform", 30, 7, 2), CohortSampler("uniform", 30, 7)):
        for r in range(1, 50):
            c = sampler.cohort(r)
            assert len(c) == 7 == len(set(c.tolist())) and c.min() >= 0 and c.max() < 30


def test_seeded_cohorts_are_reproducible_and_every_execution_is_a_fresh_draw():
    a = _seeded("poisson", 10**6, 100, 5).cohort(3)
    b = _seeded("poisson", 10**6, 100, 5).cohort(3)
    c = _seeded("poisson", 10**6, 100, 5).cohort(4)
    rerun = _seeded("poisson", 10**6, 100, 5).cohort(3, execution=2)  # round 3 re-run after a resume
    other_seed = _seeded("poisson", 10**6, 100, 6).cohort(3)
    assert np.array_equal(a, b)
    # Two independent ~100-subsets of 10^6 clients coincide with probability < 1e-300.
    for different in (c, rerun, other_seed):
        assert not np.array_equal(a, different)
    assert a.max() < 10**6


def test_unseeded_cohorts_come_from_os_entropy_not_from_any_seed():
    # Two samplers built alike (as two runs with the same --seed) draw different cohorts; a failure
    # would need two independent ~100-subsets of 10^6 clients to coincide: probability < 1e-300.
    a, b = CohortSampler("poisson", 10**6, 100), CohortSampler("poisson", 10**6, 100)
    assert not a.seeded
    first = a.cohort(1)
    assert not np.array_equal(first, b.cohort(1))
    assert not np.array_equal(first, a.cohort(1))  # every call is a fresh draw, also for the same round


def test_million_clients_cohort_stays_small():
    # O(cohort) memory: a cohort from 10^9 clients must not allocate an array of 10^9.
    c = _seeded("poisson", 10**9, 20, 0).cohort(1)
    assert 0 < len(c) < 60
