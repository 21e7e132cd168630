"""The fields of a round's record (a metrics.jsonl line), each with what the reported epsilon says about it.

One declaration from which the rest is derived: the coverage lists
(`privacy.coverage`: which released fields epsilon does not cover), the
summary's copies of the last round's ledger figures (`observers.summarize`),
TensorBoard's scalars (`outputs.TensorBoardLog`) and the tests' allowed sets.
A field a run writes that is not declared here fails the mechanism contract
test (tests/test_mechanism_contract.py).

Coverage kinds:

* `COVERED`: post-processing of the noised aggregate (the model, its test
  metrics, the adaptive clip), or figures of the accounting and the
  configuration that depend on no client's data.
* `CLIENT_STATISTICS`: the clients' own training metrics, summed without noise
  (never released under local DP).
* `COHORT_SIZE`: the realised cohort size, covered unless a random cohort size
  meets add-or-remove-one (`privacy.coverage.cohort_size_covered`).
* `TIMING`: wall-clock times, which depend on the cohort's data sizes.
"""

from __future__ import annotations

import dataclasses

COVERED, CLIENT_STATISTICS, COHORT_SIZE, TIMING = "covered", "client_statistics", "cohort_size", "timing"


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    coverage: str  # one of the kinds above
    doc: str
    tensorboard: bool = False  # a scalar TensorBoard plots per round
    summary: bool = False  # summary.json copies the last round's value when the record has it
    summary_only: bool = False  # a summary.json field, never in a metrics line


FIELDS: tuple[Field, ...] = (
    Field("round", COVERED, "round number, 1-based"),
    Field("clients_this_round", COHORT_SIZE, "the cohort's size", tensorboard=True),
    Field("clip_norm", COVERED, "the clip of this round (adaptive: post-processing of noised counts)", tensorboard=True),
    Field("next_clip_norm", COVERED, "the clip of the next round"),
    Field("train_loss", CLIENT_STATISTICS, "mean client training loss, unnoised", tensorboard=True),
    Field("train_accuracy", CLIENT_STATISTICS, "mean client training accuracy, unnoised", tensorboard=True),
    Field("nonfinite_clients", CLIENT_STATISTICS, "clients whose update was non-finite (zeroed)", tensorboard=True),
    Field("noise_std", COVERED, "local Gaussian noise std per coordinate (z C)"),
    Field("laplace_scale", COVERED, "local Laplace scale per coordinate (z C)"),
    Field("epoch", COVERED, "DP-FTRL: the epoch of the round, 1-based"),
    Field("tree", COVERED, "DP-FTRL: the noise tree of the round, 1-based"),
    Field("tree_round", COVERED, "DP-FTRL: the round's step in its tree, 1-based"),
    Field("stream", COVERED, "banded MF: the noise stream of the round, 1-based (a resume opens a new one)"),
    Field("stream_round", COVERED, "banded MF: the round's step in its noise stream, 1-based"),
    Field("blt_stream", COVERED, "BLT: the noise stream of the round, 1-based (a resume that re-runs rounds starts one)"),
    Field("blt_stream_round", COVERED, "BLT: the round's step in its stream, 1-based"),
    Field("blt_strategy_rounds", COVERED, "BLT: the rounds T the strategy was optimized for"),
    Field("round_seconds", TIMING, "wall seconds of the round", tensorboard=True),
    Field("accounting_seconds", TIMING, "wall seconds of the round's accounting"),
    Field("wall_seconds", TIMING, "wall seconds of the whole run", summary_only=True),
    Field("epsilon", COVERED, "epsilon spent so far at --target_delta", tensorboard=True),
    Field("rounds_accounted", COVERED, "releases composed so far (re-run rounds count again)"),
    Field("local_epsilon", COVERED, "local DP: the worst client's local epsilon", tensorboard=True, summary=True),
    Field("local_epsilon_per_release", COVERED, "local Laplace: pure epsilon of one release"),
    Field("local_epsilon_pure", COVERED, "local Laplace: the worst client's pure epsilon", summary=True),
    Field("max_participations", COVERED, "local DP: the most rounds any client took part in", summary=True),
    Field("epsilon_analysis", COVERED, "how `epsilon` was composed", summary=True),
    Field("epsilon_if_cohorts_secret", COVERED, "the amplified epsilon, for a reader who sees only the model",
          summary=True),
    Field("trees", COVERED, "DP-FTRL: noise trees composed so far", summary=True),
    Field("noise_streams", COVERED, "banded MF: noise streams composed so far", summary=True),
    Field("participations_accounted", COVERED, "banded MF: participations composed, sum of ceil(rounds / B) "
          "over the noise streams", summary=True),
    Field("blt_streams", COVERED, "BLT: noise streams composed so far", summary=True),
    Field("blt_sensitivity", COVERED, "BLT: sqrt(sum over streams of their min-sep sensitivity^2), clip units",
          summary=True),
    Field("record_epsilon", COVERED, "--dp_level=example: record-level epsilon at --target_delta, the maximum "
          "over clients (add-or-remove-one record)", tensorboard=True, summary=True),
    Field("record_epsilon_client", COVERED, "--dp_level=example: the client whose record epsilon is the largest",
          summary=True),
    Field("record_steps_max", COVERED, "--dp_level=example: the most DP-SGD steps one client's record epsilon "
          "composes", summary=True),
    Field("record_epsilon_per_client", COVERED, "--dp_level=example: every client's record epsilon (up to 100 "
          "clients)", summary_only=True),
    Field("record_epsilon_quantiles", COVERED, "--dp_level=example: quantiles of the clients' record epsilons "
          "(more than 100 clients)", summary_only=True),
    Field("record_participations_max", COVERED, "--dp_level=example: the most rounds one client took part in",
          summary_only=True),
    Field("delta", COVERED, "the stated delta: --target_delta + delta_sampler"),
    Field("delta_sampler", COVERED, "the noise samplers' truncation term (privacy.truncation)"),
    Field("accountant", COVERED, "rdp or pld"),
    Field("neighboring_relation", COVERED, "what one round's epsilon holds under"),
    Field("client_sampling", COVERED, "the sampling scheme"),
    Field("test_loss", COVERED, "central test loss (held-out data)", tensorboard=True),
    Field("test_accuracy", COVERED, "central test accuracy (held-out data; text tasks: pad, oov and eos excluded "
          "as the papers report it)", tensorboard=True),
    Field("test_accuracy_with_oov_eos", COVERED, "text tasks: test accuracy with only pad excluded"),
)
BY_NAME = {f.name: f for f in FIELDS}
assert len(BY_NAME) == len(FIELDS), "a field is declared twice"


def names(coverage: str | None = None, *, metrics: bool = True) -> tuple[str, ...]:
    """Declared field names (of one coverage kind if given; `metrics`: only those a metrics line may hold)."""
    return tuple(f.name for f in FIELDS
                 if (coverage is None or f.coverage == coverage) and (not metrics or not f.summary_only))


def timing_fields() -> tuple[str, ...]:
    """Every timing field, the summary's wall time included."""
    return names(TIMING, metrics=False)


TENSORBOARD = tuple(f.name for f in FIELDS if f.tensorboard)
SUMMARY_COPIES = tuple(f.name for f in FIELDS if f.summary)
