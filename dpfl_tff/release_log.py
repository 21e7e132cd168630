"""The write-ahead privacy ledger of a run folder (`ledger.jsonl`) and its check against the other files.

One hash-chained line per released round (`LedgerLog`). The ledger is appended
and fsync'ed *before* a round's checkpoint and metrics are written, so it is
never behind what was released. Replaying it gives the number of releases and,
when it records cohorts, every client's participation count: all the
accountants (`privacy/ledgers.py`) need. Before a resume, `check_ledger_covers`
verifies it against every other file of the folder (checkpoint metas,
metrics.jsonl, summary.json); a damaged, shortened or deleted ledger refuses
the resume (`LedgerError`), never lowers the epsilon.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from dpfl_tff.errors import LedgerError
from dpfl_tff.outputs import append_whole, write_error

CHECKPOINTS = "checkpoints"
LEDGER = "ledger.jsonl"


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
