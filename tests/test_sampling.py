import numpy as np

from dpfl_tff.sampling import sample_cohort


def test_poisson_cohort_size_is_binomial():
    # K ~ Binomial(N, q): mean N q = 50, variance N q (1 - q) = 47.5 for N=1000, m=50.
    n, m, rounds = 1000, 50, 4000
    sizes = np.array([len(sample_cohort("poisson", n, m, seed=0, round_num=r)) for r in range(1, rounds + 1)])
    var = n * (m / n) * (1 - m / n)
    # The sample mean has std sqrt(var/rounds) = 0.109; 5 sigma.
    assert abs(sizes.mean() - m) < 5 * np.sqrt(var / rounds)
    # The sample variance has relative std about sqrt(2/rounds) = 2.2%; 5 sigma.
    assert abs(sizes.var() / var - 1) < 5 * np.sqrt(2 / rounds)


def test_poisson_includes_each_client_with_probability_q():
    n, m, rounds = 40, 10, 4000
    counts = np.zeros(n)
    for r in range(1, rounds + 1):
        counts[sample_cohort("poisson", n, m, seed=1, round_num=r)] += 1
    q = m / n
    # Each count ~ Binomial(rounds, q): std = sqrt(4000 * .25 * .75) = 27.4; 5 sigma for all 40 clients.
    assert np.all(np.abs(counts - rounds * q) < 5 * np.sqrt(rounds * q * (1 - q)))


def test_uniform_draws_exactly_m_distinct_clients():
    for r in range(1, 50):
        c = sample_cohort("uniform", 30, 7, seed=2, round_num=r)
        assert len(c) == 7 == len(set(c.tolist())) and c.min() >= 0 and c.max() < 30


def test_cohorts_are_reproducible_per_round_and_vary_between_rounds():
    a = sample_cohort("poisson", 10**6, 100, seed=5, round_num=3)
    b = sample_cohort("poisson", 10**6, 100, seed=5, round_num=3)
    c = sample_cohort("poisson", 10**6, 100, seed=5, round_num=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() < 10**6


def test_million_clients_cohort_stays_small():
    # O(cohort) memory: a cohort from 10^9 clients must not allocate an array of 10^9.
    c = sample_cohort("poisson", 10**9, 20, seed=0, round_num=1)
    assert 0 < len(c) < 60
