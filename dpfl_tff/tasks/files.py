"""Data files that must be provided by the user: check first, fail fast and clearly."""

from __future__ import annotations

import os


class DataMissingError(FileNotFoundError):
    """A data file is not where the task looks for it. The message says how to get it."""


class DataFileError(ValueError):
    """A data file is there but not in the format its task reads.

    The message is one line: the file's path, what is wrong with it and, in
    parentheses, what was expected.
    """


def require_file(task: str, data_dir: str, name: str, how_to_get: str) -> str:
    """Returns data_dir/name, or raises DataMissingError naming the file, the folder and the fix.

    Checked before any loader runs: TFF's and Keras' loaders would otherwise
    try to download (with no timeout) and hang on a machine without network.
    """
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise DataMissingError(
            f"--task={task}: {name} not found in --data_dir={os.path.abspath(data_dir)}; "
            f"nothing is downloaded here. {how_to_get}"
        )
    return path
