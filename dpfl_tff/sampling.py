"""Client sampling per round; must match what accounting assumes.

* `poisson`: every client joins independently with probability q = m / N.
  Drawn as K ~ Binomial(N, q) and then a uniform K-subset, which has exactly
  the same distribution, in O(K) time and memory.
* `uniform`: exactly m clients, uniformly without replacement.

Amplification by sampling holds only against someone who does not know who
took part. So cohorts are secret by default: `CohortSampler` draws them from a
generator seeded with 128 bits of OS entropy when the run starts (a resumed
run starts a new one), never from the public `--seed`. With `sampling_seed`
(tests, debugging) the cohort of the k-th execution of round r is a pure
function of (sampling_seed, r, k): reproducible, and a round re-run after a
resume (k = 2, 3, ...) still gets a cohort drawn independently of the first,
so no cohort is ever used twice and every execution is an independently
sampled round for the accountant.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("poisson", "uniform")


def _subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # Generator.choice without replacement uses Floyd's/tail-shuffle methods: O(k) when k << n.
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False))


def draw_cohort(scheme: str, num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted client ids of one round drawn with `rng`.

    Args:
      scheme: `poisson` or `uniform`.
      num_clients: N.
      clients_per_round: m, the expected (poisson) or exact (uniform) size.
      rng: the randomness; it must be secret for amplification by sampling.
    """
    if scheme == "poisson":
        k = int(rng.binomial(num_clients, clients_per_round / num_clients))
        return _subset(rng, num_clients, k)
    if scheme == "uniform":
        return _subset(rng, num_clients, clients_per_round)
    raise ValueError(f"--client_sampling={scheme}: must be one of {', '.join(SCHEMES)}")


class CohortSampler:
    """Draws the cohort of every executed round.

    Args:
      scheme, num_clients, clients_per_round: as `draw_cohort`.
      sampling_seed: None (default): a fresh PCG64 generator seeded from OS
        entropy (`numpy.random.SeedSequence()`), whose draws are never
        written anywhere unless the run is asked to log cohorts. An integer:
        the cohort of execution k of round r is drawn from
        `default_rng([sampling_seed, 7, r, k])`; anyone who knows the seed
        knows every cohort.
    """

    def __init__(self, scheme: str, num_clients: int, clients_per_round: int, sampling_seed: int | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"--client_sampling={scheme}: must be one of {', '.join(SCHEMES)}")
        self.scheme = scheme
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.sampling_seed = sampling_seed
        self._secret = None if sampling_seed is not None else np.random.default_rng(np.random.SeedSequence())

    @property
    def seeded(self) -> bool:
        return self.sampling_seed is not None

    def cohort(self, round_num: int, execution: int = 1) -> np.ndarray:
        """Cohort of the `execution`-th run (1-based) of round `round_num` (1-based).

        Unseeded, every call is a fresh draw: call it once per executed round.
        """
        if self._secret is not None:
            rng = self._secret
        else:
            rng = np.random.default_rng([self.sampling_seed, 7, int(round_num), int(execution)])
        return draw_cohort(self.scheme, self.num_clients, self.clients_per_round, rng)
