"""A cross-silo split: a few silos (5-20) of unequal size and label skew, for record-level DP (issue 26).

Silo sizes follow weights 1, r, r^2, ... (r = `size_ratio`^(1/(S-1)), so the
largest silo is `size_ratio` times the smallest); each silo's labels follow
its own Dirichlet(alpha) class mix. Every record goes to exactly one silo.
Not yet registered as a task (partial).
"""

from __future__ import annotations

import numpy as np

from dpfl_tff.tasks.base import ClientArrays


def silo_split(x: np.ndarray, y: np.ndarray, num_silos: int, rng: np.random.Generator, size_ratio: float = 8.0,
               alpha: float = 1.0, num_classes: int = 10) -> list[ClientArrays]:
    """Split (x, y) into `num_silos` silos of unequal size and label skew; every record used once."""
    if not 5 <= num_silos <= 20:
        raise ValueError(f"num_silos must be in range [5, 20]. Found {num_silos}.")
    n = y.shape[0]
    r = size_ratio ** (1.0 / (num_silos - 1))
    w = r ** np.arange(num_silos)
    sizes = np.floor(w / w.sum() * n).astype(int)
    sizes[-1] += n - sizes.sum()
    mix = rng.dirichlet(np.full(num_classes, alpha), size=num_silos)  # (S, K) class preferences
    pools = [list(rng.permutation(np.flatnonzero(y == k))) for k in range(num_classes)]
    silos: list[list[int]] = [[] for _ in range(num_silos)]
    for s in rng.permutation(num_silos):
        for _ in range(sizes[s]):
            p = mix[s] * np.array([len(pl) > 0 for pl in pools], float)
            k = rng.choice(num_classes, p=p / p.sum())
            silos[s].append(pools[k].pop())
    return [ClientArrays(x[np.array(ix)], y[np.array(ix)]) for ix in silos]
