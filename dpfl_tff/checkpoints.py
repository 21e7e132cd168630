"""Checkpoints of the full training state, and the write-ahead privacy ledger.

Layout under the experiment folder:

  checkpoints/ckpt_000010/state.npz   every leaf of the TFF learning-process state
                                      (model, optimizer and aggregator state, e.g. the
                                      adaptive clip), in `tf.nest.flatten` order
  checkpoints/ckpt_000010/meta.json   round, sha256 of state.npz, the round's metrics record
  ledger.jsonl                        one line per released round: round number and cohort

A checkpoint folder is written under a temporary name and renamed, so a crash
never leaves a half-written `ckpt_*`; a checkpoint whose checksum does not
match is skipped (with a warning) in favour of the previous one. The client
sampler needs no state: round r's cohort is a pure function of (seed, r).

The ledger is appended and fsync'ed *before* a round's metrics are written, so
it is never behind what was released. Replaying it gives the number of
releases and every client's participation count, which is all the accountants
need.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

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


class CheckpointManager:
    """Saves and restores (round, learning-process state, record) in `root/checkpoints`."""

    def __init__(self, root: str, keep: int = 2, warn: Callable[[str], None] = print):
        self.dir = os.path.join(root, CHECKPOINTS)
        self.keep = max(keep, 1)
        self.warn = warn

    def rounds(self) -> list[int]:
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            if name.startswith("ckpt_") and name[5:].isdigit():
                found.append(int(name[5:]))
        return sorted(found)

    def save(self, round_num: int, state: Any, record: dict[str, Any]) -> None:
        """Writes the checkpoint of `round_num`; raises OSError naming the folder on failure."""
        final = os.path.join(self.dir, f"ckpt_{round_num:06d}")
        tmp = os.path.join(self.dir, f".tmp_ckpt_{round_num:06d}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(state)]
            state_path = os.path.join(tmp, "state.npz")
            with open(state_path, "wb") as f:
                np.savez(f, *leaves)
                f.flush()
                os.fsync(f.fileno())
            meta = {"round": round_num, "num_leaves": len(leaves), "sha256": _sha256(state_path), "record": record}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                f"checkpoint of round {round_num} could not be written to {self.dir} ({e.strerror or e}); "
                "is the disk full or the folder read-only?"
            ) from e
        for old in self.rounds()[: -self.keep]:
            shutil.rmtree(os.path.join(self.dir, f"ckpt_{old:06d}"), ignore_errors=True)

    def load_latest(self, template: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(round, state shaped like `template`, record) of the newest valid checkpoint, or None."""
        n_template = len(tf.nest.flatten(template))
        for round_num in reversed(self.rounds()):
            path = os.path.join(self.dir, f"ckpt_{round_num:06d}")
            try:
                with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
                    meta = json.load(f)
                if _sha256(os.path.join(path, "state.npz")) != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                if meta["num_leaves"] != n_template:
                    raise ValueError(f"{meta['num_leaves']} tensors, the model has {n_template}")
                with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
                    leaves = [z[f"arr_{i}"] for i in range(meta["num_leaves"])]
                state = tf.nest.pack_sequence_as(template, leaves)
                return round_num, state, meta["record"]
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                self.warn(f"WARNING: checkpoint {path} is unreadable ({e}); falling back to the previous one")
        return None


class LedgerLog:
    """Append-only log of released rounds (`ledger.jsonl`), fsync'ed per line."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LEDGER)

    def entries(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line: that release never completed its write
        return out

    def append(self, round_num: int, cohort: Iterable[int]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": round_num, "cohort": [int(c) for c in cohort]}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replaces the log by `entries` atomically (drops a torn last line on resume)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
