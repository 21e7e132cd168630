"""Task registry: name -> loader of federated data (client split + test set).

`--task` is a registered name (`TASKS`) or `package.module:function` naming a
custom task function (`custom`), whose data is checked before training.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dpfl_tff.config import TaskConfig
from dpfl_tff.tasks.base import ClientArrays, FederatedData
from dpfl_tff.tasks.files import DataFileError, DataMissingError

TaskLoader = Callable[[TaskConfig, int], FederatedData]

# name -> "module:function" of its loader, imported when that task is loaded (some import TensorFlow: digits,
# synthetic, cifar10, cross_silo_digits and custom tasks load without it, so a dry run or the sweep's checks stay fast).
TASKS: dict[str, str] = {
    "digits": "digits:load",
    "synthetic": "synthetic:load",
    "emnist": "emnist:load",
    "cifar10": "cifar10:load",
    "cifar100": "cifar100:load",
    "shakespeare": "text:load_shakespeare",
    "stackoverflow": "text:load_stackoverflow",
    "cross_silo_digits": "cross_silo:load",
}


def loader(name: str) -> TaskLoader:
    """The loader of the registered task `name`."""
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(f"dpfl_tff.tasks.{module}"), function)


def load_task(cfg: TaskConfig, seed: int) -> FederatedData:
    """Loads the task named by `cfg.task` (registered or custom), split with `seed`."""
    if cfg.is_custom:
        from dpfl_tff.tasks import custom

        return custom.load(cfg, seed)
    return loader(cfg.task)(cfg, seed)


__all__ = ["TASKS", "ClientArrays", "DataFileError", "DataMissingError", "FederatedData", "load_task"]
