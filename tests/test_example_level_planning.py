"""--dp_level=example with many distinct record counts (issue 26): the vectorized RDP curves (`rdp_many`) against
dp-accounting's, and the record ledger's grouped computation against each client composed by hand. No timing here
(docs/performance.md has the figures)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dpfl_tff.privacy import example_level, rdp_many


@pytest.mark.parametrize("z", [0.5, 1.1, 2.0])
def test_vectorized_curves_are_dp_accountings_never_below(z):
    orders = rdp_lib.DEFAULT_RDP_ORDERS
    rates = [0.003, 0.05, 16 / 41, 0.93]
    got = rdp_many.poisson_gaussian_rdp(rates + [1.0, 0.0], z, orders)
    for q, curve in zip(rates, got):
        want = rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
        assert np.all(curve >= want), q  # each value raised by a bound on its own rounding
        # ... which is small: a relative 1e-5 (seen: 4.7e-6 at q = 0.003, z = 0.5, order 1.1), or 1e-10 absolute
        # for the tiniest values (order 1.1 at small q and large z)
        assert np.all(curve - want <= 1e-5 * want + 1e-10), q
    np.testing.assert_allclose(got[-2], np.asarray(orders) / (2 * z**2))  # q = 1: the Gaussian itself
    assert np.all(got[-1] == 0.0)
    assert np.all(np.isinf(rdp_many.poisson_gaussian_rdp([0.1], 0.0, orders)))


def _by_hand(counts, b, epochs, z, parts, delta):
    out = []
    for n, p in zip(counts, parts):
        if p == 0:
            out.append(0.0)
            continue
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(min(1.0, b / n), dp_accounting.GaussianDpEvent(z)),
                    epochs * math.ceil(n / b) * p)
        out.append(acc.get_epsilon(delta))
    return out


@pytest.mark.parametrize("vectorize_above", [0, example_level.VECTORIZE_ABOVE])
def test_grouped_ledger_equals_each_client_by_hand(monkeypatch, vectorize_above):
    # 0: every rate through rdp_many (as with thousands of distinct counts); the default: dp-accounting's curves.
    monkeypatch.setattr(example_level, "VECTORIZE_ABOVE", vectorize_above)
    counts, b, epochs, z, delta = [30, 100, 30, 400, 57, 100, 8], 10, 2, 1.1, 1e-5
    ledger = example_level.RecordLedger(counts, b, epochs, z, delta, "rdp")
    cohorts = [[0, 1, 2, 3, 4, 5, 6], [1, 5], [0, 2, 3], [3, 6]]
    for cohort in cohorts:
        ledger.commit(cohort)
    parts = [2, 2, 2, 3, 1, 2, 2]
    want = _by_hand(counts, b, epochs, z, parts, delta)
    got = ledger.epsilons()
    if vectorize_above == 0:
        assert all(g >= w for g, w in zip(got, want)), (got, want)  # never below the truth
        assert got == pytest.approx(want, rel=1e-6)
    else:
        assert got == pytest.approx(want, rel=1e-9)
    # Clients of equal counts and participations share one computation, hence one value.
    assert got[0] == got[2] and got[1] == got[5]
    assert ledger.summary_fields()["record_epsilon"] == max(got)
    planned = example_level.RecordLedger(counts, b, epochs, z, delta, "rdp").planned(4)
    assert planned["record_epsilon"] == pytest.approx(max(_by_hand(counts, b, epochs, z, [4] * 7, delta)),
                                                      rel=1e-6 if vectorize_above == 0 else 1e-9)


def test_many_distinct_counts_take_the_vectorized_curves():
    counts = list(range(20, 20 + example_level.VECTORIZE_ABOVE + 5))
    ledger = example_level.RecordLedger(counts, 20, 1, 1.3, 1e-6, "rdp")
    eps = ledger.epsilons({c: 3 for c in range(len(counts))})
    assert len(ledger._curves) == len(counts)  # all computed at once
    # Spot check the largest and the smallest rate by hand.
    for c in (0, len(counts) - 1):
        (want,) = _by_hand([counts[c]], 20, 1, 1.3, [3], 1e-6)
        assert eps[c] >= want and eps[c] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("q, z, alpha", [(0.003, 0.5, 1.1), (0.05, 0.5, 1.5), (0.2, 2.0, 3.0)])
def test_vectorized_curves_are_above_the_exact_integral(q, z, alpha):
    # A_alpha = E_{x ~ N(0, z^2)} [(1 - q + q exp((2x - 1) / (2 z^2)))^alpha] (Mironov, Talwar, Zhang 2019), by
    # mpmath at 40 digits. dp-accounting's loop can round below it (seen: a relative 4.7e-9 at the first case);
    # the vectorized curve is raised by a bound on its rounding, so it never is.
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    q_, z_, a_ = mp.mpf(q), mp.mpf(z), mp.mpf(alpha)
    a = mp.quad(lambda x: mp.npdf(x, 0, z_) * ((1 - q_) + q_ * mp.exp((2 * x - 1) / (2 * z_**2))) ** a_,
                [-mp.inf, -10, 0, 1, 10, 50, mp.inf])
    exact = float(mp.log(a) / (a_ - 1))
    (got,) = rdp_many.poisson_gaussian_rdp([q], z, [alpha])[0]
    assert exact <= got <= exact * (1 + 1e-5)
