"""`--bands=auto`: banded MF's B chosen for the smallest expected prefix-sum error at --target_epsilon."""

from __future__ import annotations

import dataclasses
import json
import os

import dp_accounting
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from dpfl_tff import config as C
from dpfl_tff import plan, training
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import bands_auto
from dpfl_tff.privacy import banded_strategy as bs
from tests.conftest import run_driver

# q = m B / N <= 0.08: dp-accounting's RDP of a Poisson-sampled Gaussian takes ~0.1 s there (seconds at q ~ 0.5).
N, M, T, DELTA = 400, 4, 8, 1e-3


def _cfg(bands="auto", rounds=T, tmp_path=None, **dp) -> C.ExperimentConfig:
    return C.ExperimentConfig(
        task=C.TaskConfig(task="digits", num_clients=N),
        train=C.TrainConfig(model="logistic", rounds=rounds, clients_per_round=M, client_sampling="banded",
                            eval_every=0, sampling_seed=5),
        dp=C.DPConfig(mode="bandmf", bands=bands, clip_norm=0.5, target_delta=DELTA, **dp),
        output_dir=str(tmp_path / "run") if tmp_path else "runs/x",
    ).validate()


def _hand_epsilon(bands: int, z: float, rounds: int = T, integer_orders: bool = False) -> float:
    """The banded event built by hand: ceil(T / B) Poisson(q = m B / N) Gaussian(z) participations.

    `integer_orders`: RDP at the integer orders among dp-accounting's default ones only (the ranking's)."""
    orders = dp_accounting.rdp.RdpAccountant().orders
    acc = dp_accounting.rdp.RdpAccountant(orders=[o for o in orders if float(o).is_integer()] if integer_orders
                                          else orders)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(M * bands / N, dp_accounting.GaussianDpEvent(z)), -(-rounds // bands)))
    return acc.get_epsilon(DELTA)


def _dense_loss(coefficients, rounds: int) -> float:
    """||A C^-1||_F^2 / T with dense matrices."""
    c = bs.toeplitz(coefficients, rounds)
    return float(np.linalg.norm(np.tril(np.ones((rounds, rounds))) @ np.linalg.inv(c)) ** 2 / rounds)


def test_auto_chooses_the_brute_force_minimum():
    """Every B in 1..T = 1..8 (q <= 1 allows 100): z checked by hand to be the smallest reaching the target
    by RDP at integer orders (within 0.1%), the loss from dense matrices; the argmin of z^2 * loss is the
    plan's B. The run's calibration then gives the chosen B the run's own z: no larger, so still the argmin."""
    target = 2.0
    cfg = plan.check(_cfg(target_epsilon=target))
    found = {b: (z, e) for b, z, _, e in cfg.dp.bands_auto}
    assert sorted(found) == list(range(1, T + 1))
    brute = {}
    for b, (z, _) in found.items():
        assert _hand_epsilon(b, z, integer_orders=True) <= target < _hand_epsilon(b, z * 0.999, integer_orders=True)
        brute[b] = z * z * _dense_loss(bs.optimize_banded(T, b).coefficients, T)
    expected = min(brute, key=lambda b: (brute[b], b))
    ordered = sorted(brute.values())
    assert ordered[1] > ordered[0] * 1.005  # a clear minimum: z's 0.1% leaves the order of the errors as it is
    assert cfg.dp.bands == expected
    for b, (_, e) in found.items():
        assert e == pytest.approx(brute[b], rel=1e-9)

    run = plan.calibrated(cfg)[0]
    z_run = run.dp.noise_multiplier
    assert _hand_epsilon(expected, z_run) <= target < _hand_epsilon(expected, z_run * 0.999)
    assert z_run <= found[expected][0]
    after = {b: (z, e) for b, z, _, e in run.dp.bands_auto}
    assert after[expected][0] == z_run and min(after, key=lambda b: (after[b][1], b)) == expected
    assert {b: v for b, v in after.items() if b != expected} == {b: v for b, v in found.items() if b != expected}


def test_the_dry_run_compute_epsilon_and_the_python_api_say_the_same_choice(tmp_path):
    """One test, so that one process calibrates each B once (bands_auto's cache): ~2 s per B here."""
    _dry_run_prints_the_choice(tmp_path)
    _compute_epsilon_says_which_b_it_chose()
    _the_python_api_takes_auto_and_integers(tmp_path)


def test_auto_needs_a_target_epsilon():
    with pytest.raises(ConfigError, match=r"^--bands=auto: needs --target_epsilon"):
        plan.check(_cfg(noise_multiplier=1.0))


def test_the_driver_refuses_auto_without_a_target_epsilon(tmp_path, capsys):
    code = run_driver(["--task=digits", f"--num_clients={N}", f"--clients_per_round={M}", f"--rounds={T}",
                       "--dp_mode=bandmf", "--bands=auto", "--noise_multiplier=1", "--dry_run",
                       f"--output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --bands=auto: needs --target_epsilon")


def test_the_flag_takes_integers_as_before_and_auto():
    from experiments import flags as dpfl_flags

    parser = dpfl_flags.HOLDERS["bands"]._flagvalues["bands"].parser
    assert parser.parse("4") == 4 and parser.parse(7) == 7 and parser.parse("auto") == "auto"
    with pytest.raises(ValueError, match="is not an integer or auto"):
        parser.parse("four")
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["x", "--bands=3"])
        assert dpfl_flags.experiment_config().dp.bands == 3
    with pytest.raises(ConfigError, match=r"--bands=0: must be an integer >= 1"):
        _cfg(bands=0)
    with pytest.raises(ConfigError, match=r"--bands=autox: must be an integer >= 1, or auto"):
        _cfg(bands="autox")


def test_an_integer_bands_is_left_as_given():
    cfg = plan.check(_cfg(bands=3, noise_multiplier=1.5))
    assert cfg.dp.bands == 3 and cfg.dp.bands_auto is None


def test_buffers_that_do_not_fit_are_not_candidates(monkeypatch):
    monkeypatch.setattr(bands_auto, "memory_bytes", lambda: 4 * 2**30)
    # A quarter of 4 GiB holds 1 GiB: B - 1 <= 2**30 / (8 * 40e6) = 3.36 copies of a 40M-parameter model.
    assert bands_auto.feasible_bands(_cfg(target_epsilon=2.0), 40_000_000) == [1, 2, 3, 4]
    assert bands_auto.feasible_bands(_cfg(target_epsilon=2.0)) == list(range(1, T + 1))  # size unknown: rounds
    few = dataclasses.replace(_cfg(target_epsilon=2.0), train=dataclasses.replace(_cfg().train, clients_per_round=80))
    assert bands_auto.feasible_bands(few) == [1, 2, 3, 4, 5]  # q = 80 B / 400 <= 1


def _dry_run_prints_the_choice(tmp_path):
    lines: list[str] = []
    cfg = plan.check(_cfg(target_epsilon=2.0, tmp_path=tmp_path))
    training.dry_run(cfg, log=lines.append)
    line = next(s for s in lines if s.startswith("privacy: "))
    assert line.startswith(f"privacy: bands: auto -> B={cfg.dp.bands} (expected prefix-sum error")
    assert not (tmp_path / "run").exists()


def test_a_run_writes_the_choice_to_its_summary_and_strategy(tmp_path):
    cfg = _cfg(target_epsilon=2.0, rounds=4, tmp_path=tmp_path)
    result = training.run(cfg, log=lambda s: None)
    summary = result.summary
    chosen = summary["bands_chosen"]
    assert summary["bands"] == chosen and summary["bands_requested"] == "auto"
    errors = {c["bands"]: c["expected_error"] for c in summary["bands_auto_candidates"]}
    assert sorted(errors) == list(range(1, 5)) and errors[chosen] == min(errors.values())
    strategy = json.load(open(os.path.join(cfg.output_dir, "strategy.json")))
    assert strategy["bands"] == chosen and strategy["bands_chosen"] == chosen
    assert summary["noise_multiplier"] == pytest.approx(
        next(c["noise_multiplier"] for c in summary["bands_auto_candidates"] if c["bands"] == chosen))
    assert dataclasses.asdict(cfg)["dp"]["bands"] == "auto"  # the caller's config is not changed


def _compute_epsilon_says_which_b_it_chose():
    from tests.test_compute_epsilon import _run

    proc = _run(f"--num_clients={N}", f"--clients_per_round={M}", f"--rounds={T}", "--dp_mode=bandmf",
                "--bands=auto", "--target_epsilon=2", f"--target_delta={DELTA}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"bands: auto -> B={result['bands_chosen']} (expected prefix-sum error" in proc.stdout
    assert result["bands"] == result["bands_chosen"] and result["bands_requested"] == "auto"
    assert result["epsilon"] <= 2.0 and len(result["bands_auto_candidates"]) == T


def _the_python_api_takes_auto_and_integers(tmp_path):
    from dpfl_tff import api

    assert api.make_config(dp_mode="bandmf", bands=3, num_clients=N, clients_per_round=M, rounds=T).dp.bands == 3
    cfg = api.make_config(task="digits", dp_mode="bandmf", bands="auto", target_epsilon=2.0, target_delta=DELTA,
                          num_clients=N, clients_per_round=M, rounds=T)
    assert isinstance(cfg.dp.bands, int) and cfg.dp.bands_auto is not None  # plan.check resolved it (N known)
    with pytest.raises(ConfigError, match="--bands=many: must be an integer >= 1, or auto"):
        api.make_config(dp_mode="bandmf", bands="many")
    with pytest.raises(ConfigError, match="is not an integer or auto"):  # a flagfile's value goes through the parser
        flagfile = tmp_path / "bad.cfg"
        flagfile.write_text("--bands=many\n")
        api.make_config(str(flagfile), dp_mode="bandmf")
