"""The contract every registered privacy mechanism keeps (issue 24), run over `registry.MECHANISMS`.

A new mechanism is a module in privacy/ and a registry line; these tests then
check it without being told about it:

* each executed round is one release: `commit` counts it once, and one
  ledger.jsonl line of a run holds it;
* the ledger round trip: a fresh ledger that replays the run's ledger lines
  gives the same figures as the ledger that committed them;
* the budget guard's preview of a round is never below what committing that
  round then reports (for both views `--max_epsilon_view` offers);
* the plan's prediction for a new run is never below what the run spends;
* every field a metrics line holds is declared in `round_record`, and the
  fields the summary lists as not covered by epsilon are the ones the
  metrics hold (and none of them with --client_metrics=false).
"""

import dataclasses
import json
import math
import os

import pytest

from dpfl_tff import plan, round_record
from dpfl_tff.config import DPConfig, ExperimentConfig, TaskConfig, TrainConfig
from dpfl_tff.privacy import coverage, registry

N, M, ROUNDS, DELTA = 60, 6, 12, 1e-3
# Every mechanism with each scheme it accepts and each local mechanism: the variants a registry line adds.
VARIANTS = [
    (mode, sampling, local)
    for mode, cls in registry.MECHANISMS.items()
    for sampling in ([cls.default_client_sampling] if cls.default_client_sampling else ["poisson", "uniform"])
    for local in (["gaussian", "laplace"] if mode == "local" else ["gaussian"])
] + [("example", "poisson", "gaussian")]  # --dp_level=example's mechanism (`registry.mechanism_class`)


def _cfg(mode: str, sampling: str, local: str, **train) -> ExperimentConfig:
    """A small synthetic run of `mode`; "example": record-level DP-SGD (two record counts: few curves)."""
    example = mode == "example"
    cls = registry.MECHANISMS["none" if example else mode]
    return ExperimentConfig(
        task=TaskConfig(task="synthetic", num_clients=N, synthetic_examples_per_client=4, synthetic_input_dim=3),
        train=TrainConfig(**{"model": "logistic", "rounds": ROUNDS, "clients_per_round": M,
                             "client_sampling": sampling, "sampling_seed": 3, "eval_every": 0,
                             **({"server_optimizer": "sgd"} if mode == "ftrl" else {}), **train}),
        dp=DPConfig(mode="none" if example else mode, noise_multiplier=0.0 if not cls.provides_dp else 2.0,
                    clip_norm=0.5, local_mechanism=local, target_delta=DELTA, noise_seed=None,
                    **({"dp_level": "example", "example_noise_multiplier": 1.5,
                        "record_counts": (20, 35) * (N // 2)} if example else {})),
    )


def test_every_registered_mechanism_has_variants_here():
    assert {mode for mode, _, _ in VARIANTS} == {*registry.MECHANISMS, "example"}


@pytest.mark.parametrize("mode,sampling,local", VARIANTS)
def test_one_release_per_round_the_ledger_round_trip_and_a_preview_never_below_the_outcome(mode, sampling, local):
    cfg = plan.check(_cfg(mode, sampling, local))
    mechanism = registry.mechanism_for(cfg)
    ledger = mechanism.ledger()
    sampler = mechanism.scheme.sampler(N, M, sampling_seed=11)
    entries, out = [], {}
    for r in range(1, ROUNDS + 1):
        fields = ledger.begin_round(r)
        cohort = sampler.cohort(r)
        previews = {view: ledger.preview_of(cohort, view) for view in ("guarantee", "central")}
        out = ledger.commit(cohort)
        assert ledger.released == r and out.get("rounds_accounted", r) == r  # one release per executed round
        for view, (eps, field) in previews.items():
            assert field in out, (view, field)
            # Never below the outcome; equal up to the accountant's float noise (a preview is the same sum).
            assert eps >= out[field] * (1 - 1e-9), (view, eps, out[field])
        entries.append({**fields, "round": r, "release": r, "execution": 1,
                        **({"cohort": [int(c) for c in cohort]} if mechanism.records_cohorts else {})})
    final = ledger.projected(ROUNDS, ROUNDS)
    ledger.close()
    replayed = mechanism.ledger()
    for entry in entries:
        replayed.replay_entry(entry)
    again = replayed.projected(ROUNDS, ROUNDS)
    replayed.close()
    assert again.keys() == final.keys()
    for key, value in final.items():
        if isinstance(value, float):
            assert again[key] == pytest.approx(value, rel=1e-9, abs=1e-300), key
        else:
            assert again[key] == value, key
    assert final["epsilon"] == pytest.approx(out["epsilon"], rel=1e-9) or final["epsilon"] == out["epsilon"]
    # The plan of a new run (every round, the worst client in all of them) never promises less than is spent.
    planned = mechanism.projected([], 0, ROUNDS)
    guarded = previews["guarantee"][1]  # the epsilon the guarantee is stated in (record_epsilon at record level)
    for field in {"epsilon", guarded}:
        assert planned[field] >= out[field] * (1 - 1e-9), field
    assert planned["delta_sampler"] >= out["delta_sampler"] * (1 - 1e-9)
    assert math.isinf(out[guarded]) == (not mechanism.provides_dp)


@pytest.mark.parametrize("mode", list(registry.MECHANISMS))
def test_the_fields_not_covered_are_the_ones_the_metrics_hold(mode, tmp_path):
    from dpfl_tff import training

    cls = registry.MECHANISMS[mode]
    sampling = cls.default_client_sampling or "poisson"
    for client_metrics in (True, False) if mode == "central" else (True,):  # false: central has the most to drop
        out = str(tmp_path / f"metrics_{client_metrics}")
        cfg = dataclasses.replace(_cfg(mode, sampling, "gaussian", rounds=2), output_dir=out,
                                  client_metrics=client_metrics)
        result = training.run(cfg, log=lambda s: None)
        summary = json.load(open(os.path.join(out, "summary.json")))
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert len(lines) == 2 == len(open(os.path.join(out, "ledger.jsonl")).readlines())  # one release a round
        listed = set(summary["outputs_not_covered_by_epsilon"])
        assert listed == set(coverage.not_covered(cfg)) == set(result.summary["outputs_not_covered_by_epsilon"])
        in_metrics = set().union(*(line.keys() for line in lines))
        assert in_metrics <= set(round_record.names()), in_metrics - set(round_record.names())  # all declared
        # Every listed field but the run's wall time (a summary field) is in every metrics line ...
        for line in lines:
            assert listed - {"wall_seconds"} <= line.keys(), (client_metrics, listed - line.keys())
        assert ("wall_seconds" in summary) == ("wall_seconds" in listed)
        # ... and no field that coverage names as possibly uncovered is written unless listed (the realised
        # cohort size is covered under replace-one or a fixed size: then it is written and not listed).
        possibly = {*coverage.CLIENT_TRAINING_FIELDS, *coverage.TIMING_FIELDS}
        if not coverage.cohort_size_covered(cfg):
            possibly.add(coverage.COHORT_SIZE_FIELD)
        assert (in_metrics | set(summary)) & possibly <= listed, (client_metrics, (in_metrics & possibly) - listed)
        if not client_metrics:
            assert listed == set()


@pytest.mark.parametrize("fedavg_impl", ["grouped", "tff"])
def test_an_adaptive_clip_lives_in_the_query_state_across_rounds_and_a_resume(fedavg_impl, tmp_path):
    from dpfl_tff import training

    # The loop carries no clip: each round's clip is read from the state it runs from (mechanism.clip_in).
    out = str(tmp_path / "adaptive")

    def cfg(rounds):
        base = _cfg("central", "uniform", "gaussian", rounds=rounds, fedavg_impl=fedavg_impl, checkpoint_every=1)
        return dataclasses.replace(base, output_dir=out, dp=dataclasses.replace(
            base.dp, adaptive_clipping=True, noise_multiplier=0.3, clip_norm=0.05))

    training.run(cfg(3), log=lambda s: None)
    training.run(cfg(5), log=lambda s: None)  # resumes from the checkpoint of round 3
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["clip_norm"] == 0.05  # the configured clip, as given
    for prev, row in zip(rows, rows[1:]):
        assert row["clip_norm"] == prev["next_clip_norm"], (row["round"], row["clip_norm"], prev["next_clip_norm"])
    assert len({r["next_clip_norm"] for r in rows}) > 1  # the clip moved: the check above is not of a constant


def test_the_two_parts_split_the_protocol_and_the_accounting_part_needs_no_tensorflow():
    """`AggregationPart` (TensorFlow) and `AccountingPart` (pure) share no method; a fresh interpreter in which
    tensorflow, tensorflow_federated and tensorflow_privacy cannot be imported builds every registered
    mechanism (and record-level DP-SGD) and runs its accounting part: plan, ledger rounds, prediction."""
    import inspect
    import subprocess
    import sys

    from dpfl_tff.privacy import mechanism as m

    def own(cls):
        return {n for n, v in vars(cls).items() if not n.startswith("__") and (callable(v) or isinstance(v, property))}

    assert own(m.AggregationPart) & own(m.AccountingPart) == set()
    assert {"query", "prepare_state", "clip_in", "record_fields"} <= own(m.AggregationPart)
    assert {"round_privacy", "ledger", "planned_event", "projected", "check_accountable"} <= own(m.AccountingPart)
    assert inspect.isabstract(m.AggregationPart) and not inspect.isabstract(m.AccountingPart)
    script = f"""
import sys
for name in ("tensorflow", "tensorflow_federated", "tensorflow_privacy"):
    sys.modules[name] = None  # import raises ImportError
from dpfl_tff import plan
from dpfl_tff.privacy import registry
from tests.test_mechanism_contract import VARIANTS, _cfg  # that module imports no TensorFlow at its top
done = []
for mode, sampling, local in VARIANTS:
    cfg = plan.check(_cfg(mode, sampling, local))
    accounting = registry.mechanism_for(cfg).accounting
    accounting.check_accountable()
    ledger = accounting.ledger()
    sampler = accounting.scheme.sampler({N}, {M}, sampling_seed=1)
    for r in range(1, 4):
        ledger.begin_round(r)
        ledger.commit(sampler.cohort(r))
    ledger.close()
    planned = accounting.projected([], 0, {ROUNDS})
    assert planned["epsilon"] >= 0, planned
    accounting.planned_out_of_reach({ROUNDS})
    done.append(mode)
assert "tensorflow" not in [k for k, v in sys.modules.items() if v is not None], "TensorFlow was imported"
print(" ".join(sorted(set(done))))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == sorted({*registry.MECHANISMS, "example"}), proc.stdout
