"""The experiment folder: hparams, per-round metrics, summary, worker log.

Files (all under `output_dir`):
  hparams.json   resolved configuration of the run (every flag that matters)
  metrics.jsonl  one JSON object per completed round, flushed as written
  summary.json   final figures; also written when a run stops early
  worker.log     output of the TFF worker process
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

HPARAMS = "hparams.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WORKER_LOG = "worker.log"


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


class ExperimentDir:
    """Writes one experiment's outputs; every write is flushed at once."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise OSError(f"--output_dir={path}: cannot create the folder ({e.strerror})") from e
        if not os.access(path, os.W_OK):
            raise OSError(f"--output_dir={path}: folder is not writable")
        metrics = os.path.join(path, METRICS)
        if os.path.exists(metrics) and not overwrite:
            raise FileExistsError(
                f"--output_dir={path}: already holds a run ({METRICS}); "
                "choose another folder or pass --overwrite to replace it"
            )
        for name in (METRICS, SUMMARY):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        self._metrics = open(metrics, "a", encoding="utf-8")  # noqa: SIM115

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        """Writes `obj` atomically (temp file + rename)."""
        tmp = self.file(name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.file(name))

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def close(self) -> None:
        self._metrics.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads `metrics.jsonl` of the experiment folder `path`."""
    with open(os.path.join(path, METRICS), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
