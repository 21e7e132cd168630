"""The experiment folder: hparams, per-round metrics, summary, TensorBoard, worker log.

Files (all under `output_dir`):
  hparams.json   resolved configuration of the run (every flag that matters)
  metrics.jsonl  one JSON object per completed round, flushed as written
  summary.json   final figures; also written when a run stops early
  ledger.jsonl   the privacy ledger (see `release_log.py`); lists cohorts only with
                 --log_cohorts or under local DP
  checkpoints/   full training state every --checkpoint_every rounds
  tensorboard/   TensorBoard event files
  run.png        test accuracy and epsilon per round
  final_model.keras  the trained model after the last completed round (`trained_model`); final_model.json
  audit.json     --canary_clients: the canaries' cosines and the empirical epsilons (audit.png: histograms)
  worker.log     output of the TFF worker process
  .lock          the run's folder lock (`folder_lock`): pid and host of the run holding it
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

from dpfl_tff import round_record
from dpfl_tff.errors import ConfigError
from dpfl_tff.folder_lock import LOCK_FILE

HPARAMS = "hparams.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WORKER_LOG = "worker.log"
TENSORBOARD = "tensorboard"
_RUN_FILES = (HPARAMS, METRICS, SUMMARY, "ledger.jsonl", "checkpoints", TENSORBOARD, "run.png", WORKER_LOG,
              "audit.json", "audit.png", "final_model.keras", "final_model.json", "strategy.json")

# Settings that may change between a run and its resumption: they change neither
# the model trained so far nor its privacy accounting.
RESUMABLE_CHANGES = {
    "train.rounds", "train.eval_every", "train.checkpoint_every", "dp.max_epsilon", "dp.max_epsilon_view",
    "dp.accountant", "output_dir",
    "workers", "worker_timeout", "stall_seconds", "stop_grace_seconds", "worker_credentials", "insecure_workers",
    "train.clients_per_call",
    # Cohorts are fresh draws in every execution, seeded or not; logging them more or less is the user's call.
    "train.sampling_seed", "log_cohorts",
    # Whether missing data files may be fetched: the files a run reads are the same (checksum-pinned).
    "task.download",
}
_FLAG_NAMES = {"dp.mode": "dp_mode", "task.task": "task", "train.model": "model"}


@contextlib.contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """A temporary path beside `path`, unique to this process, renamed onto `path` if the block succeeds.

    Readers (and a second process writing the same file, such as two sweeps'
    tables) see the old file or the new one, never a mix; on an error the
    temporary file is removed and `path` is left as it was.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no such numbers
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # NumPy scalars
        return _jsonable(value.item())
    return value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def hparam_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'--flag: was X, now Y' for every setting that forbids resuming."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        if a.get(key) != b.get(key):
            flag = _FLAG_NAMES.get(key, key.rsplit(".", 1)[-1])
            diffs.append(f"--{flag}: was {a.get(key)}, now {b.get(key)}")
    return diffs


def _check_calibration_rounds(path: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A run calibrated to --target_epsilon over R rounds cannot be continued past R (nor shortened)."""
    target = old.get("dp", {}).get("target_epsilon")
    was, now = old.get("train", {}).get("rounds"), new.get("train", {}).get("rounds")
    if target is not None and was != now:
        raise ConfigError(
            f"--rounds={now}: the run in --output_dir={path} calibrated its noise to --target_epsilon={target} over "
            f"{was} rounds, so other rounds would not meet that target; keep --rounds={was}, or start a new run "
            "(another --output_dir or --overwrite)"
        )


class ExperimentDir:
    """Creates, resumes or replaces one experiment folder; every write is flushed at once.

    An existing run (ledger, metrics, checkpoints or summary present) is
    resumed unless `fresh`; `overwrite` deletes it first. Resuming with
    settings that change the model or its privacy (anything outside
    `RESUMABLE_CHANGES`) is refused. The constructor only checks (and creates
    an absent folder); nothing in an existing run is written before `open()`,
    so that a resume refused after further checks changes nothing.
    """

    def __init__(
        self, path: str, hparams: dict[str, Any], overwrite: bool = False, fresh: bool = False, create: bool = True
    ):
        self.path = path
        self._hparams = hparams
        self._metrics = None
        if os.path.exists(path) and not os.path.isdir(path):
            raise OSError(f"--output_dir={path}: is a file, not a folder; give a folder path")
        if create:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise OSError(f"--output_dir={path}: cannot create the folder ({e.strerror})") from e
        if os.path.isdir(path) and not os.access(path, os.W_OK):
            raise OSError(f"--output_dir={path}: folder is not writable")
        has_run = any(os.path.exists(self.file(n)) for n in ("ledger.jsonl", METRICS, SUMMARY, "checkpoints"))
        if overwrite:
            for name in _RUN_FILES:
                p = self.file(name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
            has_run = False
        elif fresh and os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE}:
            raise FileExistsError(
                f"--fresh: --output_dir={path} is not empty; choose another folder or add --overwrite to replace it"
            )
        self.resuming = has_run
        self.previous_hparams: dict[str, Any] | None = None
        if self.resuming:
            try:
                with open(self.file(HPARAMS), encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(
                    f"--output_dir={path}: holds a run without a readable {HPARAMS}; use --overwrite or another folder"
                ) from e
            _check_calibration_rounds(path, old, hparams)
            diffs = hparam_differences(old, hparams)
            if diffs:
                raise ConfigError(
                    f"--output_dir={path}: cannot resume, settings differ from the checkpointed run: "
                    f"{'; '.join(diffs)}. Use the original flags, another --output_dir, or --overwrite"
                )
            self.previous_hparams = old

    def read_summary(self) -> dict[str, Any] | None:
        """The run's summary.json, or None if absent or unreadable."""
        try:
            with open(self.file(SUMMARY), encoding="utf-8") as f:
                out = json.load(f)
            return out if isinstance(out, dict) else None
        except (OSError, ValueError):
            return None

    def open(self) -> None:
        """Writes hparams.json and opens metrics.jsonl for appending: the run starts writing."""
        self.write_json(HPARAMS, self._hparams)
        self._open_metrics()

    def _open_metrics(self) -> None:
        # Unbuffered: a failed write (disk full) is cut back off at once and leaves no buffer behind to fail
        # again when the file is closed or collected.
        try:
            self._metrics = open(self.file(METRICS), "ab", buffering=0)  # noqa: SIM115
        except OSError as e:
            raise write_error(METRICS, self.path, e) from e

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        """Writes `obj` atomically (temp file + rename); raises OSError naming the file on failure."""
        text = json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n"
        try:
            with replaced_atomically(self.file(name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise write_error(name, self.path, e) from e

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Appends and fsyncs one line; a failed write is cut back off the file and raises OSError naming it."""
        line = (json.dumps(_jsonable(record), sort_keys=True) + "\n").encode()
        try:
            append_whole(self._metrics, line)
        except OSError as e:
            raise write_error(METRICS, self.path, e) from e

    def truncate_metrics(self, last_round: int, last_record: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Keeps one line per round 1..last_round (restoring the checkpoint's own line); returns them."""
        by_round: dict[int, dict[str, Any]] = {}
        for rec in read_metrics(self.path):
            if rec.get("round", 0) <= last_round:
                by_round[rec["round"]] = rec
        if last_record is not None:
            by_round[last_round] = _jsonable(last_record)
        kept = [by_round[r] for r in sorted(by_round)]
        self._metrics.close()
        try:
            with replaced_atomically(self.file(METRICS)) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for rec in kept:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
        except OSError as e:
            raise write_error(METRICS, self.path, e) from e
        self._open_metrics()
        return kept

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()


class TensorBoard:
    """Per-round scalars for TensorBoard: losses, accuracies, epsilon, clip, clipped fraction, round time.

    `keep_through=k` (a resume from the checkpoint of round k) first rewrites
    the folder's event files without the points of rounds after k, as
    metrics.jsonl is rewritten: the rounds re-run now are then shown once, with
    their values of this execution, by TensorBoard and by any other reader of
    the files (`keep_steps_through`). A failed write raises OSError naming the
    folder (TensorFlow's own error says why, e.g. no space left on device).
    """

    KEYS = round_record.TENSORBOARD  # the declared fields marked for TensorBoard

    def __init__(self, path: str, keep_through: int | None = None):
        import tensorflow as tf

        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

        self._tf, self.path = tf, path
        self._tensor_pb2, self._tensor_shape_pb2 = tensor_pb2, tensor_shape_pb2
        self._metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
        try:
            if keep_through is not None:
                keep_steps_through(path, keep_through)
            os.makedirs(path, exist_ok=True)
            self.file = _new_event_file(path)
            self._writer = tf.io.TFRecordWriter(self.file)
            self._write(tf.compat.v1.Event(wall_time=time.time(), file_version="brain.Event:2"))
        except (tf.errors.OpError, OSError) as e:
            raise write_error(f"{TENSORBOARD}/", path, e) from e

    def write(self, record: dict[str, Any]) -> None:
        """One event per round holding every finite scalar of `record`, flushed.

        Each value is what `tf.summary.scalar` writes (a float32 scalar tensor
        tagged for the scalars plugin), in the event file format TensorFlow's
        summary writer writes (TFRecords of `Event` protos, the first one the
        file version). Written as one record by `tf.io.TFRecordWriter`, not by
        summary ops: those are several eager ops per round (1-3 ms of a
        quickstart round, more while the worker's threads run).
        """
        values = [self._value(key, v) for key in self.KEYS
                  if isinstance(v := record.get(key), (int, float)) and math.isfinite(v)]
        try:
            if values:
                self._write(self._tf.compat.v1.Event(wall_time=time.time(), step=record["round"],
                                                     summary=self._tf.compat.v1.Summary(value=values)))
        except self._tf.errors.OpError as e:
            raise write_error(f"{TENSORBOARD}/", self.path, e) from e

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def _value(self, key: str, v: float) -> Any:
        tensor = self._tensor_pb2.TensorProto(dtype=self._tf.float32.as_datatype_enum,
                                              tensor_shape=self._tensor_shape_pb2.TensorShapeProto(),
                                              tensor_content=_float32_bytes(v))
        return self._tf.compat.v1.Summary.Value(tag=key, metadata=self._metadata, tensor=tensor)

    def close(self) -> None:
        try:
            self._writer.close()
        except self._tf.errors.OpError as e:
            raise write_error(f"{TENSORBOARD}/", self.path, e) from e


def _new_event_file(logdir: str) -> str:
    """A new event file's path in `logdir`, named as TensorFlow's summary writer names them (TensorBoard
    reads the files whose names hold "tfevents", in name order: the time first)."""
    stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    n = 0
    while os.path.exists(path := os.path.join(logdir, f"{stem}.{n}.v2")):
        n += 1
    return path


def _float32_bytes(v: float) -> bytes:
    """`v` as one little-endian float32 (beyond its range: +-inf, as a float32 cast gives)."""
    try:
        return struct.pack("<f", v)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, v))


def _events(path: str) -> tuple[list[Any], bool]:
    """The Event protos of one event file, and whether it ended cleanly (False: a torn or damaged record)."""
    import tensorflow as tf

    events, records = [], iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            record = next(records)
        except StopIteration:
            return events, True
        except tf.errors.OpError:  # a record cut short by a kill, or damaged: the rest is unreadable
            return events, False
        events.append(tf.compat.v1.Event.FromString(record.numpy()))


def keep_steps_through(logdir: str, last_step: int) -> bool:
    """Rewrites `logdir`'s event files into one that holds no step after `last_step`; True if it changed them.

    The kept events (every file's, in file-name order: the order TensorBoard
    reads them) are written under a temporary name, renamed onto the first
    file, and the other files removed; a crash in between leaves files that
    the next resume rewrites again. (TensorBoard's own mechanism, a
    SessionLog START event that purges later steps, is honoured by its
    loader only, not by other readers of the files.)
    """
    import tensorflow as tf

    if not os.path.isdir(logdir):
        return False
    files = sorted(n for n in os.listdir(logdir) if "tfevents" in n)
    kept, changed, version_seen = [], len(files) > 1, False
    for name in files:
        events, clean = _events(os.path.join(logdir, name))
        changed |= not clean
        for event in events:
            if event.HasField("file_version"):
                if version_seen:
                    continue
                version_seen = True
            elif event.step > last_step:
                changed = True
                continue
            kept.append(event)
    if not changed:
        return False
    tmp = os.path.join(logdir, ".rewrite.tmp")  # without "tfevents": TensorBoard does not read it
    with tf.io.TFRecordWriter(tmp) as writer:
        for event in kept:
            writer.write(event.SerializeToString())
    os.replace(tmp, os.path.join(logdir, files[0]))
    for name in files[1:]:
        os.remove(os.path.join(logdir, name))
    return True


def append_whole(f: Any, data: bytes) -> None:
    """Appends `data` to the unbuffered binary file `f` and fsyncs; on failure cuts it back to its old size.

    So a full disk never leaves a torn line (the truncation itself is best
    effort: a read-only remount may refuse it too, and a reader skips a torn
    last line).
    """
    size = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            f.truncate(size)
        raise


def write_error(what: str, where: str, error: BaseException) -> OSError:
    """The one-line error of a write that failed: what, where, why, and the likely cause."""
    reason = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__
    return OSError(f"{what} could not be written to {where} ({reason}); is the disk full or the folder read-only?")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads `metrics.jsonl` of the experiment folder `path` (skips a torn last line)."""
    out = []
    try:
        with open(os.path.join(path, METRICS), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
    except FileNotFoundError:
        pass
    return out


def read_summary(path: str) -> dict[str, Any] | None:
    """`summary.json` of the experiment folder `path`, or None if absent or unreadable."""
    try:
        with open(os.path.join(path, SUMMARY), encoding="utf-8") as f:
            out = json.load(f)
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None
