"""The audit's sanity check: a run with canary clients, and the same run with the DP noise switched off.

  uv run python -m experiments.audit --flagfile=configs/quickstart.cfg --canary_clients=200

Trains the configuration twice in one process (one TFF worker), both with
--canary_clients=K (required, > 0):

  <output_dir>/noised       as configured: the audit's lower bound on epsilon
                            should be <= the theoretical epsilon (it is above it
                            with probability <= 1 - --confidence in a correct run)
  <output_dir>/noise_free   --noise_multiplier=0: the bound is infinite, and a
                            positive lower bound shows the audit can see the
                            missing noise (a run whose noise was silently not
                            applied would look like this one, not the first)

For each run it prints the theoretical epsilon, the audit's lower confidence
bound on epsilon at --confidence (a threshold test with Clopper-Pearson
intervals, inserted against held-out canaries: `dpfl_tff.audit.estimate.
lower_bound`; the larger of the final-model and all-rounds bounds, each at
1 - (1 - confidence)/2, Bonferroni) and the verdict: "consistent" (lower bound
<= epsilon), "VIOLATED" (lower bound > epsilon: at that confidence the noise or
the accounting is wrong) or "inconclusive" (lower bound 0: the run cannot tell).
Beside it, the point estimates (Andrew et al., ICLR 2024: two fitted
Gaussians), which are not bounds: they are biased upward at finite K and can
exceed the theoretical epsilon in a correct run. Lines, then one JSON line.
Neither figure proves privacy. Folders that hold these runs are resumed (or
left as they are when complete) unless --overwrite. Exit codes as
run_federated: 0 done, 2 bad flags or data, 1 a failed round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys

from absl import app, flags, logging

from dpfl_tff import errors, plan
from dpfl_tff.audit import estimate
from dpfl_tff.config import ConfigError, ExperimentConfig
from dpfl_tff.errors import DataFileError
from dpfl_tff.privacy import registry
from experiments import cli
from experiments import flags as dpfl_flags
from experiments.run_federated import Signals

NOISED, NOISE_FREE = "noised", "noise_free"

CONFIDENCE = flags.DEFINE_float(
    "confidence", estimate.DEFAULT_CONFIDENCE,
    "Confidence of the audit's lower bound on epsilon, in [0.5, 1): in a run that is (epsilon, delta)-DP the bound "
    "exceeds epsilon with probability at most 1 - confidence. Higher confidence, lower bound.",
)
GROUPS = (*dpfl_flags.GROUPS, ("audit", (CONFIDENCE,)))
# The parts of audit.json and their (inserted, held-out) statistics.
_PARTS = {"final_model": ("inserted_cosines", "held_out_cosines"),
          "all_rounds": ("inserted_max_cosines", "held_out_max_cosines")}


def variants(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The two checked configurations: as given, and with zero noise (no calibration), in subfolders."""
    if not cfg.canary_clients:
        raise ConfigError("--canary_clients=0: the audit needs canary clients; give K > 0 (e.g. 200)")
    if not registry.mechanism_class(cfg).provides_dp:
        raise ConfigError(f"--dp_mode={cfg.dp.mode}: there is no noise to audit; use --dp_mode=central or local")
    noise_free = dataclasses.replace(cfg.dp, noise_multiplier=0.0, target_epsilon=None)
    return {
        NOISED: plan.check(dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, NOISED))),
        NOISE_FREE: plan.check(dataclasses.replace(
            cfg, dp=noise_free, output_dir=os.path.join(cfg.output_dir, NOISE_FREE))),
    }


def check_confidence(confidence: float) -> None:
    """Raises ConfigError (one line naming the flag and its range) unless 0.5 <= confidence < 1."""
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence={confidence:g}: must be in [0.5, 1) (e.g. 0.95)")


def lower_bounds(audit: dict, confidence: float) -> dict:
    """The audit's lower bound on epsilon at `confidence`, from audit.json's statistics.

    Each available part (final model; all rounds) gets `estimate.lower_bound`
    at 1 - (1 - confidence) / parts; the larger holds at `confidence`
    (Bonferroni over the parts). None without statistics (a lost seed).
    """
    parts = {name: audit[name] for name, (ins, _) in _PARTS.items() if (audit.get(name) or {}).get(ins)}
    if not parts:
        return {"epsilon_lower_bound": None, "lower_bound_confidence": confidence, "lower_bound_parts": None}
    each = 1 - (1 - confidence) / len(parts)
    bounds = {name: estimate.lower_bound(part[_PARTS[name][0]], part[_PARTS[name][1]], audit["delta"], each)
              for name, part in parts.items()}
    return {
        "epsilon_lower_bound": max(b["epsilon_lower_bound"] for b in bounds.values()),
        "lower_bound_confidence": confidence,
        "lower_bound_parts": {name: {"epsilon_lower_bound": b["epsilon_lower_bound"], "confidence": each,
                                     "max_lower_bound": b["max_lower_bound"]} for name, b in bounds.items()},
    }


def verdict(lower: float | None, epsilon: float) -> str:
    """What the lower bound says about the theoretical epsilon (see the module docstring)."""
    if lower is None:
        return "not computed"
    if lower <= 0:
        return "inconclusive"
    return "VIOLATED" if lower > epsilon else "consistent"


def report(name: str, s: dict, output_dir: str, confidence: float = estimate.DEFAULT_CONFIDENCE) -> dict:
    """One run's figures: theoretical epsilon, the audit's lower bound and verdict, the point estimates."""
    from dpfl_tff.audit import auditor  # TensorFlow (the canaries' directions)

    try:
        with open(os.path.join(output_dir, auditor.AUDIT_JSON), encoding="utf-8") as f:
            audit = json.load(f)
    except (OSError, ValueError):
        audit = {}
    levels = {part: (audit.get(part) or {}).get("no_signal_level_95") for part in ("final_model", "all_rounds")}
    bounds = lower_bounds(audit, confidence)
    epsilon = float(s["epsilon"])
    return {
        "run": name, "noise_multiplier": s["noise_multiplier"], "epsilon": s["epsilon"], "delta": s["delta"],
        **bounds, "verdict": verdict(bounds["epsilon_lower_bound"], epsilon),
        "empirical_epsilon": s.get("empirical_epsilon"),
        "empirical_epsilon_all_rounds": s.get("empirical_epsilon_all_rounds"),
        "no_signal_level_95": levels["final_model"], "no_signal_level_95_all_rounds": levels["all_rounds"],
        "canary_clients": s.get("canary_clients"), "final_test_accuracy": s.get("final_test_accuracy"),
    }


def _num(x) -> str:
    return "n/a" if x is None else f"{float(x):.4g}"


def _percent(p: float) -> str:
    return f"{100 * p:.4g}%"  # 95%, 97.5%, 99.9% (never rounded up to 100%)


def _verdict_text(r: dict) -> str:
    lb, v = r["epsilon_lower_bound"], r["verdict"]
    if v == "not computed":
        return "no lower bound (no canary statistics)"
    parts = r["lower_bound_parts"]
    each = "; ".join(f"{name.replace('_', ' ')} {_num(p['epsilon_lower_bound'])} (at most {_num(p['max_lower_bound'])})"
                     for name, p in parts.items())
    text = f"epsilon lower bound {_num(lb)} at {_percent(r['lower_bound_confidence'])} confidence ({each})"
    if v == "inconclusive":
        return f"{text}: inconclusive (the run cannot tell)"
    if r["noise_multiplier"] == 0:
        return f"{text}: consistent (no noise, and the audit sees the privacy loss)"
    if v == "VIOLATED":
        return (f"{text}: VIOLATED, above the epsilon bound (the noise or the accounting is wrong, or a "
                f"{_percent(1 - r['lower_bound_confidence'])} chance)")
    return f"{text}: consistent (<= the epsilon bound)"


def human_line(r: dict) -> str:
    bound = "inf (no DP noise)" if r["noise_multiplier"] == 0 else _num(r["epsilon"])
    return (f"{r['run']}: z={r['noise_multiplier']:g}, epsilon bound {bound}; {_verdict_text(r)}; point estimates "
            f"(not bounds) {_num(r['empirical_epsilon'])} (final model), {_num(r['empirical_epsilon_all_rounds'])} "
            f"(all rounds), with no signal 95% of estimates are below {_num(r['no_signal_level_95'])}, "
            f"{_num(r['no_signal_level_95_all_rounds'])}; delta {r['delta']:.3g}, {r['canary_clients']} canaries")


def _jsonable(obj: dict) -> str:
    return json.dumps({k: (str(v) if isinstance(v, float) and v in (float("inf"), float("-inf")) else v)
                       for k, v in obj.items()})


def main(argv: list[str]) -> None:
    del argv
    try:
        check_confidence(CONFIDENCE.value)
        runs = variants(plan.check(dpfl_flags.experiment_config()))
    except ConfigError as e:
        cli.usage_error(str(e))
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from dpfl_tff import runtime, training  # TensorFlow: only once the flags are checked

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
                results.append(report(name, result.summary, cfg.output_dir, CONFIDENCE.value))
    except errors.RunInterrupted as e:
        print(f"{e}: {e.checkpoint_note}, summary written to {current.output_dir}; rerun the same "
              "command to continue", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (ConfigError, DataFileError, FileExistsError, OSError, runtime.WorkersUnreachable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except errors.LedgerError as e:
        print(f"error: cannot resume: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (errors.RoundFailed, runtime.WorkerLost) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    cli.say("audit (the lower bound is what may be compared with the epsilon bound; the point estimates are not "
            "bounds):")
    for r in results:
        cli.say("  " + human_line(r))
    cli.say(json.dumps({"audit": [json.loads(_jsonable(r)) for r in results]}))


def run() -> None:
    cli.run(main, __doc__, GROUPS)


if __name__ == "__main__":
    run()
