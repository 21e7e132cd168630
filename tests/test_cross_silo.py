"""The cross-silo split (issue 26): unequal sizes, label skew, every record once."""

import numpy as np
import pytest

from dpfl_tff.tasks.cross_silo import silo_split


def test_silo_split_sizes_skew_and_partition():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 100).astype(np.int32)
    x = np.arange(1000, dtype=np.float32)[:, None]
    silos = silo_split(x, y, 8, rng, size_ratio=8.0, alpha=0.5)
    sizes = [len(s) for s in silos]
    assert sum(sizes) == 1000 and len(silos) == 8
    assert max(sizes) >= 6 * min(sizes)
    assert sorted(np.concatenate([s.x[:, 0] for s in silos]).tolist()) == list(range(1000))
    # Label skew: some silo's top class is far above the uniform 10%.
    assert max(np.bincount(s.y, minlength=10).max() / len(s) for s in silos) > 0.3
    with pytest.raises(ValueError, match="num_silos must be in range"):
        silo_split(x, y, 3, rng)
