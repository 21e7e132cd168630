"""experiments.compute_epsilon: same flags and configs as run_federated, JSON last line."""

import dataclasses
import json

import dp_accounting
import pytest
from absl import flags
from absl.testing import flagsaver
from dp_accounting.rdp import RdpAccountant

from experiments import compute_epsilon


@dataclasses.dataclass
class _Result:
    returncode: int
    stdout: str
    stderr: str


def _run(*args):
    """The tool in this process, parsed by its own parser (exit codes and output as from the command line)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with flagsaver.flagsaver(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        flags.FLAGS.unparse_flags()
        try:
            compute_epsilon._parse(["compute_epsilon", *args])
            compute_epsilon.main(["compute_epsilon"])
        except SystemExit as e:
            code = int(e.code or 0)
    return _Result(code, out.getvalue(), err.getvalue())


def test_tutorial_setting_last_line_is_json():
    proc = _run("--num_clients=3383", "--clients_per_round=120", "--noise_multiplier=1.2", "--rounds=100",
                "--target_delta=1e-5", "--client_sampling=poisson", "--accountant=rdp", "--dp_mode=central")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(120 / 3383, dp_accounting.GaussianDpEvent(1.2)), 100)
    assert result["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert result["epsilon"] == pytest.approx(1.986, abs=5e-3)
    assert (result["delta_accountant"], result["noise_multiplier"], result["rounds"]) == (1e-5, 1.2, 100)
    # The stated delta adds the noise sampler's term (privacy.truncation): 2^-92 delta here, the z=1.2 tails less.
    assert result["delta"] == 1e-5 + result["delta_sampler"] and 0 < result["delta_sampler"] < 1e-30
    assert (result["accountant"], result["neighboring_relation"]) == ("rdp", "add_or_remove_one")


def test_target_epsilon_returns_noise_within_target_and_bad_flag_is_one_line():
    proc = _run("--num_clients=1000", "--clients_per_round=50", "--rounds=30", "--target_epsilon=3",
                "--client_sampling=uniform")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["neighboring_relation"] == "replace_one" and result["epsilon"] <= 3
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    z = result["noise_multiplier"]
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(1000, 50, dp_accounting.GaussianDpEvent(z / 2)), 30)
    assert acc.get_epsilon(1000**-1.1) == pytest.approx(result["epsilon"], rel=1e-9)

    bad = _run("--client_sampling=uniform", "--accountant=pld")
    assert bad.returncode == 2
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        bad.stderr.strip().splitlines()[-1]
    ] and "--accountant=pld" in bad.stderr


def test_comma_lists_print_one_json_line_per_combination_then_a_summary():
    proc = _run("--num_clients=1000", "--clients_per_round=20,50", "--noise_multiplier=0.8,1.6", "--rounds=10,40",
                "--target_delta=1e-6")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert len(rows) == summary["combinations"] == 8
    seen = {(r["clients_per_round"], r["noise_multiplier"], r["rounds"]) for r in rows}
    assert seen == {(m, z, t) for m in (20, 50) for z in (0.8, 1.6) for t in (10, 40)}
    for r in rows:  # each row is the single-combination answer
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(r["clients_per_round"] / 1000,
                                                        dp_accounting.GaussianDpEvent(r["noise_multiplier"])),
                    r["rounds"])
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9)
    assert summary["epsilon_min"] == min(r["epsilon"] for r in rows)
    assert summary["epsilon_max"] == max(r["epsilon"] for r in rows)
    assert summary["noise_multiplier"] == [0.8, 1.6] and summary["rounds"] == [10, 40]
    bad = _run("--rounds=10,x")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --rounds=10,x: give one value or a comma list of ints"


@pytest.mark.parametrize("mode,sampling,accountant", [
    ("central", "uniform", "rdp"), ("central", "poisson", "rdp"), ("central", "poisson", "pld"),
    ("local", "uniform", "rdp"), ("local", "uniform", "pld"), ("local", "poisson", "rdp"), ("local", "poisson", "pld"),
])
def test_zero_noise_is_infinite_epsilon_in_every_sampling_and_accountant(mode, sampling, accountant):
    """--noise_multiplier=0 (allowed with canaries: the audit's noise-free run) reports epsilon inf cleanly.

    Before: a fixed cohort (uniform) died in dp-accounting's RDP of a sampled-without-replacement Gaussian
    (ZeroDivisionError), and PLD reported epsilon 0 (the tracker's self-composed PLD dropped the accountant's
    non-DP flag).
    """
    proc = _run("--flagfile=configs/quickstart.cfg", "--noise_multiplier=0", "--canary_clients=10",
                f"--dp_mode={mode}", f"--client_sampling={sampling}", f"--accountant={accountant}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epsilon"] == "inf" and result["noise_multiplier"] == 0.0
    if mode == "local":
        assert result["local_epsilon"] == "inf"


def test_noise_free_events_and_tracker():
    """`noise_free` finds a zero-noise release inside sampling and composition, not one that never happens; the
    tracker gives inf after any round (and 0 after none) without composing."""
    from dpfl_tff.privacy import events

    g0, g1 = dp_accounting.GaussianDpEvent(0.0), dp_accounting.GaussianDpEvent(1.0)
    assert events.noise_free(g0) and events.noise_free(dp_accounting.LaplaceDpEvent(0.0))
    assert events.noise_free(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, g0))
    assert events.noise_free(dp_accounting.ComposedDpEvent([g1, dp_accounting.SelfComposedDpEvent(g0, 3)]))
    assert not events.noise_free(g1) and not events.noise_free(dp_accounting.PoissonSampledDpEvent(0.0, g0))
    assert not events.noise_free(dp_accounting.SelfComposedDpEvent(g0, 0))
    for kind in ("rdp", "pld"):
        rp = events.sampled_gaussian_round(700, 70, "poisson", 0.0)
        tracker = events.EpsilonTracker(rp, 1e-5, kind)
        assert tracker.epsilon(0) == 0.0 and tracker.epsilon(1) == tracker.epsilon(50) == float("inf")
        assert events.epsilon_after(rp, 5, 1e-5, kind) == float("inf")
    rp = events.sampled_gaussian_round(700, 70, "uniform", 0.0)
    assert events.EpsilonTracker(rp, 1e-5, "rdp").epsilon(3) == float("inf")
