"""A cross-silo split: a few silos (5-20) of unequal size and label skew, for record-level DP (issue 26).

Silo sizes follow weights 1, r, r^2, ... (r = `size_ratio`^(1/(S-1)), so the
largest silo is `size_ratio` times the smallest); each silo's labels follow
its own Dirichlet(alpha) class mix. Every record goes to exactly one silo.
`load` is the task `cross_silo_digits`: the offline digits' training split
into `--num_clients` silos (alpha = --dirichlet_alpha), for record-level DP
(`--dp_level=example`).
"""

from __future__ import annotations

import numpy as np

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData

SIZE_RATIO = 8.0  # the largest silo holds 8x the records of the smallest


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


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    """`cross_silo_digits`: sklearn's digits (as the `digits` task holds out its test set) in 5-20 silos."""
    from dpfl_tff.tasks import digits

    base = digits.load(cfg, seed)  # its split into clients is discarded; the held-out test set is the same
    x = np.concatenate([c.x for c in base.clients])
    y = np.concatenate([c.y for c in base.clients])
    silos = silo_split(x, y, cfg.num_clients, np.random.default_rng([seed, 26]), SIZE_RATIO, cfg.dirichlet_alpha)
    sizes = sorted(len(s) for s in silos)
    return FederatedData(
        clients=silos, test=base.test, input_shape=base.input_shape, num_classes=base.num_classes,
        description=(f"sklearn digits in {cfg.num_clients} silos (cross-silo: {sizes[0]}..{sizes[-1]} records each, "
                     f"label skew dirichlet(alpha={cfg.dirichlet_alpha:g})): {y.shape[0]} train examples, "
                     f"{base.test.y.shape[0]} test"),
    )
