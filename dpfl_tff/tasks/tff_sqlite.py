"""Tasks read through TFF's own loaders (SQLite files of `tff.simulation.datasets`).

Clients are loaded lazily, once each (cached in memory), so a round costs only
its cohort's first visit: the file is never re-read per round.

A file that is not in TFF's format raises `DataFileError` naming the file,
what is wrong with it and what was expected, instead of the SQLite or
TensorFlow error of the loader.
"""

from __future__ import annotations

import os
import pathlib
import re
import sqlite3
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_federated.python.simulation.datasets.sql_client_data import DatabaseFormatError

from dpfl_tff.tasks.base import ClientArrays
from dpfl_tff.tasks.files import DataFileError

Preprocess = Callable[[dict], tuple[tf.Tensor, tf.Tensor]]

# The tables and columns TFF's `SqlClientData` reads.
SCHEMA = {
    "client_metadata": ("client_id", "split_name"),
    "examples": ("client_id", "serialized_example_proto", "split_name"),
}


def _connect_read_only(path: str) -> sqlite3.Connection:
    return sqlite3.connect(pathlib.Path(path).absolute().as_uri() + "?mode=ro", uri=True)


def _what_is_wrong(path: str) -> str:
    """Why TFF's loader could not read the SQLite file at `path`."""
    try:
        con = _connect_read_only(path)
    except sqlite3.Error as e:
        return f"cannot be opened as an SQLite database ({e})"
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        problems = []
        missing = sorted(set(SCHEMA) - tables)
        if missing:
            problems.append(f"missing table(s) {', '.join(missing)}")
        for table in sorted(set(SCHEMA) & tables):
            columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            lacking = sorted(set(SCHEMA[table]) - columns)
            if lacking:
                problems.append(f"table {table} lacks column(s) {', '.join(lacking)}")
    except sqlite3.DatabaseError as e:
        return "not an SQLite database" if "not a database" in str(e) else f"unreadable SQLite database ({e})"
    finally:
        con.close()
    return "not in TFF's SQLite format: " + "; ".join(problems) if problems else ""


def _no_clients(path: str, split: str, expected: str) -> DataFileError:
    con = _connect_read_only(path)
    try:
        found = sorted(str(r[0]) for r in con.execute("SELECT DISTINCT split_name FROM client_metadata"))
    finally:
        con.close()
    return DataFileError(
        f"{path}: no clients in split '{split}'; "
        f"{'splits found: ' + ', '.join(found) if found else 'no split found'} ({expected})"
    )


def load_client_data(path: str, load_data: Callable[[], tuple], splits: tuple[str, str], expected: str) -> tuple:
    """Runs TFF's `load_data()` on the file at `path`; returns its (train, test) `ClientData`.

    Args:
      path: the file `load_data` reads (checked to exist by the caller).
      load_data: TFF's loader, called with no arguments.
      splits: the (train, test) split names the loader reads, for messages.
      expected: what the file should be, e.g. "expected TFF's EMNIST file, ...".

    Raises:
      DataFileError: if the file is empty, not an SQLite database, lacks TFF's
        tables or columns, or has no client in one of `splits`.
    """
    if os.path.isdir(path):
        raise DataFileError(f"{path}: a folder, not a file ({expected})")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: empty file ({expected})")
    try:
        data = load_data()
    except (sqlite3.DatabaseError, DatabaseFormatError) as e:
        problem = _what_is_wrong(path) or f"cannot be read by TFF's loader ({type(e).__name__}: {' '.join(str(e).split())})"
        raise DataFileError(f"{path}: {problem} ({expected})") from e
    except StopIteration as e:  # TFF's `preprocess` takes the first client id of each split
        train, test = splits
        con = _connect_read_only(path)
        try:
            has_train = con.execute("SELECT 1 FROM client_metadata WHERE split_name = ? LIMIT 1", (train,)).fetchone()
        finally:
            con.close()
        raise _no_clients(path, test if has_train else train, expected) from e
    for split, client_data in zip(splits, data):
        if not client_data.client_ids:
            raise _no_clients(path, split, expected)
    return data


def _to_arrays(ds: tf.data.Dataset, preprocess: Preprocess, where: str, expected: str) -> ClientArrays:
    """The examples of `ds`, preprocessed; `where` (file, split, client) and `expected` go into errors."""
    xs, ys = [], []
    try:
        for x, y in ds.map(preprocess).batch(4096):
            xs.append(x.numpy())
            ys.append(y.numpy())
    except tf.errors.OpError as e:
        # TF's message: "{{function_node ...}} Could not parse example input, value: '<bytes>'".
        cause = re.sub(r"^\{\{[^}]*\}\}\s*", "", (e.message or "").strip()).split(", value:")[0]
        cause = cause.splitlines()[0][:200] if cause.strip() else type(e).__name__
        raise DataFileError(f"{where}: examples cannot be read ({cause}) ({expected})") from e
    if not xs:
        raise DataFileError(f"{where}: no examples ({expected})")
    return ClientArrays(np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32))


class LazyClients(Sequence):
    """Client i = client_ids[i] of a `tff.simulation.datasets.ClientData`, loaded on first use.

    A client whose examples do not parse, or who has none, raises
    `DataFileError` naming `path`, `split` and the client, then `expected`.
    """

    def __init__(self, client_data, preprocess: Preprocess, path: str, split: str, expected: str):
        self._data = client_data
        self._ids = list(client_data.client_ids)
        self._preprocess = preprocess
        self._where = f"{path}: split '{split}'"
        self._expected = expected
        self._cache: dict[int, ClientArrays] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i not in self._cache:
            self._cache[i] = _to_arrays(
                self._data.create_tf_dataset_for_client(self._ids[i]), self._preprocess,
                f"{self._where}, client '{self._ids[i]}'", self._expected,
            )
        return self._cache[i]


def all_clients_arrays(client_data, preprocess: Preprocess, path: str, split: str, expected: str) -> ClientArrays:
    """Every example of every client, e.g. a central test set (errors as `LazyClients`')."""
    return _to_arrays(
        client_data.create_tf_dataset_from_all_clients(), preprocess, f"{path}: split '{split}'", expected
    )
