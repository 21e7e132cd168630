"""Client-update hooks: the seam between a client's local training and its update's preprocessing.

In the grouped process (`grouped_fedavg.py`) every client of a round runs

    delta, stats = hook.client_update(weights, group, i, train, stats)
    record = query.preprocess_record(params, delta)        (clip, local noise)

where `train()` is the client's local SGD (returning its delta and the
group's statistics updated). A hook may replace the delta (the audit's canary
clients, `audit.canaries.CanaryHook`, submit a fixed direction instead of
training), or transform it (a client-side quantize step would), and may add
per-client fields to the round's group values (`group_fields`,
`group_entries`) and mark clients that have no examples (`has_data`).
Whatever it returns still goes through the mechanism's `preprocess_record`,
so the mechanism's guarantee is unchanged: a hook runs on the client, before
clipping. Without a hook (`None`) the client's update is `train()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ClientUpdateHook:
    """The identity hook: every client has data and submits its trained delta. Subclass to change a part."""

    def group_fields(self) -> list[tuple[str, Any]]:
        """Extra per-client fields of a group value: (name, `tff.TensorType` with a leading client axis)."""
        return []

    def group_entries(self, client_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Host side: the extra fields' values for the clients `client_ids` of one group (same order)."""
        del client_ids
        return {}

    def has_data(self, client_id: int) -> bool:
        """Whether client `client_id` has examples (False: no data is read or shipped for it)."""
        del client_id
        return True

    def client_update(self, weights, group, i, train: Callable[[], tuple[Sequence[Any], Any]], stats):
        """In the worker's graph: client `i` of `group`'s (delta, stats); `train()` runs its local SGD."""
        del weights, group, i, stats
        return train()
