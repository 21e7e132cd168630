"""Wall time of a quickstart sweep with --parallel=1 and --parallel=P, in the same run, and its per-run overhead.

  uv run python scripts/bench_sweep.py [--runs=12] [--rounds=100] [--parallel=2]

Runs `experiments.sweep --flagfile=configs/quickstart.cfg` over a grid of
--runs runs (noise_multiplier 0.5, 1, 2 x --runs/3 seeds) as a new process,
first with --parallel=1 then with --parallel=P, each in a fresh temporary
folder. Prints one JSON object: each sweep's wall seconds (process start to
exit), the sum of its runs' round seconds (metrics.jsonl's `round_seconds`),
the per-run overhead with --parallel=1 (wall minus round seconds, over the
runs: start-up, data, model, tracing, evaluation, files), with --parallel=P
the round seconds over the wall (rounds running at once), and the speed-up
wall(P=1) / wall(P). The machine's load shifts both: read the ratio, measured
in the same run, not a single figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(folder: str, runs: int, rounds: int, parallel: int) -> dict:
    seeds = max(1, runs // 3)
    cmd = [sys.executable, "-m", "experiments.sweep", "--flagfile=configs/quickstart.cfg", f"--rounds={rounds}",
           "--grid=noise_multiplier=0.5,1,2", f"--seeds={seeds}", f"--parallel={parallel}",
           f"--output_dir={folder}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep --parallel={parallel} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    round_seconds, trained = 0.0, 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        trained += 1
        with open(path, encoding="utf-8") as f:
            round_seconds += sum(json.loads(line).get("round_seconds", 0.0) for line in f if line.strip())
    out = {"command": " ".join(cmd[1:]), "runs": trained, "wall_seconds": wall, "round_seconds": round_seconds}
    if parallel == 1:  # one run after another: what is not a round is per-run overhead
        out["overhead_seconds_per_run"] = (wall - round_seconds) / max(trained, 1)
    else:  # runs overlap: how many rounds ran at once on average
        out["round_seconds_over_wall"] = round_seconds / wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="runs in the sweep (a multiple of 3), default 12")
    parser.add_argument("--rounds", type=int, default=100, help="rounds per run (quickstart: 100)")
    parser.add_argument("--parallel", type=int, default=2, help="P of the parallel sweep, default 2")
    args = parser.parse_args()
    report = {"cores": len(os.sched_getaffinity(0)), "runs": args.runs, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        one = _sweep(os.path.join(tmp, "p1"), args.runs, args.rounds, 1)
        many = _sweep(os.path.join(tmp, f"p{args.parallel}"), args.runs, args.rounds, args.parallel)
    report["parallel_1"] = one
    report[f"parallel_{args.parallel}"] = many
    report[f"speedup_parallel_{args.parallel}_over_1"] = one["wall_seconds"] / many["wall_seconds"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
