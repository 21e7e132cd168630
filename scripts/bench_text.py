"""Stack Overflow at full population, streamed from disk: memory, O(m) round preparation, one paper-model round.

  uv run python scripts/bench_text.py [--dir=/tmp/dpfl_tff_bench_text] [--clients=342477]
      [--cohorts=10,100,1000] [--round_clients=100] [--round_sentences=256] [--skip_round]

1. Writes a synthetic file in TFF's exact Stack Overflow schema (tests/data_fixtures.py's writer format) with
   --clients train users (default 342,477, the real count) of 1-3 tiny sentences each, 2,000 test users and a
   10,000-word `stackoverflow.word_count`; a second one of 10,000 users (same shape) for the N comparison.
2. Loads `--task=stackoverflow` on each (builds the per-client index once: seconds), reports this process's
   RSS after loading, then times the round input of cohorts of m clients (`process.round_input` with local
   client files: the rows read, preprocessed with TFF's functions, written for the worker), 5 cohorts each, at
   both N: seconds per round and per client (O(m): flat per client; independent of N: ratio near 1).
3. Unless --skip_round: one round of the paper model (stackoverflow_lstm, 4,050,748 parameters) with
   --round_clients clients of --round_sentences sentences of 15-25 words (the DP-FTRL setting caps users at
   256 sentences), batch 16, central DP, through `experiments.run_federated` as a new process: the round's
   seconds (after the first round's tracing: 2 rounds, the second is reported) and the peak RSS of the driver
   and its worker.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DIR = flags.DEFINE_string("dir", "/tmp/dpfl_tff_bench_text", "Folder for the synthetic files (reused if there).")
_CLIENTS = flags.DEFINE_integer("clients", 342_477, "Train users of the big file.")
_COHORTS = flags.DEFINE_list("cohorts", ["10", "100", "1000"], "Cohort sizes m timed.")
_ROUND_CLIENTS = flags.DEFINE_integer("round_clients", 100, "Clients of the paper-model round.")
_ROUND_SENTENCES = flags.DEFINE_integer("round_sentences", 256, "Sentences per client of that round.")
_SKIP_ROUND = flags.DEFINE_bool("skip_round", False, "Skip the paper-model round.")


def _rss_mb(pid: str = "self", field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _write(folder: str, clients: int, sentences: tuple[int, int], words: tuple[int, int], test_clients: int,
           seed: int) -> str:
    """A Stack Overflow-shaped file; returns its folder. Sentences draw from the vocabulary plus 5% unknown words."""
    import numpy as np

    from tests.data_fixtures import _SCHEMA, stackoverflow_example

    path = os.path.join(folder, "stackoverflow.sqlite")
    if os.path.exists(path):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = [f"w{k}" for k in range(10_000)]
    with open(os.path.join(folder, "stackoverflow.word_count"), "w") as f:
        f.writelines(f"{w} {100_000 - k}\n" for k, w in enumerate(vocab))
    pool = vocab[:2000] + [f"unk{k}" for k in range(100)]
    templates = [stackoverflow_example(" ".join(rng.choice(pool, size=int(rng.integers(*words)))))
                 for _ in range(5000)]
    tmp = path + ".tmp"
    con = sqlite3.connect(tmp)
    with con:
        for q in _SCHEMA:
            con.execute(q)
        for split, n, first in (("train", clients, 0), ("test", test_clients, 10_000_000)):
            for c in range(n):
                cid = str(first + c)
                k = int(rng.integers(*sentences))
                con.executemany("INSERT INTO examples VALUES (?, ?, ?)",
                                [(split, cid, templates[int(j)]) for j in rng.integers(0, len(templates), k)])
                con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, split, k))
    con.close()
    os.replace(tmp, path)
    return folder


def _prep_times(folder: str, cohorts: list[int]) -> dict:
    import numpy as np

    from dpfl_tff import process
    from dpfl_tff.config import ExperimentConfig, TaskConfig, TrainConfig
    from dpfl_tff.tasks import load_task

    t0 = time.time()
    cfg = ExperimentConfig(task=TaskConfig(task="stackoverflow", data_dir=folder, eval_examples=1000),
                           train=TrainConfig(model="stackoverflow_lstm", client_batch_size=16))
    data = load_task(cfg.task, 0)
    out = {"num_clients": data.num_clients, "load_seconds": time.time() - t0, "rss_mb_after_load": _rss_mb()}
    rng = np.random.default_rng(0)
    with process.client_files(cfg, data) as files:
        for m in cohorts:
            times = []
            for r in range(5):
                cohort = np.sort(rng.choice(data.num_clients, size=m, replace=False))
                t = time.time()
                process.round_input(cfg, data, cohort, r + 1, files)
                times.append(time.time() - t)
            out[f"prep_seconds_m{m}"] = float(np.median(times))
            out[f"prep_ms_per_client_m{m}"] = 1000 * float(np.median(times)) / m
    out["rss_mb_after_rounds"] = _rss_mb()
    out["rss_mb_peak"] = _rss_mb(field="VmHWM")
    return out


def _paper_round(folder: str, clients: int) -> dict:
    out_dir = os.path.join(folder, "run")
    cmd = [sys.executable, "-m", "experiments.run_federated", "--task=stackoverflow", f"--data_dir={folder}",
           f"--num_clients={clients}", f"--clients_per_round={clients}", "--client_sampling=uniform", "--rounds=2",
           "--client_batch_size=16", "--client_max_examples=256", "--client_learning_rate=0.5",
           "--server_learning_rate=3.0", "--noise_multiplier=1.0", "--eval_every=0", "--eval_examples=1000",
           f"--output_dir={out_dir}", "--overwrite"]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    wall = time.time() - t
    if proc.returncode != 0:
        return {"paper_round_error": proc.stdout[-500:] + proc.stderr[-500:]}
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"paper_round_seconds_first": records[0]["round_seconds"],
            "paper_round_seconds": records[1]["round_seconds"], "paper_run_wall_seconds": wall,
            "paper_round_clients": clients, "paper_round_peak_rss_mb_driver_or_worker": peak}


def main(argv):
    del argv
    cohorts = [int(m) for m in _COHORTS.value]
    out = {"clients": _CLIENTS.value}
    t = time.time()
    big = _write(os.path.join(_DIR.value, "big"), _CLIENTS.value, (1, 4), (3, 8), 2000, 0)
    small = _write(os.path.join(_DIR.value, "small"), 10_000, (1, 4), (3, 8), 2000, 1)
    out["write_seconds"] = time.time() - t
    out["file_mb_big"] = os.path.getsize(os.path.join(big, "stackoverflow.sqlite")) / 2**20
    out["big"] = _prep_times(big, cohorts)
    out["small"] = _prep_times(small, [m for m in cohorts if m <= 10_000])
    for m in cohorts:
        out[f"prep_ratio_big_over_small_m{m}"] = out["big"][f"prep_seconds_m{m}"] / out["small"][f"prep_seconds_m{m}"]
    if not _SKIP_ROUND.value:
        rounds_dir = _write(os.path.join(_DIR.value, "round"), _ROUND_CLIENTS.value,
                            (_ROUND_SENTENCES.value, _ROUND_SENTENCES.value + 1), (15, 26), 200, 2)
        out.update(_paper_round(rounds_dir, _ROUND_CLIENTS.value))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
