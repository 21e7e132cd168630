"""Task registry: name -> loader of federated data (client split + test set).

`--task` is a registered name (`TASKS`) or `package.module:function` naming a
custom task function (`custom`), whose data is checked before training.
"""

from __future__ import annotations

from collections.abc import Callable

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks import cifar10, cifar100, cross_silo, custom, digits, emnist, synthetic, text
from dpfl_tff.tasks.base import ClientArrays, FederatedData
from dpfl_tff.tasks.files import DataFileError, DataMissingError

TaskLoader = Callable[[TaskConfig, int], FederatedData]

TASKS: dict[str, TaskLoader] = {
    "digits": digits.load,
    "synthetic": synthetic.load,
    "emnist": emnist.load,
    "cifar10": cifar10.load,
    "cifar100": cifar100.load,
    "shakespeare": text.load_shakespeare,
    "stackoverflow": text.load_stackoverflow,
    "cross_silo_digits": cross_silo.load,
}


def load_task(cfg: TaskConfig, seed: int) -> FederatedData:
    """Loads the task named by `cfg.task` (registered or custom), split with `seed`."""
    if cfg.is_custom:
        return custom.load(cfg, seed)
    return TASKS[cfg.task](cfg, seed)


__all__ = ["TASKS", "ClientArrays", "DataFileError", "DataMissingError", "FederatedData", "load_task"]
