"""The audit's sanity check: a run with canary clients, and the same run with the DP noise switched off.

  uv run python -m experiments.audit --flagfile=configs/quickstart.cfg --canary_clients=200

Trains the configuration twice in one process (one TFF worker), both with
--canary_clients=K (required, > 0):

  <output_dir>/noised       as configured: empirical epsilon <= the bound is expected
  <output_dir>/noise_free   --noise_multiplier=0: the bound is infinite, and a
                            large empirical epsilon shows the audit can see the
                            missing noise (a run whose noise was silently not
                            applied would look like this one, not the first)

and prints both empirical epsilons (final model; all rounds) beside the
theoretical epsilon, as lines and as one JSON line. The empirical epsilon is
an estimate under one attack (Andrew et al., ICLR 2024), not a bound: it can
show a bound is loose or noise is missing, never prove privacy. Folders that
hold these runs are resumed (or left as they are when complete) unless
--overwrite. Exit codes as run_federated: 0 done, 2 bad flags or data, 1 a
failed round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys

from absl import app, logging

from dpfl_tff import checkpoints, plan, runtime, training
from dpfl_tff.audit import auditor
from dpfl_tff.config import ConfigError, ExperimentConfig
from dpfl_tff.tasks import DataFileError
from experiments import cli
from experiments.run_federated import Signals
from experiments import flags as dpfl_flags

NOISED, NOISE_FREE = "noised", "noise_free"


def variants(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The two checked configurations: as given, and with zero noise (no calibration), in subfolders."""
    if not cfg.canary_clients:
        raise ConfigError("--canary_clients=0: the audit needs canary clients; give K > 0 (e.g. 200)")
    if cfg.dp.mode == "none":
        raise ConfigError("--dp_mode=none: there is no noise to audit; use --dp_mode=central or local")
    noise_free = dataclasses.replace(cfg.dp, noise_multiplier=0.0, target_epsilon=None)
    return {
        NOISED: plan.check(dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, NOISED))),
        NOISE_FREE: plan.check(dataclasses.replace(
            cfg, dp=noise_free, output_dir=os.path.join(cfg.output_dir, NOISE_FREE))),
    }


def report(name: str, s: dict, output_dir: str) -> dict:
    """One run's figures: theoretical and empirical epsilons at the run's delta, and the no-signal levels."""
    try:
        with open(os.path.join(output_dir, auditor.AUDIT_JSON), encoding="utf-8") as f:
            audit = json.load(f)
    except (OSError, ValueError):
        audit = {}
    levels = {part: (audit.get(part) or {}).get("no_signal_level_95") for part in ("final_model", "all_rounds")}
    return {
        "run": name, "noise_multiplier": s["noise_multiplier"], "epsilon": s["epsilon"], "delta": s["delta"],
        "empirical_epsilon": s.get("empirical_epsilon"),
        "empirical_epsilon_all_rounds": s.get("empirical_epsilon_all_rounds"),
        "no_signal_level_95": levels["final_model"], "no_signal_level_95_all_rounds": levels["all_rounds"],
        "canary_clients": s.get("canary_clients"), "final_test_accuracy": s.get("final_test_accuracy"),
    }


def _num(x) -> str:
    return "n/a" if x is None else f"{float(x):.4g}"


def human_line(r: dict) -> str:
    bound = "inf (no DP noise)" if r["noise_multiplier"] == 0 else _num(r["epsilon"])
    return (f"{r['run']}: z={r['noise_multiplier']:g}, epsilon bound {bound}; empirical epsilon "
            f"{_num(r['empirical_epsilon'])} (final model), {_num(r['empirical_epsilon_all_rounds'])} (all rounds); "
            f"with no signal 95% of estimates are below {_num(r['no_signal_level_95'])}, "
            f"{_num(r['no_signal_level_95_all_rounds'])}; delta {r['delta']:.3g}, {r['canary_clients']} canaries")


def _jsonable(obj: dict) -> str:
    return json.dumps({k: (str(v) if isinstance(v, float) and v in (float("inf"), float("-inf")) else v)
                       for k, v in obj.items()})


def main(argv: list[str]) -> None:
    del argv
    try:
        runs = variants(plan.check(dpfl_flags.experiment_config()))
    except ConfigError as e:
        cli.usage_error(str(e))
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    results = []
    signals = Signals()  # as run_federated: the first signal stops after the round, checkpointed
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    current = runs[NOISED]
    try:
        # One local TFF worker for both runs (with --workers, each run connects to them itself).
        with contextlib.nullcontext() if runs[NOISED].workers else runtime.local_context():
            for name, cfg in runs.items():
                current = cfg
                cli.say(f"== {name}: {cfg.output_dir}")
                result = training.run(cfg, overwrite=dpfl_flags.OVERWRITE.value, log=cli.say,
                                      fresh=dpfl_flags.FRESH.value, stop_requested=signals.stop_requested)
                results.append(report(name, result.summary, cfg.output_dir))
    except training.RunInterrupted as e:
        print(f"{e}: last completed round checkpointed, summary written to {current.output_dir}; rerun the same "
              "command to continue", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (ConfigError, DataFileError, FileExistsError, OSError, runtime.WorkersUnreachable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except checkpoints.LedgerError as e:
        print(f"error: cannot resume: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (training.RoundFailed, runtime.WorkerLost) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    cli.say("audit (empirical epsilon: an estimate under the canary-cosine attack, not a bound):")
    for r in results:
        cli.say("  " + human_line(r))
    cli.say(json.dumps({"audit": [json.loads(_jsonable(r)) for r in results]}))


def run() -> None:
    cli.run(main, __doc__, dpfl_flags.GROUPS)


if __name__ == "__main__":
    run()
