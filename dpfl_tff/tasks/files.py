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
            f"--task={task}: {name} not found in --data_dir={os.path.abspath(data_dir)}; "
            f"rerun with --download to fetch it (checksum-verified), or place it by hand: {how_to_get}"
        )
    return path
