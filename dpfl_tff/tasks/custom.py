"""`--task=package.module:function`: a user's function provides the federated data, checked before training.

The function takes keyword arguments, only those it names among `ARGS`:

  data_dir     str         --data_dir (where its files are)
  num_clients  int         --num_clients (use it to split into that many clients, or ignore it)
  seed         int         --seed (for any random split or shuffle of the function's own)
  config       TaskConfig  every task flag

(or `**kwargs` for all four) and returns a `dpfl_tff.tasks.FederatedData`:
one `ClientArrays(x, y)` per client, a central test set, the input shape and
the class count. Its clients are the clients: N, for sampling and for the
privacy accounting, is their number (`plan.prepare` sets it), whatever
--num_clients says.

`load` checks everything a run relies on before anything is trained:
features float32 of shape (n, *input_shape) and finite, labels int32 of
shape (n,) in [0, num_classes), at least one example per client and in the
test set, at least one client, num_classes >= 2. Any failure (import,
missing function, a signature that cannot take the keyword arguments, an
exception inside the function, a wrong return value) raises `ConfigError`:
one line naming the function and what is wrong.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import numpy as np

from dpfl_tff.config import TaskConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.tasks.base import ClientArrays, FederatedData
from dpfl_tff.user_code import import_function, one_line

ARGS = ("data_dir", "num_clients", "seed", "config")


def resolve(name: str) -> Callable[..., FederatedData]:
    """The function named by `--task=package.module:function`.

    Raises:
      ConfigError: the module fails to import, has no such function, or the
        function requires a parameter outside `ARGS`.
    """
    fn = import_function("task", name)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn  # no signature to read (e.g. a builtin): the call tells
    wrong = [p.name for p in params if p.default is p.empty and (
        p.kind is p.POSITIONAL_ONLY or (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ARGS))]
    if wrong:
        raise ConfigError(
            f"--task={name}: {name.partition(':')[2]}{inspect.signature(fn)} must take only keyword arguments among "
            f"{', '.join(ARGS)}; it requires {', '.join(wrong)}"
        )
    return fn


def _arguments(fn: Callable, cfg: TaskConfig, seed: int) -> dict:
    values = {"data_dir": cfg.data_dir, "num_clients": cfg.num_clients, "seed": seed, "config": cfg}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return values
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params and params[k].kind is not params[k].POSITIONAL_ONLY}


def load(cfg: TaskConfig, seed: int) -> FederatedData:
    """Calls the custom task function of `cfg.task` and returns its data, checked (see the module docstring)."""
    fn = resolve(cfg.task)
    try:
        data = fn(**_arguments(fn, cfg, seed))
    except Exception as e:  # noqa: BLE001  (whatever the user's code raises becomes one line)
        raise ConfigError(f"--task={cfg.task}: the function failed ({type(e).__name__}: {one_line(e)})") from e
    return validate(cfg.task, data)


def validate(name: str, data: object) -> FederatedData:
    """`data` with its input shape as a tuple and a description, or ConfigError naming what is wrong."""
    if not isinstance(data, FederatedData):
        raise ConfigError(f"--task={name}: returned {type(data).__name__}, not a dpfl_tff.tasks.FederatedData")
    shape = data.input_shape
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(f"--task={name}: input_shape={shape!r}; must be a non-empty tuple of positive integers")
    shape = tuple(int(d) for d in shape)
    classes = data.num_classes
    if not isinstance(classes, (int, np.integer)) or isinstance(classes, bool) or classes < 2:
        raise ConfigError(f"--task={name}: num_classes={classes!r}; must be an integer >= 2")
    clients = data.clients
    if not isinstance(clients, Sequence) or len(clients) == 0:
        raise ConfigError(f"--task={name}: clients must be a non-empty sequence (e.g. a list) of ClientArrays, "
                          f"got {type(clients).__name__}{' of length 0' if isinstance(clients, Sequence) else ''}")
    for i in range(len(clients)):
        _check_arrays(name, f"client {i}", clients[i], shape, int(classes))
    _check_arrays(name, "test set", data.test, shape, int(classes))
    examples = sum(len(c) for c in clients)
    description = data.description if isinstance(data.description, str) and data.description else (
        f"custom task {name}: {len(clients)} clients, {examples} training examples, {len(data.test)} test")
    return dataclasses.replace(data, input_shape=shape, num_classes=int(classes), description=description)


def _check_arrays(name: str, where: str, c: object, shape: tuple[int, ...], classes: int) -> None:
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"--task={name}: {where}: {problem}")

    if not isinstance(c, ClientArrays):
        raise bad(f"is a {type(c).__name__}, not a dpfl_tff.tasks.ClientArrays(x, y)")
    x, y = c.x, c.y
    for label, a in (("x", x), ("y", y)):
        if not isinstance(a, np.ndarray):
            raise bad(f"{label} is a {type(a).__name__}, not a numpy array")
    if x.dtype != np.float32:
        raise bad(f"x has dtype {x.dtype}; must be float32 (x.astype(np.float32))")
    if y.dtype != np.int32:
        raise bad(f"y has dtype {y.dtype}; must be int32 (y.astype(np.int32))")
    if y.ndim != 1:
        raise bad(f"y has shape {y.shape}; must be (n,), one label per example")
    if y.shape[0] == 0:
        raise bad("no examples; every client and the test set need at least one")
    if x.shape != (y.shape[0], *shape):
        raise bad(f"x has shape {x.shape}; must be {(y.shape[0], *shape)} for {y.shape[0]} labels and "
                  f"input_shape={shape}")
    if not np.isfinite(x).all():
        raise bad(f"{int(np.size(x) - np.isfinite(x).sum())} non-finite feature value(s) (NaN or inf)")
    if y.min() < 0 or y.max() >= classes:
        raise bad(f"labels must be in [0, {classes}) (num_classes={classes}); found min {y.min()}, max {y.max()}")
