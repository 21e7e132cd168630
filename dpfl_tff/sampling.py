"""Client sampling per round; must match what accounting assumes.

* `poisson`: every client joins independently with probability q = m / N.
  Drawn as K ~ Binomial(N, q) and then a uniform K-subset, which has exactly
  the same distribution, in O(K) time and memory.
* `uniform`: exactly m clients, uniformly without replacement.

Randomness comes from an explicit NumPy generator seeded from `--seed`
and the round number, so round r's cohort does not depend on earlier rounds
and a resumed run draws the same cohorts.
"""

from __future__ import annotations

import numpy as np


def _subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # Generator.choice without replacement uses Floyd's/tail-shuffle methods: O(k) when k << n.
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False))


def sample_cohort(scheme: str, num_clients: int, clients_per_round: int, seed: int, round_num: int) -> np.ndarray:
    """Client ids taking part in round `round_num` (1-based), sorted.

    Args:
      scheme: `poisson` or `uniform`.
      num_clients: N.
      clients_per_round: m, the expected (poisson) or exact (uniform) size.
      seed: experiment seed.
      round_num: round index; cohorts of different rounds are independent.
    """
    rng = np.random.default_rng([seed, 7, round_num])
    if scheme == "poisson":
        k = int(rng.binomial(num_clients, clients_per_round / num_clients))
        return _subset(rng, num_clients, k)
    if scheme == "uniform":
        return _subset(rng, num_clients, clients_per_round)
    raise ValueError(f"--client_sampling={scheme}: must be one of poisson, uniform")
