r"""Epsilon of a planned run without training, or the noise for a target epsilon.

  uv run python -m experiments.compute_epsilon --num_clients=3383 \
      --clients_per_round=120 --noise_multiplier=1.2 --rounds=100 --target_delta=1e-5

Uses the same flags and configuration objects as `run_federated` (task flags
other than --num_clients are ignored: no data is loaded, so for emnist give
--num_clients=3383 (digits) or 3400, for cifar100 500). With
--target_epsilon=E it returns the smallest noise multiplier whose epsilon after
--rounds is <= E. The last line of stdout is one JSON object.

--noise_multiplier, --rounds and --clients_per_round also take comma lists
(e.g. --noise_multiplier=0.8,1,1.2 --rounds=100,200): then every combination
is computed and printed as one JSON line, and the last line is a JSON summary
(`combinations`, the lists, the smallest and largest epsilon). It imports no
TensorFlow (dp-accounting only) and answers in about a second.

--select=private gives the epsilon of a sweep's private selection instead
(`dpfl_tff.selection`): K candidates (--repetitions, --repetitions_mean,
--repetitions_shape), each a run of these flags plus its private score
(--score_noise_multiplier, --score_sampling_rate), the best released;
comma lists are then the grid the candidates are drawn from. The JSON line
holds `procedure_epsilon` beside `per_run_epsilon` and the plain composition
of --repetitions_mean runs (rounded up).

--dp_level=example gives record_epsilon (the maximum over clients of their
record-level epsilon, every client in all --rounds or --participations) and
every client's value in record_epsilon_per_client; it needs each client's
record count: --records_per_client, or else the task's data is loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

from absl import flags

from dpfl_tff.config import ConfigError
from dpfl_tff import api, plan
from dpfl_tff.privacy import accounting
from dpfl_tff import selection
from experiments import cli
from experiments import flags as dpfl_flags
from experiments import selection_flags

RECORDS_PER_CLIENT = flags.DEFINE_list(
    "records_per_client",
    [],
    "--dp_level=example: each client's record count n_i (integers >= 1), a comma list of --num_clients values, "
    "or one value for every client. Unset: the task's data is loaded to count them (imports TensorFlow).",
)
PARTICIPATIONS = flags.DEFINE_integer(
    "participations",
    None,
    "--dp_mode=local: rounds the worst client takes part in (>= 1, <= --rounds); unset = --rounds.",
)


def compute(cfg, participations: int | None = None) -> dict:
    """The figures printed by this tool, for a validated configuration (`dpfl_tff.epsilon`'s)."""
    return api.planned_epsilon(cfg, participations)


# Flags that take a comma list here; `_parse` keeps the lists and hands absl the first value.
LIST_FLAGS = {"noise_multiplier": float, "rounds": int, "clients_per_round": int}
_lists: dict[str, list] = {}


def _jsonable(result: dict) -> str:
    return json.dumps({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()})


def _combinations(cfg) -> list:
    """One configuration per combination of the comma-listed values (just `cfg` without lists)."""
    names = [n for n in LIST_FLAGS if n in _lists]
    out = []
    for values in itertools.product(*(_lists[n] for n in names)):
        c = cfg
        for name, value in zip(names, values):
            if name == "noise_multiplier":
                c = dataclasses.replace(c, dp=dataclasses.replace(c.dp, noise_multiplier=value))
            else:
                c = dataclasses.replace(c, train=dataclasses.replace(c.train, **{name: value}))
        out.append(c)
    return out


def compute_selection(cfgs: list, sel: selection.SelectionConfig) -> dict:
    """--select=private: the procedure's figures over the candidates `cfgs` (validated), one per grid setting."""
    cands = []
    for i, c in enumerate(cfgs):
        c = accounting.with_calibrated_noise(c)
        cands.append(selection.candidate_for(f"combination {i} (noise_multiplier={c.dp.noise_multiplier:g}, "
                                             f"rounds={c.train.rounds}, clients_per_round="
                                             f"{c.train.clients_per_round})", c, sel))
    deltas = {c.target_delta for c in cfgs}
    if len(deltas) > 1:
        raise ConfigError("--select=private: the combinations have different deltas; give one --target_delta")
    typical = [cands[0]] * math.ceil(sel.repetitions_mean)
    out = selection.procedure_privacy(cands, sel, cfgs[0].target_delta, typical)
    out["plain_composition_of"] = len(typical)
    return {"select": "private", "candidates": len(cands), **out}


def main(argv: list[str]) -> None:
    del argv  # cli.parser_for refuses stray arguments
    try:
        cfg = dpfl_flags.experiment_config()
        sel = selection_flags.selection_config()
        # No data is loaded here: N is --num_clients, also for tasks with their own split.
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, num_clients_known=True))
        if cfg.dp.dp_level == "example":
            cfg = api.with_record_counts(plan.check(cfg), RECORDS_PER_CLIENT.value)
        if sel.select == "private":
            result = compute_selection([plan.check(c) for c in _combinations(cfg)], sel)
            print(f"procedure epsilon {result['procedure_epsilon']:.6g} at delta {result['delta']:.3g} for the best "
                  f"of K candidates, K {result['repetitions_distribution']} (RepeatAndSelect, RDP); one run "
                  f"{result['per_run_epsilon']:.6g}, {result['per_run_epsilon_with_score']:.6g} with its score; "
                  f"{result['plain_composition_of']} runs composed {result['plain_composition_epsilon']:.6g}")
            print(_jsonable(result))
            return
        results = [compute(plan.check(c), PARTICIPATIONS.value) for c in _combinations(cfg)]
    except ConfigError as e:
        cli.usage_error(str(e))
    if len(results) > 1:
        for r in results:
            print(_jsonable(r))
        eps = [r["epsilon"] for r in results]
        record = [r["record_epsilon"] for r in results if "record_epsilon" in r]
        print(_jsonable({
            **({"record_epsilon_min": min(record), "record_epsilon_max": max(record)} if record else {}),
            "combinations": len(results), **{n: v for n, v in _lists.items()},
            "epsilon_min": min(eps), "epsilon_max": max(eps),
            "delta": results[0]["delta"], "accountant": results[0]["accountant"],
            "neighboring_relation": results[0]["neighboring_relation"],
        }))
        return
    result = results[0]
    if "record_epsilon" in result:  # --dp_level=example
        if result["target_epsilon"] is not None:
            print(f"calibrated example noise multiplier: {result['example_noise_multiplier']:.6g} for record epsilon "
                  f"<= {result['target_epsilon']:g}")
        print(f"record epsilon {result['record_epsilon']:.6g} at delta {result['delta']:.3g} after {result['rounds']} "
              f"rounds, the maximum over {result['num_clients']} clients ({result['analysis']}; "
              f"{result['accountant'].upper()}); client level: no guarantee (epsilon inf)")
    elif result["neighboring_relation"] is None:
        print("--dp_mode=none: no DP guarantee, epsilon is infinite")
    else:
        if "bands_chosen" in result:  # --bands=auto: every feasible B's expected error is in the JSON line
            errors = {c["bands"]: c["expected_error"] for c in result["bands_auto_candidates"]}
            print(f"bands: auto -> B={result['bands_chosen']} (expected prefix-sum error "
                  f"{errors[result['bands_chosen']]:.4g}; B=1: {errors[1]:.4g}; {len(errors)} feasible B tried)")
        if result["target_epsilon"] is not None:
            print(f"calibrated noise multiplier: {result['noise_multiplier']:.6g} for epsilon <= {result['target_epsilon']:g}")
        if "local_epsilon" in result:
            print(f"local epsilon {result['local_epsilon']:.6g} (what each client has against the server)")
        print(
            f"epsilon {result['epsilon']:.6g} at delta {result['delta']:.3g} (--target_delta "
            f"{result['delta_accountant']:.3g} + the noise sampler's {result['delta_sampler']:.2g}) after {result['rounds']} rounds "
            f"({result['analysis']}; {result['accountant'].upper()})"
        )
        if "epsilon_if_cohorts_secret" in result:
            print(f"epsilon {result['epsilon_if_cohorts_secret']:.6g} only for a reader who never sees the cohorts "
                  "(ledger.jsonl lists them: not the guarantee)")
    print(_jsonable(result))


def _parse(argv: list[str]) -> list[str]:
    """absl's parse (through `cli`), after taking the comma lists out of `LIST_FLAGS`."""
    _lists.clear()
    expanded = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    kept = [argv[0]]
    for arg in expanded:
        name, sep, value = arg.lstrip("-").partition("=")
        if arg.startswith("--") and sep and name in LIST_FLAGS and "," in value:
            try:
                _lists[name] = [LIST_FLAGS[name](v) for v in value.split(",")]
            except ValueError:
                cli.usage_error(f"--{name}={value}: give one value or a comma list of {LIST_FLAGS[name].__name__}s")
            arg = f"--{name}={value.split(',')[0]}"
        kept.append(arg)
    return cli.parser_for(__doc__, GROUPS)(kept)


_USED = (dpfl_flags.NUM_CLIENTS, dpfl_flags.ROUNDS, dpfl_flags.CLIENTS_PER_ROUND, dpfl_flags.CLIENT_SAMPLING)
_PRIVACY = tuple(f for f in dpfl_flags.PRIVACY_FLAGS if f.name != "noise_seed")
_SHOWN = {f.name for f in (*_USED, *_PRIVACY)}
GROUPS = (
    ("Population and schedule", _USED),
    ("Privacy", (*_PRIVACY, PARTICIPATIONS, RECORDS_PER_CLIENT)),
    ("Private selection (as experiments.sweep --select=private)", selection_flags.register_for(__name__)),
    ("Accepted and ignored (so that run_federated's flagfiles work here)",
     tuple(f for _, group in dpfl_flags.GROUPS for f in group if f.name not in _SHOWN)),
)

if __name__ == "__main__":
    from absl import app

    app.run(main, flags_parser=_parse)
