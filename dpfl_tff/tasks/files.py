"""Data files that must be provided by the user (or fetched with --download): check first, fail fast and clearly."""

from __future__ import annotations

import os


from dpfl_tff.errors import DataFileError, DataMissingError

__all__ = ["DataFileError", "DataMissingError", "require_file"]


def require_file(task: str, data_dir: str, name: str, how_to_get: str) -> str:
    """Returns data_dir/name, or raises DataMissingError naming the file, the folder and the fix.

    Checked before any loader runs: TFF's and Keras' loaders would otherwise
    try to download (with no timeout, unverified) and hang on a machine
    without network. Only `--download` fetches (`tasks.download`, before loading).
    """
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise DataMissingError(
            f"--task={task}: {name} not found in --data_dir={_where(data_dir)}; "
            f"rerun with --download to fetch it (checksum-verified), or place it by hand: {how_to_get}"
        )
    return path


def _where(data_dir: str) -> str:
    """`data_dir` as an error names it: absolute, and said to be relative to the current folder if it was."""
    if os.path.isabs(data_dir):
        return data_dir
    return f"{data_dir} (relative to the current folder: {os.path.abspath(data_dir)})"
