"""Functions a user names on the command line as `package.module:function` (`--model`, `--task`)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from dpfl_tff.errors import ConfigError


def one_line(e: BaseException) -> str:
    """An exception's message on one line (at most 300 characters), for a one-line error."""
    return " ".join(str(e).split())[:300]


def import_function(flag: str, name: str) -> Callable:
    """The callable `name` = `package.module:function` names.

    Raises:
      ConfigError (one line, starting `--flag=name:`): no `:`, a module that
        fails to import (any exception of its import), or no such callable.
    """
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--{flag}={name}: give a function as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any import-time failure of user code)
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name and module_name.startswith(e.name):
            hint = (f"; {module_name} is imported from the current folder ({os.getcwd()}) and PYTHONPATH: run from the "
                    f"folder that holds {module_name.split('.')[0]}, or add its parent to PYTHONPATH")
        raise ConfigError(
            f"--{flag}={name}: cannot import {module_name} ({type(e).__name__}: {one_line(e)}){hint}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--{flag}={name}: {module_name} has no function {attr}")
    return fn
