"""Trains FedAvg with (optional) central DP and reports epsilon every round.

  uv run python -m experiments.run_federated --flagfile=configs/quickstart.cfg

Writes hparams.json, metrics.jsonl (one line per round), summary.json and
worker.log to --output_dir; prints one progress line per round.
Exit codes: 0 done, 2 bad flags, 1 failure, 128+signal when stopped by one.
"""

from __future__ import annotations

import signal
import sys

from absl import app, logging

from dpfl_tff import training
from dpfl_tff.config import ConfigError
from experiments import flags as dpfl_flags


class Stopped(SystemExit):
    """Raised in the main thread when SIGTERM/SIGINT arrives."""


def _on_signal(signum, frame):  # noqa: ARG001
    name = signal.Signals(signum).name
    print(f"stopped by {name}: writing summary and shutting down the TFF worker", file=sys.stderr, flush=True)
    raise Stopped(128 + signum)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        cfg = dpfl_flags.experiment_config().validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFF logs every model build at INFO
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        result = training.run(cfg, overwrite=dpfl_flags.OVERWRITE.value, log=lambda s: print(s, flush=True))
    except (ConfigError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    s = result.summary
    relation = (s["neighboring_relation"] or "").replace("_", "-")
    eps = "inf (no DP)" if not relation else f"{s['epsilon']:.4g} ({relation}, {s['accountant'].upper()})"
    acc = "n/a" if s["final_test_accuracy"] is None else f"{s['final_test_accuracy']:.4f}"
    print(
        f"done: {s['rounds']} rounds, test accuracy {acc}, "
        f"epsilon {eps} at delta {s['delta']:.3g}, {s['wall_seconds']:.0f} s; outputs in {cfg.output_dir}",
        flush=True,
    )


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
