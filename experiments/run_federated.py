"""Trains FedAvg with central or local DP (or none) and reports epsilon every round.

  uv run python -m experiments.run_federated --flagfile=configs/quickstart.cfg [--flag=value ...]

Writes hparams.json, metrics.jsonl (one line per round), summary.json and
worker.log to --output_dir; prints one progress line per round.
With --workers=host:port,... the rounds run on TFF worker services started
with `python -m experiments.run_worker --port=PORT`.
Exit codes: 0 done (or already complete), 2 bad flags, missing or bad data
files, unreachable --workers, a run folder that cannot be resumed (e.g. a
damaged ledger.jsonl) or that another run is using (its folder lock), a write
that failed (disk full, read-only), 1 failure (e.g. a round failed on a lost
--workers worker, a dead local worker, or a worker that gave no answer for
--stall_seconds; rerun to resume), 128+signal when stopped by one.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, logging

from dpfl_tff import errors, plan, stop_signals
from dpfl_tff.config import ConfigError
from dpfl_tff.errors import DataFileError

# TensorFlow (through `training` and `runtime`) is imported only once the flags and the config are checked:
# --help and every usage error answer in about a second.
from experiments import cli
from experiments import flags as dpfl_flags


def _say(line: str) -> None:
    """One line on stderr in one write: a second signal's handler cannot split it."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


class Signals:
    """SIGTERM/SIGINT stop the run after the current round; a second one cuts that round short.

    Either way the last completed round is checkpointed before the driver
    exits (`training.run` defers a second signal's exception while it writes
    or fetches the state from the worker: `stop_signals.deferred`, so a signal
    never cuts a save short). A batch scheduler's cancel under `uv run`
    delivers the signal twice (the group kill, and uv forwarding it): that
    loses at most the round in progress. The first signal only records
    itself, and a later one that lands inside a finalizer (`__del__`, TFF's
    disposal of a worker's value) does not raise there (`stop_signals.hold`:
    Python would print and swallow it, after cutting the clean-up short); the
    run then stops after the round. A round still waiting on a worker
    --stop_grace_seconds after the first signal is abandoned
    (`dpfl_tff.watchdog`): a frozen worker cannot keep the driver.
    """

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            stop = errors.RunInterrupted(f"stopped by {name}", 128 + signum)
            held = stop_signals.hold(stop, frame)  # "deferred": raised once the write in progress has ended
            if held == "finalizer":
                _say(f"{name} received again, inside clean-up code: stopping after the current round")
                return
            _say(f"{name} received again: cutting the current round short")
            if held is None:
                raise stop
            return
        self.received = signum
        _say(f"{name} received: stopping after the current round")

    def stop_requested(self) -> errors.RunInterrupted | None:
        if self.received is None:
            return None
        name = signal.Signals(self.received).name
        return errors.RunInterrupted(f"stopped by {name}", 128 + self.received)


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    try:
        cfg = plan.check(dpfl_flags.experiment_config())
    except ConfigError as e:
        cli.usage_error(str(e))
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFF logs every model build at INFO
    if dpfl_flags.DRY_RUN.value:
        from dpfl_tff import dry_run  # no TensorFlow on a registered model and the offline task

        try:
            dry_run.dry_run(cfg, overwrite=dpfl_flags.OVERWRITE.value, fresh=dpfl_flags.FRESH.value,
                             log=cli.say)
        except (ConfigError, DataFileError, FileExistsError, OSError) as e:
            cli.usage_error(str(e))
        except errors.LedgerError as e:
            cli.usage_error(f"cannot resume: {e}")
        return
    from dpfl_tff import runtime, training  # TensorFlow

    signals = Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    try:
        result = training.run(
            cfg,
            overwrite=dpfl_flags.OVERWRITE.value,
            log=cli.say,
            stop_requested=signals.stop_requested,
            fresh=dpfl_flags.FRESH.value,
        )
    except errors.RunInterrupted as e:
        print(f"{e}: {e.checkpoint_note}, summary written to {cfg.output_dir}, TFF worker shut down",
              file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (ConfigError, DataFileError, FileExistsError, OSError, runtime.WorkersUnreachable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except errors.LedgerError as e:
        print(
            f"error: cannot resume: {e}. Its epsilon would be too low; nothing was changed. Restore the ledger, "
            "or start afresh with --overwrite or another --output_dir",
            file=sys.stderr, flush=True,
        )
        sys.exit(2)
    except (errors.RoundFailed, runtime.WorkerLost) as e:  # WorkerLost: outside a round's call
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result.already_complete:
        return
    cli.say(done_line(result.summary, cfg.output_dir))


def done_line(s: dict, output_dir: str) -> str:
    """The final `done:` line: rounds, accuracy, epsilon (and the audit's empirical epsilon beside it)."""
    relation = (s["neighboring_relation"] or "").replace("_", "-")
    if s.get("record_epsilon") is not None:  # --dp_level=example
        eps = (f"inf at the client level; record epsilon {s['record_epsilon']:.4g} (add-or-remove-one record, max "
               f"over clients, {s['accountant'].upper()})")
    elif not relation:
        eps = "inf (no DP)"
    elif s["noise_multiplier"] == 0:
        eps = f"inf (no DP noise: --noise_multiplier=0; {relation})"
    elif s.get("local_epsilon") is not None:  # local DP: the guarantee against the server first, both labelled
        eps = (f"{s['epsilon']:.4g} (central view: {relation}, {s['accountant'].upper()}), local epsilon "
               f"{s['local_epsilon']:.4g} (each client against the server)")
    else:
        eps = f"{s['epsilon']:.4g} ({relation}, {s['accountant'].upper()})"
    acc = "n/a" if s["final_test_accuracy"] is None else f"{s['final_test_accuracy']:.4f}"
    wall = f", {s['wall_seconds']:.0f} s" if "wall_seconds" in s else ""
    audit = ""
    if s.get("empirical_epsilon") is not None:
        all_rounds = s.get("empirical_epsilon_all_rounds")
        audit = (f", empirical epsilon {s['empirical_epsilon']:.4g} (final model"
                 + ("" if all_rounds is None else f"; all rounds {all_rounds:.4g}")
                 + f"; {s['canary_clients']} canaries, whose fitting noise alone gives up to "
                 f"{s['empirical_epsilon_no_signal_level']:.2g}; an estimate, not a bound)")
        lower = s.get("empirical_epsilon_lower_bound")
        if lower is not None:  # the figure that may be compared with the epsilon bound
            lower_all = s.get("empirical_epsilon_lower_bound_all_rounds")
            audit += (f", epsilon lower bound {lower:.3g} (final model"
                      + ("" if lower_all is None else f"; all rounds {lower_all:.3g}")
                      + f"; at {100 * s['empirical_epsilon_lower_bound_confidence']:.4g}% confidence"
                      + ("; inconclusive" if max(lower, lower_all or 0) <= 0 else "") + ")")
    return (f"done: {s['rounds']} rounds, test accuracy {acc}, "
            f"epsilon {eps} at delta {s['delta']:.3g}{audit}{wall}; outputs in {output_dir}")


def run() -> None:
    cli.run(main, __doc__, dpfl_flags.GROUPS)


if __name__ == "__main__":
    run()
