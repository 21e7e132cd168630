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


def test_bench_round_emits_every_field_and_leaves_no_worker():
    from tests.conftest import worker_pids

    before = set(worker_pids())
    proc = subprocess.run(
        [sys.executable, "scripts/bench_round.py", "--rounds=1", "--clients_per_round=2",
         "--examples_per_client=10", "--models=mlp,cnn", "--worker_counts=1,2", "--memory_rounds=6"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["clients_per_round"] == 2 and report["examples_per_client"] == 10 and report["rounds"] == 1
    assert report["startup_seconds"] > 0 and report["python_peak_rss_mb"] > 0 and report["worker_peak_rss_mb"] > 0
    for key, model in (("mlp", "emnist_2nn"), ("cnn", "emnist_cnn_dropout")):
        r = report[key]
        assert r["model"] == model
        assert set(r) == {"model", "dpfl_tff_seconds_per_round", "reference_seconds_per_round",
                          "ratio_dpfl_tff_over_reference", "accounting_seconds_per_round",
                          "dpfl_tff_seconds_per_round_2x_clients", "ratio_2x_clients_over_1x",
                          "tff_fedavg_seconds_per_round", "ratio_tff_fedavg_over_reference"}
        assert r["ratio_dpfl_tff_over_reference"] == r["dpfl_tff_seconds_per_round"] / r["reference_seconds_per_round"]
        assert r["ratio_tff_fedavg_over_reference"] == r["tff_fedavg_seconds_per_round"] / r["reference_seconds_per_round"]
        assert all(r[k] > 0 for k in r if k.endswith("_per_round"))
        assert r["ratio_2x_clients_over_1x"] == r["dpfl_tff_seconds_per_round_2x_clients"] / r["dpfl_tff_seconds_per_round"]
    mem = report["memory"]
    assert mem["rounds"] == 6 and mem["samples"] == 6 - 6 // 10
    for who in ("python", "worker"):
        assert mem[f"{who}_rss_mb_first"] > 0 and mem[f"{who}_rss_mb_last"] > 0
        assert isinstance(mem[f"{who}_rss_slope_mb_per_100_rounds"], float)
    w = report["workers"]
    assert w["model"] == "emnist_2nn"
    assert w["1_workers_seconds_per_round"] > 0 and w["2_workers_seconds_per_round"] > 0
    assert w["ratio_2_over_1_workers"] == w["2_workers_seconds_per_round"] / w["1_workers_seconds_per_round"]
    assert set(worker_pids()) - before == set()
