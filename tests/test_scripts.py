"""Helper scripts run and print every field they promise (no timing assertions)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_accounting_emits_every_field():
    proc = subprocess.run(
        [sys.executable, "scripts/bench_accounting.py", "--rounds=2", "--clients_per_round=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rounds"] == 2 and report["pld_round_seconds_over_rdp"] > 0
    for kind in ("rdp", "pld"):
        fields = report[kind]
        assert set(fields) == {"mean_round_seconds", "mean_accounting_wait_seconds", "accounting_over_round",
                               "epsilon_seconds_not_overlapped"}
        assert all(v >= 0 for v in fields.values())
