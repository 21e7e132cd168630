"""Trains FedAvg with (optional) central DP and reports epsilon every round.

  uv run python -m experiments.run_federated --flagfile=configs/quickstart.cfg

Writes hparams.json, metrics.jsonl (one line per round), summary.json and
worker.log to --output_dir; prints one progress line per round.
With --workers=host:port,... the rounds run on TFF worker services started
with `python -m experiments.run_worker --port=PORT`.
Exit codes: 0 done, 2 bad flags, missing or bad data files or unreachable
--workers, 1 failure (e.g. a round failed on a lost worker; rerun to resume),
128+signal when stopped by one.
"""

from __future__ import annotations

import signal
import sys

from absl import app, logging

from dpfl_tff import runtime, training
from dpfl_tff.config import ConfigError
from dpfl_tff.tasks import DataFileError
from experiments import flags as dpfl_flags


class _Signals:
    """SIGTERM/SIGINT stop the run after the current round; a second one stops it at once.

    The handler only records the signal: raising from a signal handler can be
    swallowed when it lands inside a `__del__` or a library's cleanup code.
    """

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"stopped by a second {name}: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.received = signum
        print(f"{name} received: stopping after the current round", file=sys.stderr, flush=True)

    def stop_requested(self) -> training.RunInterrupted | None:
        if self.received is None:
            return None
        name = signal.Signals(self.received).name
        return training.RunInterrupted(f"stopped by {name}", 128 + self.received)


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
    signals = _Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    try:
        result = training.run(
            cfg,
            overwrite=dpfl_flags.OVERWRITE.value,
            log=lambda s: print(s, flush=True),
            stop_requested=signals.stop_requested,
            fresh=dpfl_flags.FRESH.value,
        )
    except training.RunInterrupted as e:
        print(f"{e}: summary written to {cfg.output_dir}, TFF worker shut down", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (ConfigError, DataFileError, FileExistsError, OSError, runtime.WorkersUnreachable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except training.RoundFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
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
