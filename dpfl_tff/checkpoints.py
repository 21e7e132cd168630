"""Checkpoints of the full training state, and the write-ahead privacy ledger.

Layout under the experiment folder:

  checkpoints/ckpt_000010/state.npz   every leaf of the TFF learning-process state
                                      (model, optimizer and aggregator state, e.g. the
                                      adaptive clip), in `tf.nest.flatten` order
  checkpoints/ckpt_000010/meta.json   round, sha256 of state.npz, the round's metrics record,
                                      the ledger's length and chain hash when it was written
  ledger.jsonl                        one hash-chained line per released round (`LedgerLog`)

A checkpoint folder is written under a temporary name and renamed, so a crash
never leaves a half-written `ckpt_*`; a checkpoint whose checksum does not
match is skipped (with a warning) in favour of the previous one. The client
sampler needs no state: cohorts are fresh draws (`sampling.py`).

The ledger is appended and fsync'ed *before* a round's checkpoint and metrics
are written, so it is never behind what was released. Replaying it gives the
number of releases and, when it records cohorts, every client's participation
count: all the accountants need. Before a resume, `check_ledger_covers`
verifies it against every other file of the folder; a damaged, shortened or
deleted ledger refuses the resume (`LedgerError`), never lowers the epsilon.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dpfl_tff.errors import CheckpointMismatch, LedgerError
from dpfl_tff.outputs import append_whole, write_error

CHECKPOINTS = "checkpoints"
LEDGER = "ledger.jsonl"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_START_FRESH = "it cannot be resumed; start afresh with --overwrite or another --output_dir"


def leaf_names(state: Any, weight_names: Sequence[str] = ()) -> list[str]:
    """state.npz's array names: each leaf's path in the state, the model's weights named after their variables.

    The state flattens (`tf.nest.flatten`) to the model's trainable then
    non-trainable weights first: those are `global_model_weights/trainable/dense/kernel`
    and so on (`weight_names`: `trainable/dense/kernel`, ..., from `models.weight_names`);
    the other leaves are named by their path (`aggregator/...`, `finalizer/...`).
    A name that would repeat gets `#k` appended.
    """
    try:  # TF's nest with paths (not in the public `tf.nest` of TF 2.14); the same order as `tf.nest.flatten`
        from tensorflow.python.util import nest as tf_nest

        paths = [path for path, _ in tf_nest.flatten_with_joined_string_paths(state)]
    except (ImportError, AttributeError):
        paths = [f"leaf_{i}" for i in range(len(tf.nest.flatten(state)))]
    for i, name in enumerate(weight_names[: len(paths)]):
        paths[i] = f"global_model_weights/{name}"
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        k = seen.get(path, 0)
        seen[path] = k + 1
        names.append(path if k == 0 else f"{path}#{k}")
    return names


def _stored_names(meta: dict[str, Any]) -> list[str]:
    """The arrays of a checkpoint's state.npz in state order: named (`leaf_names`), or `arr_0..` (older runs)."""
    return list(meta.get("leaf_names") or [f"arr_{i}" for i in range(int(meta["num_leaves"]))])


class CheckpointManager:
    """Saves and restores (round, learning-process state, record) in `root/checkpoints`.

    `weight_names` (set by the run: `models.weight_names`) names the model's
    arrays in state.npz; checkpoints written before arrays were named
    (`arr_0`, `arr_1`, ...) are read as well.
    """

    def __init__(self, root: str, keep: int = 2, warn: Callable[[str], None] = print):
        self.dir = os.path.join(root, CHECKPOINTS)
        self.keep = max(keep, 1)
        self.warn = warn
        self.weight_names: Sequence[str] = ()

    def rounds(self) -> list[int]:
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            if name.startswith("ckpt_") and name[5:].isdigit():
                found.append(int(name[5:]))
        return sorted(found)

    def save(self, round_num: int, state: Any, record: dict[str, Any], ledger: LedgerLog) -> None:
        """Writes the checkpoint of `round_num`; raises OSError naming the folder on failure.

        `ledger` (already holding round `round_num`) is recorded by length and
        chain hash, so that a resume can tell a ledger shortened since.
        """
        final = os.path.join(self.dir, f"ckpt_{round_num:06d}")
        tmp = os.path.join(self.dir, f".tmp_ckpt_{round_num:06d}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(state)]
            names = leaf_names(state, self.weight_names)
            state_path = os.path.join(tmp, "state.npz")
            # Built in memory, then written: a write that fails inside np.savez would leave its ZipFile to
            # complain about the closed file when collected ("Exception ignored in ZipFile.__del__").
            npz = io.BytesIO()
            np.savez(npz, **dict(zip(names, leaves)))
            with open(state_path, "wb") as f:
                f.write(npz.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            del npz
            meta = {
                "round": round_num, "num_leaves": len(leaves), "leaf_names": names, "sha256": _sha256(state_path),
                "record": record,
                "ledger_entries": ledger.count, "ledger_head": ledger.head,
            }
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(f"checkpoint of round {round_num}", self.dir, e) from e
        for old in self.rounds()[: -self.keep]:
            shutil.rmtree(os.path.join(self.dir, f"ckpt_{old:06d}"), ignore_errors=True)

    def _readable(self, round_num: int) -> dict[str, Any]:
        """meta.json of checkpoint `round_num` after checking state.npz's checksum; raises if unreadable."""
        path = os.path.join(self.dir, f"ckpt_{round_num:06d}")
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if _sha256(os.path.join(path, "state.npz")) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        return meta

    def check_fits(self, weights: list[Any], model_name: str) -> None:
        """Raises CheckpointMismatch unless the newest readable checkpoint starts with tensors shaped like `weights`.

        The learning-process state is flattened with the model's trainable then
        non-trainable weights first; `weights` are the Keras model's, in that
        order. Checked before a resume starts, so that a model whose code
        changed since the run began is refused with a clear message instead of
        failing inside the first round.
        """
        for round_num in reversed(self.rounds()):
            try:
                meta = self._readable(round_num)
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue  # load_latest warns about it and falls back
            path = os.path.join(self.dir, f"ckpt_{round_num:06d}")
            with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
                arrays = [z[n] for n in _stored_names(meta)[: len(weights)]]
            stored = [(tuple(a.shape), a.dtype.name) for a in arrays]
            wanted = [(tuple(w.shape), np.dtype(w.dtype.as_numpy_dtype if hasattr(w.dtype, "as_numpy_dtype")
                                               else w.dtype).name) for w in weights]
            if len(stored) < len(wanted):
                raise CheckpointMismatch(
                    f"checkpoint {path} holds {len(stored)} tensors, fewer than the {len(wanted)} weights of "
                    f"--model={model_name}: {_START_FRESH}"
                )
            for i, (a, b) in enumerate(zip(stored, wanted)):
                if a != b:
                    raise CheckpointMismatch(
                        f"checkpoint {path} does not fit --model={model_name}: weight {i} is {a[0]} {a[1]} there "
                        f"and {b[0]} {b[1]} in the model now (did the model's code change?): {_START_FRESH}"
                    )
            return

    def load_latest(self, template: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(round, state shaped like `template`, record) of the newest valid checkpoint, or None."""
        template_leaves = tf.nest.flatten(template)
        for round_num in reversed(self.rounds()):
            path = os.path.join(self.dir, f"ckpt_{round_num:06d}")
            try:
                meta = self._readable(round_num)
                with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
                    leaves = [z[n] for n in _stored_names(meta)]
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                self.warn(f"WARNING: checkpoint {path} is unreadable ({e}); falling back to the previous one")
                continue
            if len(leaves) != len(template_leaves) or any(
                    np.shape(a) != np.shape(b) for a, b in zip(leaves, template_leaves)):
                raise CheckpointMismatch(
                    f"checkpoint {path} does not fit the training state built now ({len(leaves)} tensors there, "
                    f"{len(template_leaves)} now, or shapes differ; did the model, optimizer or DP code change?): "
                    f"{_START_FRESH}"
                )
            return round_num, tf.nest.pack_sequence_as(template, leaves), meta["record"]
        return None


LEDGER_FORMAT = "dpfl_tff ledger v2"
_GENESIS = hashlib.sha256(LEDGER_FORMAT.encode()).hexdigest()


def _entry_hash(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256((prev + json.dumps(body, sort_keys=True)).encode()).hexdigest()


class LedgerLog:
    """Append-only, hash-chained log of released rounds (`ledger.jsonl`), fsync'ed per line.

    Line n (1-based) is one execution of a round whose outputs may have been
    released: `{"release": n, "round": r, "execution": k, ["cohort": [...]],
    "prev": h(n-1), "hash": h(n)}` with h(n) = sha256(h(n-1) + the line's
    other fields as sorted JSON) and h(0) = sha256("dpfl_tff ledger v2"). The
    chain makes every line its own checksum and fixes the order; a line is
    never rewritten. `cohort` is present only when the run records cohorts
    (`--log_cohorts`, or a mechanism whose ledger needs them: `PrivacyMechanism.ledger_needs_cohorts`).
    A ledger may add fields of its own (DP-FTRL: `epoch`, `tree`, `tree_round`; `Ledger.begin_round`).
    """

    def __init__(self, root: str):
        self.path = os.path.join(root, LEDGER)
        self.entries: list[dict[str, Any]] = []
        self._executions: collections.Counter = collections.Counter()

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else _GENESIS

    @property
    def count(self) -> int:
        return len(self.entries)

    def executions(self, round_num: int) -> int:
        """How many times round `round_num` has been released so far."""
        return self._executions[round_num]

    def load(self, needs_cohorts: bool) -> list[dict[str, Any]]:
        """Reads and verifies the whole file (missing file: no entry).

        Raises:
          LedgerError: a line is not intact JSON ending in a newline, breaks the
            chain, is out of order, or lacks the cohort that `needs_cohorts` asks for.
        """
        self.entries = []
        self._executions = collections.Counter()
        if not os.path.exists(self.path):
            return self.entries
        with open(self.path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        if lines[-1] != b"":
            raise LedgerError(f"{self.path}: line {len(lines)} is cut short (no end of line)")
        prev = _GENESIS
        for n, line in enumerate(lines[:-1], start=1):
            try:
                entry = json.loads(line)
                body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
                ok = (
                    isinstance(entry, dict) and entry.get("prev") == prev and entry.get("hash") == _entry_hash(prev, body)
                    and entry.get("release") == n and isinstance(entry.get("round"), int) and entry["round"] >= 1
                    and entry.get("execution") == self._executions[entry["round"]] + 1
                )
            except (ValueError, AttributeError, TypeError):
                ok = False
            if not ok:
                raise LedgerError(
                    f"{self.path}: line {n} is damaged (not the intact, hash-chained entry of release {n})"
                )
            if needs_cohorts and not isinstance(entry.get("cohort"), list):
                raise LedgerError(f"{self.path}: line {n} has no cohort, which this run's accounting needs")
            prev = entry["hash"]
            self.entries.append(entry)
            self._executions[entry["round"]] += 1
        return self.entries

    def append(self, round_num: int, cohort: Iterable[int] | None = None, fields: dict[str, Any] | None = None) -> None:
        """Appends and fsyncs the next execution of `round_num`; a failed write is cut back off the file.

        `fields`: the ledger's own fields of the round (`Ledger.begin_round`, e.g. DP-FTRL's tree).
        """
        round_num = int(round_num)
        body: dict[str, Any] = {
            **(fields or {}), "release": self.count + 1, "round": round_num, "execution": self._executions[round_num] + 1,
        }
        if cohort is not None:
            body["cohort"] = [int(c) for c in cohort]
        entry = {**body, "prev": self.head, "hash": _entry_hash(self.head, body)}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing left to fail on close
                append_whole(f, line)
        except OSError as e:
            raise write_error(LEDGER, os.path.dirname(self.path), e) from e
        self.entries.append(entry)
        self._executions[entry["round"]] += 1


def releases_recorded_elsewhere(root: str, checkpoints_dir: str) -> dict[str, Any]:
    """What the other files of a run folder say the ledger must hold.

    Returns a dict with `releases` (the most releases any file counts),
    `rounds` (round numbers that must each appear in the ledger), the sources
    of those figures for messages, and `heads` (release number -> chain hash
    recorded by a checkpoint).
    """
    need = {"releases": 0, "rounds": set(), "sources": [], "heads": {}, "metrics_rounds": {}}

    def note(n: int, source: str) -> None:
        if n > need["releases"]:
            need["releases"] = n
            need["sources"] = [source]
        elif n == need["releases"] and n:
            need["sources"].append(source)

    if os.path.isdir(checkpoints_dir):
        for name in sorted(os.listdir(checkpoints_dir)):
            if not (name.startswith("ckpt_") and name[5:].isdigit()):
                continue
            try:
                with open(os.path.join(checkpoints_dir, name, "meta.json"), encoding="utf-8") as f:
                    meta = json.load(f)
                n, head, r = int(meta["ledger_entries"]), str(meta["ledger_head"]), int(meta["round"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable checkpoint is skipped on resume; it proves nothing here
            note(n, f"{CHECKPOINTS}/{name}")
            need["heads"][n] = head
            need["rounds"].update(range(1, r + 1))
    try:
        with open(os.path.join(root, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    n, r = int(rec["rounds_accounted"]), int(rec["round"])
                except (ValueError, KeyError, TypeError):
                    continue
                note(n, "metrics.jsonl")
                need["metrics_rounds"][n] = r
    except OSError:
        pass
    try:
        with open(os.path.join(root, "summary.json"), encoding="utf-8") as f:
            note(int(json.load(f).get("rounds_accounted") or 0), "summary.json")
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return need


def check_ledger_covers(ledger: LedgerLog, root: str, checkpoints_dir: str) -> None:
    """Raises LedgerError unless the loaded ledger holds every release the run folder records.

    Every round a checkpoint holds must be in the ledger, the ledger must count
    at least as many releases as any checkpoint, metrics line or summary, and
    the chain hash a checkpoint recorded must match the ledger's line.
    """
    need = releases_recorded_elsewhere(root, checkpoints_dir)
    have = ledger.count
    what = "is missing" if not os.path.exists(ledger.path) else f"holds {have} release(s)"
    if need["releases"] > have:
        lacking = [need["metrics_rounds"].get(n) for n in range(have + 1, need["releases"] + 1)]
        named = sorted({r for r in lacking if r is not None})
        rounds = f" (round{'s' if len(named) > 1 else ''} {_ranges(named)})" if named else ""
        releases = _ranges(list(range(have + 1, need["releases"] + 1)))
        raise LedgerError(
            f"{ledger.path} {what}, but {' and '.join(need['sources'])} record {need['releases']}: "
            f"it lacks release{'s' if need['releases'] - have > 1 else ''} {releases}{rounds}"
        )
    present = {e["round"] for e in ledger.entries}
    missing = sorted(need["rounds"] - present)
    if missing:
        raise LedgerError(f"{ledger.path} {what}, but lacks round(s) {_ranges(missing)} that a checkpoint holds")
    for n, head in need["heads"].items():
        if n and ledger.entries[n - 1]["hash"] != head:
            raise LedgerError(f"{ledger.path}: release {n} differs from the one a checkpoint recorded")


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
