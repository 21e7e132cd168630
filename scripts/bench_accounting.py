"""Per-round accounting cost next to the round it accounts, measured in one run.

  uv run python scripts/bench_accounting.py [--rounds=30] [--clients_per_round=70]

Trains the quickstart setting (digits, 700 clients) once per accountant and
prints one JSON object: mean round seconds, mean seconds the round loop spent
waiting for epsilon (PLD is computed in a background thread during the round),
their ratio, the cost of one epsilon computation when not overlapped, and
the PLD run's round time over the RDP run's (CPU contention of the thread).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dpfl_tff import training  # noqa: E402
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig  # noqa: E402
from dpfl_tff.privacy import accounting, events  # noqa: E402

ROUNDS = flags.DEFINE_integer("rounds", 30, "Rounds per accountant.")
COHORT = flags.DEFINE_integer("clients_per_round", 70, "Expected clients per round.")


def main(argv):
    del argv
    report = {"rounds": ROUNDS.value, "clients_per_round": COHORT.value}
    for kind in ("rdp", "pld"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExperimentConfig(
                task=TaskConfig(num_clients=700),
                train=TrainConfig(rounds=ROUNDS.value, clients_per_round=COHORT.value, eval_every=0,
                                  client_epochs=2, client_learning_rate=0.3),
                dp=DPConfig(noise_multiplier=1.0, clip_norm=0.5, accountant=kind),
                output_dir=tmp,
            ).validate()
            records = training.run(cfg, log=lambda s: None).records[1:]  # round 1 includes tracing
        tracker = events.EpsilonTracker(accounting.round_privacy(cfg), cfg.target_delta, kind)
        t0 = time.perf_counter()
        for r in range(1, ROUNDS.value + 1):
            tracker.epsilon(r)
        direct = (time.perf_counter() - t0) / ROUNDS.value
        round_s = sum(r["round_seconds"] for r in records) / len(records)
        wait_s = sum(r["accounting_seconds"] for r in records) / len(records)
        report[kind] = {
            "mean_round_seconds": round_s,
            "mean_accounting_wait_seconds": wait_s,
            "accounting_over_round": wait_s / round_s,
            "epsilon_seconds_not_overlapped": direct,
        }
    # The PLD thread shares the 2 cores with the TFF worker: show what that costs the round.
    report["pld_round_seconds_over_rdp"] = report["pld"]["mean_round_seconds"] / report["rdp"]["mean_round_seconds"]
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
