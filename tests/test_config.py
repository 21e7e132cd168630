import math

import pytest

from dpfl_tff import plan
from dpfl_tff.config import ConfigError, DPConfig, ExperimentConfig, TaskConfig, TrainConfig, default_delta


def _cfg(task=None, train=None, dp=None) -> ExperimentConfig:
    return ExperimentConfig(task=task or TaskConfig(), train=train or TrainConfig(), dp=dp or DPConfig())


@pytest.mark.parametrize(
    "cfg, flag, words",
    [
        (_cfg(dp=DPConfig(noise_multiplier=-1.0)), "--noise_multiplier=-1.0", ">= 0"),
        (_cfg(dp=DPConfig(noise_multiplier=math.nan)), "--noise_multiplier=nan", "finite"),
        (_cfg(dp=DPConfig(clip_norm=0.0)), "--clip_norm=0.0", "> 0"),
        (_cfg(train=TrainConfig(clients_per_round=101)), "--clients_per_round=101", "<= --num_clients=100"),
        (_cfg(train=TrainConfig(rounds=0)), "--rounds=0", ">= 1"),
        (_cfg(dp=DPConfig(target_delta=1.0)), "--target_delta=1.0", "(0, 1)"),
        (_cfg(dp=DPConfig(target_delta=0.0)), "--target_delta=0.0", "(0, 1)"),
        (_cfg(task=TaskConfig(task="mnist")), "--task=mnist", "digits, synthetic"),
        (_cfg(train=TrainConfig(model="resnet")), "--model=resnet", "mlp"),
        (_cfg(train=TrainConfig(client_optimizer="rmsprop")), "--client_optimizer=rmsprop", "sgd, sgdm, adam"),
        (_cfg(dp=DPConfig(mode="secure")), "--dp_mode=secure", "none, central, local"),
        (_cfg(dp=DPConfig(mode="local", noise_multiplier=0.0)), "--noise_multiplier=0 with --dp_mode=local", "no privacy"),
        (_cfg(dp=DPConfig(mode="local", adaptive_clipping=True)), "--adaptive_clipping with --dp_mode=local", "fixed"),
        (_cfg(dp=DPConfig(local_mechanism="cauchy")), "--local_mechanism=cauchy", "gaussian, laplace"),
        (_cfg(dp=DPConfig(accountant="gdp")), "--accountant=gdp", "rdp, pld"),
        (_cfg(dp=DPConfig(noise_multiplier=0.0)), "--noise_multiplier=0 with --dp_mode=central", "--dp_mode=none"),
    ],
)
def test_bad_values_name_flag_value_and_range(cfg, flag, words):
    # plan.check: cfg.validate() (ranges, names) and the settings the privacy mode refuses (its mechanism).
    with pytest.raises(ConfigError) as e:
        plan.check(cfg)
    msg = str(e.value)
    assert flag in msg and words in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("mode", ["central", "local", "ftrl"])
def test_zero_noise_is_refused_by_every_dp_mode_and_fine_without_dp(mode):
    """Every check a run makes before training (`plan.check`): zero noise is refused with a line naming
    the flag under each DP mode, and passes without DP (where it is the only setting that makes sense)."""
    sampling = "shuffle" if mode == "ftrl" else "poisson"
    with pytest.raises(ConfigError, match=r"--noise_multiplier=0.*(no privacy|infinite)"):
        plan.check(_cfg(dp=DPConfig(mode=mode, noise_multiplier=0.0),
                        train=TrainConfig(client_sampling=sampling)))
    assert plan.check(_cfg(dp=DPConfig(mode="none", noise_multiplier=0.0))).dp.noise_multiplier == 0.0


def test_default_delta_is_one_over_n_to_the_1_1():
    cfg = _cfg(task=TaskConfig(num_clients=1000))
    assert cfg.target_delta == pytest.approx(1000**-1.1)
    assert cfg.target_delta == default_delta(1000) < 1 / 1000
    assert _cfg(dp=DPConfig(target_delta=1e-5)).target_delta == 1e-5


def test_config_names_match_the_registries():
    """config.py stays a leaf: it lists the registered names itself; the registries must agree."""
    from dpfl_tff import config, models, tasks

    assert tuple(tasks.TASKS) == config.TASK_NAMES
    assert tuple(models.MODELS) == config.MODEL_NAMES
