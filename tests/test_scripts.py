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


def test_bench_round_times_dp_sgd_against_the_non_private_epoch_and_tf_privacy():
    proc = subprocess.run(
        [sys.executable, "scripts/bench_round.py", "--models=", "--worker_counts=", "--driver_startup=false",
         "--eval_sizes=", "--dp_sgd_models=mlp", "--dp_sgd_examples=35", "--batch_size=10", "--dp_sgd_repeats=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["dp_sgd"]) == {"mlp"}
    r = report["dp_sgd"]["mlp"]
    assert r["model"] == "emnist_2nn" and r["records"] == 35 and r["batch_size"] == 10 and r["repeats"] == 1
    assert r["steps_per_epoch"] == r["dp_sgd_steps"] == r["non_private_steps"] == 4  # ceil(35 / 10)
    assert r["parameters"] == 199_210
    kinds = ("dp_sgd", "non_private", "tf_privacy_microbatches", "dp_sgd_noise_only", "dp_sgd_without_noise")
    assert all(r[f"{k}_seconds_per_epoch"] > 0 for k in kinds)
    assert r["ratio_dp_sgd_over_non_private"] == r["dp_sgd_seconds_per_epoch"] / r["non_private_seconds_per_epoch"]
    assert r["speedup_dp_sgd_over_tf_privacy_microbatches"] == (
        r["tf_privacy_microbatches_seconds_per_epoch"] / r["dp_sgd_seconds_per_epoch"])
    assert r["ratio_dp_sgd_noise_only_over_non_private"] == (
        r["dp_sgd_noise_only_seconds_per_epoch"] / r["non_private_seconds_per_epoch"])
    assert "ratio_dp_sgd_without_noise_over_non_private" in r
    assert r["ratio_dp_sgd_without_noise_timed_over_non_private"] == (
        r["dp_sgd_without_noise_seconds_per_epoch"] / r["non_private_seconds_per_epoch"])


def test_bench_round_emits_every_field_and_leaves_no_worker():
    from tests.conftest import worker_pids

    before = set(worker_pids())
    proc = subprocess.run(
        [sys.executable, "scripts/bench_round.py", "--rounds=1", "--clients_per_round=2",
         "--examples_per_client=10", "--models=mlp", "--worker_counts=1,2", "--memory_rounds=3",
         "--eval_sizes=30,70", "--pin_workers", "--worker_clients=4", "--worker_rounds=2", "--worker_cycles=1",
         "--core_scaling_steps=5",
         "--population=400", "--population_cohorts=20,10", "--population_rounds=3", "--population_timing_rounds=3",
         "--population_examples_per_client=3", "--dp_sgd=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["clients_per_round"] == 2 and report["examples_per_client"] == 10 and report["rounds"] == 1
    assert report["startup_seconds"] > 0 and report["python_peak_rss_mb"] > 0 and report["worker_peak_rss_mb"] > 0
    startup = report["driver_startup"]
    assert startup["command"].endswith("--flagfile=configs/quickstart.cfg --rounds=1")
    assert 0 < startup["seconds_to_first_round"] < startup["seconds_to_exit"]
    assert "dp_sgd" not in report  # --dp_sgd=false (test_bench_round_times_dp_sgd has it)
    assert "cnn" not in report  # --models=mlp: the CNN takes the same code path, only slower
    for key, model in (("mlp", "emnist_2nn"),):
        r = report[key]
        assert r["model"] == model
        assert set(r) == {"model", "dpfl_tff_seconds_per_round", "reference_seconds_per_round",
                          "ratio_dpfl_tff_over_reference", "accounting_seconds_per_round",
                          "dpfl_tff_seconds_per_round_state_back", "ratio_state_back_over_reference",
                          "dpfl_tff_seconds_per_round_2x_clients", "ratio_2x_clients_over_1x",
                          "tff_fedavg_seconds_per_round", "ratio_tff_fedavg_over_reference",
                          "dpfl_tff_seconds_per_round_0_clients", "ratio_0_clients_over_reference",
                          "get_model_weights_seconds", "state_round_trip_seconds", "empty_tff_call_seconds",
                          "evaluation"}
        assert r["ratio_0_clients_over_reference"] == r["dpfl_tff_seconds_per_round_0_clients"] / r["reference_seconds_per_round"]
        assert r["get_model_weights_seconds"] > 0 and r["state_round_trip_seconds"] > 0 and r["empty_tff_call_seconds"] > 0
        ev = r["evaluation"]
        assert set(ev) == {f"{p}eval_seconds_{n}_examples{q}" for n in (30, 70)
                           for p, q in (("", ""), ("ratio_", "_over_round"))}
        for n in (30, 70):
            assert ev[f"eval_seconds_{n}_examples"] > 0
            assert ev[f"ratio_eval_seconds_{n}_examples_over_round"] == (
                ev[f"eval_seconds_{n}_examples"] / r["dpfl_tff_seconds_per_round"])
        assert r["ratio_dpfl_tff_over_reference"] == r["dpfl_tff_seconds_per_round"] / r["reference_seconds_per_round"]
        assert r["ratio_tff_fedavg_over_reference"] == r["tff_fedavg_seconds_per_round"] / r["reference_seconds_per_round"]
        assert all(r[k] > 0 for k in r if k.endswith("_per_round"))
        assert r["ratio_2x_clients_over_1x"] == r["dpfl_tff_seconds_per_round_2x_clients"] / r["dpfl_tff_seconds_per_round"]
    mem = report["memory"]
    assert mem["rounds"] == 3 and mem["samples"] == 3 - 3 // 10
    for who in ("python", "worker"):
        assert mem[f"{who}_rss_mb_first"] > 0 and mem[f"{who}_rss_mb_last"] > 0
        assert isinstance(mem[f"{who}_rss_slope_mb_per_100_rounds"], float)
    w = report["workers"]
    assert w["model"] == "emnist_2nn" and w["clients_per_round"] == 4 and w["pinned_one_core_per_worker"] is True
    assert w["cycles"] == 1  # --worker_cycles=1: one turn each (2 by default)
    assert w["1_workers_seconds_per_round"] > 0 and w["2_workers_seconds_per_round"] > 0
    assert w["ratio_2_over_1_workers"] == w["2_workers_seconds_per_round"] / w["1_workers_seconds_per_round"]
    assert w["speedup_2_over_1_workers"] == 1 / w["ratio_2_over_1_workers"]
    for n in (1, 2, "2_tls"):  # CPU seconds of each pinned worker and of this process, per round
        assert len(w[f"{n}_workers_worker_cpu_seconds_per_round"]) == (2 if n == "2_tls" else n)
        assert all(c >= 0 for c in w[f"{n}_workers_worker_cpu_seconds_per_round"])
        assert w[f"{n}_workers_python_cpu_seconds_per_round"] >= 0
    # the same 2 workers through mutual TLS (--worker_tls, on by default), with its 2 front processes
    assert w["ratio_2_tls_over_2_workers"] == w["2_tls_workers_seconds_per_round"] / w["2_workers_seconds_per_round"]
    fronts = w["2_tls_workers_front_cpu_seconds_per_round"]
    assert len(fronts) == 2 and all(c >= 0 for c in fronts), fronts
    core = w["core_scaling"]  # plain TF on one core alone vs on both cores at once: the hardware's bound
    assert core["steps"] == 5 and core["one_core_alone_seconds"] > 0 and core["two_cores_together_seconds"] > 0
    assert core["speedup_bound_2_cores"] == 2 * core["one_core_alone_seconds"] / core["two_cores_together_seconds"]
    assert w["ratio_speedup_to_bound"] == w["speedup_2_over_1_workers"] / core["speedup_bound_2_cores"]
    pop = report["population"]  # full runs over a population; tiny here (the README's figures: N = 100,000)
    assert pop["num_clients"] == 400 and pop["examples_per_client"] == 3 and set(pop["cohorts"]) == {"10", "20"}
    assert pop["cohorts"]["10"]["rounds"] == 3 and pop["cohorts"]["20"]["rounds"] == 3  # the largest m: all rounds
    for m, entry in pop["cohorts"].items():
        assert entry["ratio_cohort_over_smallest_cohort"] == int(m) / 10
        assert entry["ratio_seconds_over_smallest_cohort"] == (
            entry["seconds_per_round_process"] / pop["cohorts"]["10"]["seconds_per_round_process"])
        assert entry["seconds_per_round_wall"] > 0 and entry["run_seconds"] > 0 and 0 < entry["epsilon"] < 100
        assert entry["seconds_per_round_process_all_rounds"] > 0
        assert 0 < entry["mean_clients_per_round"] <= 400
        for who in ("python", "worker"):
            assert 0 < entry[f"{who}_rss_mb_first"] <= entry[f"{who}_rss_mb_max"]
            assert entry[f"{who}_rss_mb_last"] <= entry[f"{who}_rss_mb_max"]
            assert isinstance(entry[f"{who}_rss_slope_mb_per_100_rounds"], float)
    prep = pop["preparation"]
    assert prep["clients_per_round"] == 20 and prep["ratio_10n_over_n"] == prep["seconds_at_10n"] / prep["seconds_at_n"]
    assert set(worker_pids()) - before == set()
