"""Clients of a TFF SQLite file streamed from disk: only client ids and counts in memory.

TFF's `SqlClientData` reads a client with `SELECT serialized_example_proto
FROM examples WHERE client_id = ? and split_name = ?`; TFF's files have no
SQL index (`sql_client_data_utils.save_to_sql_client_data` creates none), so
each such query scans the whole table: O(N) per client. Here a per-client
index of the file is built once (`ClientIndex`: one scan of the `examples`
table's rowid, split and client columns, resumable, with a progress line)
into `<file>.index.sqlite` next to the file; a client's rows are then read
by rowid range, so a round reads only its cohort's rows (O(m)).

The file is checked first (`check_file`): a folder, an empty, non-SQLite,
truncated (shorter than its header's page count says) or wrong-schema file,
and client counts that disagree with `client_metadata.num_examples`, raise
`DataFileError` naming the file, what is wrong and what was expected.
"""

from __future__ import annotations

import collections
import os
import pathlib
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from dpfl_tff.tasks.base import ClientArrays
from dpfl_tff.tasks.files import DataFileError

# The tables and columns TFF's files have (`sql_client_data_utils.save_to_sql_client_data`'s DDL).
SCHEMA = {
    "client_metadata": ("client_id", "num_examples", "split_name"),
    "examples": ("client_id", "serialized_example_proto", "split_name"),
}
INDEX_SUFFIX = ".index.sqlite"
INDEX_VERSION = "1"
_SCAN_BATCH = 200_000  # rows between two commits of the index build (the resume point)
PROGRESS_SECONDS = 5.0

Reader = Callable[[list[bytes], str], ClientArrays]  # (serialized examples, where) -> arrays


def _connect_read_only(path: str) -> sqlite3.Connection:
    return sqlite3.connect(pathlib.Path(path).absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False)


def check_file(path: str, expected: str) -> None:
    """Raises DataFileError unless `path` is a complete SQLite file with TFF's tables and columns."""
    if os.path.isdir(path):
        raise DataFileError(f"{path}: a folder, not a file ({expected})")
    size = os.path.getsize(path)
    if size == 0:
        raise DataFileError(f"{path}: empty file ({expected})")
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        raise DataFileError(f"{path}: not an SQLite database ({expected})")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and page_size * pages > size:
        raise DataFileError(
            f"{path}: truncated: {size:,} bytes, its header says {page_size * pages:,} (an interrupted download or "
            f"copy? fetch it again) ({expected})"
        )
    try:
        con = _connect_read_only(path)
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
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise DataFileError(f"{path}: unreadable SQLite database ({e}) ({expected})") from e
    if problems:
        raise DataFileError(f"{path}: not in TFF's SQLite format: {'; '.join(problems)} ({expected})")


class ClientIndex:
    """Where each client's rows are in a TFF SQLite file: runs of consecutive rows (`<file>.index.sqlite`).

    Built by one scan of `examples` in rowid order; a run is a maximal stretch
    of consecutive rows of one (split, client), so `rowid BETWEEN first AND
    last` returns exactly its rows. The build commits every `_SCAN_BATCH` rows
    with the rowid reached, so an interrupted build resumes there; the index
    records the file's size and modification time and is rebuilt if they change.
    """

    def __init__(self, path: str, splits: Sequence[str], expected: str, log: Callable[[str], None] | None = None):
        self.path, self.index_path, self.expected = path, path + INDEX_SUFFIX, expected
        self.splits = tuple(splits)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._build()
        self._index = _connect_read_only(self.index_path)
        self._source = _connect_read_only(path)

    def _stamp(self) -> dict[str, str]:
        st = os.stat(self.path)
        return {"version": INDEX_VERSION, "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns),
                "splits": ",".join(self.splits)}

    def _build(self) -> None:
        stamp = self._stamp()
        try:
            idx = sqlite3.connect(self.index_path)
            idx.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        except sqlite3.Error as e:
            raise DataFileError(
                f"{self.index_path}: cannot write the per-client index of {self.path} ({e}); the text tasks write it "
                "once next to their file: make --data_dir writable"
            ) from e
        try:
            meta = dict(idx.execute("SELECT key, value FROM meta"))
            if any(meta.get(k) != v for k, v in stamp.items()):
                idx.executescript("DROP TABLE IF EXISTS runs; DELETE FROM meta;")
                meta = {}
            if meta.get("complete") == "1":
                return
            idx.execute("CREATE TABLE IF NOT EXISTS runs (split_name TEXT, client_id TEXT, first INTEGER, "
                        "last INTEGER, n INTEGER)")
            with idx:
                idx.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", stamp.items())
            self._scan(idx, int(meta.get("scanned_to", "0")))
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
                raise DataFileError(f"{self.index_path}: cannot write the per-client index ({e}): make --data_dir "
                                    "writable") from e
            raise DataFileError(f"{self.path}: cannot be read ({e}): damaged or truncated? ({self.expected})") from e
        finally:
            idx.close()

    def _scan(self, idx: sqlite3.Connection, start: int) -> None:
        src = _connect_read_only(self.path)
        try:
            top = src.execute("SELECT max(rowid) FROM examples").fetchone()[0] or 0
            if start == 0:
                self._log(f"{self.path}: building its per-client index once ({top:,} rows) into {self.index_path}")
            else:
                self._log(f"{self.path}: resuming its per-client index at row {start:,} of {top:,}")
            cursor = src.execute("SELECT rowid, split_name, client_id FROM examples WHERE rowid > ? ORDER BY rowid",
                                 (start,))
            wanted, run, last_log = set(self.splits), None, time.monotonic()
            while True:
                rows = cursor.fetchmany(_SCAN_BATCH)
                if not rows:
                    break
                out = []
                for rowid, split, client in rows:
                    if run is not None and run[0] == split and run[1] == client:
                        run[3], run[4] = rowid, run[4] + 1
                        continue
                    if run is not None:
                        out.append(run)
                    run = [split, client, rowid, rowid, 1] if split in wanted else None
                if run is not None:  # the resume point must not hold half a run
                    out.append(run)
                    run = None
                with idx:
                    idx.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", out)
                    idx.execute("INSERT OR REPLACE INTO meta VALUES ('scanned_to', ?)", (str(rows[-1][0]),))
                if time.monotonic() - last_log >= PROGRESS_SECONDS:
                    last_log = time.monotonic()
                    self._log(f"{self.path}: index {rows[-1][0]:,} of {top:,} rows ({rows[-1][0] / max(top, 1):.0%})")
            with idx:
                idx.execute("CREATE INDEX IF NOT EXISTS runs_by_client ON runs (split_name, client_id)")
                idx.execute("INSERT OR REPLACE INTO meta VALUES ('complete', '1')")
        finally:
            src.close()

    def counts(self, split: str) -> dict[str, int]:
        """client id -> rows in `examples`, for `split`."""
        return dict(self._index.execute(
            "SELECT client_id, sum(n) FROM runs WHERE split_name = ? GROUP BY client_id", (split,)))

    def rows(self, split: str, client: str) -> list[bytes]:
        """The client's serialized examples, in the file's order (TFF's query's order)."""
        with self._lock:
            runs = self._index.execute("SELECT first, last FROM runs WHERE split_name = ? AND client_id = ? "
                                       "ORDER BY first", (split, client)).fetchall()
            out = []
            for first, last in runs:
                out += [r[0] for r in self._source.execute(
                    "SELECT serialized_example_proto FROM examples WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                    (first, last))]
            return out


def client_ids_and_counts(index: ClientIndex, split: str) -> tuple[list[str], np.ndarray]:
    """The split's client ids (sorted, as TFF's `SqlClientData.client_ids`) and their example counts.

    Raises:
      DataFileError: no client in the split, or a client whose rows differ from
        `client_metadata.num_examples` (a truncated or damaged file).
    """
    con = _connect_read_only(index.path)
    try:
        meta = dict(con.execute("SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (split,)))
        if not meta:
            found = sorted(str(r[0]) for r in con.execute("SELECT DISTINCT split_name FROM client_metadata"))
            raise DataFileError(
                f"{index.path}: no clients in split '{split}'; "
                f"{'splits found: ' + ', '.join(found) if found else 'no split found'} ({index.expected})")
    finally:
        con.close()
    counts = index.counts(split)
    ids = sorted(meta)
    for c in ids:
        if counts.get(c, 0) != meta[c]:
            raise DataFileError(
                f"{index.path}: split '{split}', client '{c}': client_metadata says {meta[c]} examples, the examples "
                f"table holds {counts.get(c, 0)} (a damaged or truncated file?) ({index.expected})")
    extra = sorted(set(counts) - set(meta))
    if extra:
        raise DataFileError(f"{index.path}: split '{split}': client '{extra[0]}' has examples but no client_metadata "
                            f"row ({index.expected})")
    return ids, np.asarray([meta[c] for c in ids], np.int64)


class StreamedClients(Sequence):
    """Client i = ids[i] of one split, read from the file when asked (a small cache of recent clients).

    `sizes[i]` is client i's number of examples after preprocessing, known
    without reading it. Only the ids, the sizes and the cache are in memory.
    """

    CACHE = 256  # clients kept after a read (a round asks for a client's arrays more than once)

    def __init__(self, index: ClientIndex, split: str, ids: Sequence[str], sizes: np.ndarray, reader: Reader):
        self._index, self._split, self._ids, self.sizes = index, split, list(ids), np.asarray(sizes, np.int64)
        self._reader = reader
        self._cache: collections.OrderedDict[int, ClientArrays] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def client_id(self, i: int) -> str:
        return self._ids[i]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        where = f"{self._index.path}: split '{self._split}', client '{self._ids[i]}'"
        arrays = self._reader(self._index.rows(self._split, self._ids[i]), where)
        if len(arrays) != self.sizes[i]:
            raise DataFileError(f"{where}: {len(arrays)} examples after preprocessing, {self.sizes[i]} expected "
                                f"({self._index.expected})")
        self._cache[i] = arrays
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return arrays
