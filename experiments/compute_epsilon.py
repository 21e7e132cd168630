"""Epsilon of a planned run without training, or the noise for a target epsilon.

  uv run python -m experiments.compute_epsilon --num_clients=3383 \
      --clients_per_round=120 --noise_multiplier=1.2 --rounds=100 --target_delta=1e-5

Uses the same flags and configuration objects as `run_federated` (task flags
other than --num_clients are ignored: no data is loaded, so for emnist give
--num_clients=3383 (digits) or 3400, for cifar100 500). With
--target_epsilon=E it returns the smallest noise multiplier whose epsilon after
--rounds is <= E. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math

from absl import flags

from dpfl_tff.config import ConfigError
from dpfl_tff.privacy import accounting
from experiments import cli
from experiments import flags as dpfl_flags

PARTICIPATIONS = flags.DEFINE_integer(
    "participations",
    None,
    "--dp_mode=local: rounds the worst client takes part in (>= 1, <= --rounds); unset = --rounds.",
)


def compute(cfg, participations: int | None = None) -> dict:
    """The figures printed by this tool, for a validated configuration."""
    if participations is not None and not 1 <= participations <= cfg.train.rounds:
        raise ConfigError(f"--participations={participations}: must be in [1, --rounds={cfg.train.rounds}]")
    cfg = accounting.with_calibrated_noise(cfg)
    ledger = accounting.make_ledger(cfg)
    result = {
        "dp_mode": cfg.dp.mode,
        "num_clients": cfg.task.num_clients,
        "clients_per_round": cfg.train.clients_per_round,
        "client_sampling": cfg.train.client_sampling,
        "rounds": cfg.train.rounds,
        "noise_multiplier": cfg.dp.noise_multiplier,
        "delta": cfg.target_delta,
        "accountant": cfg.dp.accountant,
        "neighboring_relation": ledger.neighboring_relation,
        "target_epsilon": cfg.dp.target_epsilon,
    }
    if cfg.dp.mode == "local":
        result["local_mechanism"] = cfg.dp.local_mechanism
    result.update(ledger.planned(cfg.train.rounds, participations))
    ledger.close()
    return result


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    try:
        cfg = dpfl_flags.experiment_config()
        # No data is loaded here: N is --num_clients, also for tasks with their own split.
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, num_clients_known=True))
        result = compute(cfg.validate(), PARTICIPATIONS.value)
    except ConfigError as e:
        cli.usage_error(str(e))
    if result["neighboring_relation"] is None:
        print("--dp_mode=none: no DP guarantee, epsilon is infinite")
    else:
        if result["target_epsilon"] is not None:
            print(f"calibrated noise multiplier: {result['noise_multiplier']:.6g} for epsilon <= {result['target_epsilon']:g}")
        if "local_epsilon" in result:
            print(f"local epsilon {result['local_epsilon']:.6g} (what each client has against the server)")
        print(
            f"epsilon {result['epsilon']:.6g} at delta {result['delta']:.3g} after {result['rounds']} rounds "
            f"({result['analysis']}; {result['accountant'].upper()})"
        )
    print(json.dumps({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}))


_USED = (dpfl_flags.NUM_CLIENTS, dpfl_flags.ROUNDS, dpfl_flags.CLIENTS_PER_ROUND, dpfl_flags.CLIENT_SAMPLING)
_PRIVACY = tuple(f for f in dpfl_flags.PRIVACY_FLAGS if f.name != "noise_seed")
_SHOWN = {f.name for f in (*_USED, *_PRIVACY)}
GROUPS = (
    ("Population and schedule", _USED),
    ("Privacy", (*_PRIVACY, PARTICIPATIONS)),
    ("Accepted and ignored (so that run_federated's flagfiles work here)",
     tuple(f for _, group in dpfl_flags.GROUPS for f in group if f.name not in _SHOWN)),
)

if __name__ == "__main__":
    cli.run(main, __doc__, GROUPS)
