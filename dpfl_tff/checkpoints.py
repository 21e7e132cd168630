"""Checkpoints of the full training state (the write-ahead privacy ledger is `release_log.py`).

Layout under the experiment folder:

  checkpoints/ckpt_000010/state.npz   every leaf of the TFF learning-process state
                                      (model, optimizer and aggregator state, e.g. the
                                      adaptive clip), in `tf.nest.flatten` order
  checkpoints/ckpt_000010/meta.json   round, sha256 of state.npz, the round's metrics record,
                                      the ledger's length and chain hash when it was written

A checkpoint folder is written under a temporary name and renamed, so a crash
never leaves a half-written `ckpt_*`; a checkpoint whose checksum does not
match is skipped (with a warning) in favour of the previous one. The client
sampler needs no state: cohorts are fresh draws (`sampling.py`). The ledger's
length and head recorded in meta.json let `release_log.check_ledger_covers`
prove, before a resume, that the ledger holds every release a checkpoint does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpfl_tff.errors import CheckpointMismatch
from dpfl_tff.outputs import write_error
from dpfl_tff.release_log import CHECKPOINTS, LedgerLog


def _nest():
    """`tf.nest` (the state's leaf order), imported when a checkpoint is written or read, not with this module."""
    import tensorflow as tf

    return tf.nest


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
        paths = [f"leaf_{i}" for i in range(len(_nest().flatten(state)))]
    for i, name in enumerate(weight_names[: len(paths)]):
        paths[i] = f"global_model_weights/{name}"
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        k = seen.get(path, 0)
        seen[path] = k + 1
        names.append(path if k == 0 else f"{path}#{k}")
    return names


def stored_names(meta: dict[str, Any]) -> list[str]:
    """The arrays of a checkpoint's state.npz in state order: named (`leaf_names`), or `arr_0..` (older runs)."""
    return list(meta.get("leaf_names") or [f"arr_{i}" for i in range(int(meta["num_leaves"]))])


def _array_leaves(round_num: int, state: Any, weight_names: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """The state's leaves as arrays, and their names; raises (nothing written) if a leaf is not an array.

    A checkpoint holds numbers only (state.npz is read with `allow_pickle=False`). A leaf that is
    no array (e.g. a `runtime.ResidentState`, a handle of a state left in the TFF worker, which the
    round loop must fetch first) is a bug of the caller: `TypeError`, never a pickled object.
    """
    leaves = [np.asarray(leaf) for leaf in _nest().flatten(state)]
    names = leaf_names(state, weight_names)
    for name, leaf, raw in zip(names, leaves, _nest().flatten(state)):
        if leaf.dtype == object:
            raise TypeError(
                f"internal error: the checkpoint of round {round_num} got a {type(raw).__name__} as its leaf "
                f"{name}, not an array (a state left in the TFF worker is fetched before it is saved: "
                "runtime.fetch_state); nothing was written")
    return leaves, names


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
        leaves, names = _array_leaves(round_num, state, self.weight_names)
        final = os.path.join(self.dir, f"ckpt_{round_num:06d}")
        tmp = os.path.join(self.dir, f".tmp_ckpt_{round_num:06d}")
        try:
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
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
                arrays = [z[n] for n in stored_names(meta)[: len(weights)]]
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
        template_leaves = _nest().flatten(template)
        for round_num in reversed(self.rounds()):
            path = os.path.join(self.dir, f"ckpt_{round_num:06d}")
            try:
                meta = self._readable(round_num)
                with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
                    leaves = [z[n] for n in stored_names(meta)]
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
            return round_num, _nest().pack_sequence_as(template, leaves), meta["record"]
        return None
