"""One object per privacy mode: an aggregation part, an accounting part, its checks and its reports.

Like tensorflow-privacy's `DPQuery` (and pfl-research's central/local
mechanisms), a mechanism is the one place that knows what its mode does, in
two parts with one protocol each:

* `AggregationPart` (TensorFlow, imported only when a process is built):
  `query()`, the tensorflow-privacy query the process runs (clients call
  `preprocess_record`, the server `get_noised_result`); `prepare_state()`,
  what the mode does to the aggregator state before a round (DP-FTRL: a new
  noise tree); `clip_in()`, `record_fields()`, what the run reads back from
  the query's state and metrics (round state such as an adaptive clip lives
  in the state; the loop carries none); `releases_client_statistics`.
* `AccountingPart` (pure Python and dp-accounting; `compute_epsilon` needs no
  TF): `round_privacy()` / `ledger()` / `planned_event()` /
  `planned_out_of_reach()` / `projected()`, the DP event of one round, the
  ledger that composes the released rounds, the event of a planned run
  (calibration), the samplers' bound and the prediction from a folder's
  history; `records_cohorts`, `cohort_size_covered()`, what the epsilon
  covers of the cohorts (`privacy.coverage`).
* `PrivacyMechanism`, both parts: `check(cfg)` / `resolved(cfg)`, the
  settings the mode refuses or chooses (pure; `plan.check` calls them), and
  `privacy_line()`, `summary_fields()`, `run_files()`, what the run writes
  about it.

The round loop, the process and the outputs ask the mechanism's part and never
switch on the mode's name; a new mechanism is a new subclass registered in
`privacy.registry`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy import events
from dpfl_tff.privacy.events import REPLACE_ONE, RoundPrivacy
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.sampling import scheme_of


def refuse(refusals: list[tuple[bool, str]]) -> None:
    """Raises ConfigError with the message of the first (refused, message) pair that is refused (`check`)."""
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


class AggregationPart(abc.ABC):
    """What a mechanism runs: TensorFlow, imported only when a process is built.

    Its tensorflow-privacy query (clients call `preprocess_record`, the server
    `get_noised_result`), what it does to the aggregator state before a round,
    and what the run reads back from that state and from the query's metrics.
    Round state (an adaptive clip, the tree's position, correlated-noise
    buffers) lives in the aggregator state only; which metrics fields epsilon
    covers is declared in `round_record`.
    """

    # Whether the clients' unnoised training statistics (loss, accuracy, example and non-finite counts)
    # leave the clients at all.
    releases_client_statistics: ClassVar[bool] = True

    @abc.abstractmethod
    def query(self, record_specs: Any = None) -> Any:
        """The tensorflow-privacy `DPQuery` the run's process runs (imports TensorFlow).

        `record_specs`: the model update's TensorSpecs (a query whose state is model-sized, as DP-FTRL's
        tree, needs them). The expected cohort m is --clients_per_round.
        """

    def prepare_state(self, state: Any, round_fields: dict[str, Any]) -> Any:
        """The process state to run the next round from (`round_fields`: the ledger's `begin_round`)."""
        del round_fields
        return state

    def clip_in(self, query_state: Any) -> float | None:
        """The clip a round run from `query_state` (the DP query's state, `process.query_state`) uses.

        None: nothing is clipped. A fixed clip is --clip_norm; a mechanism whose
        clip moves (adaptive clipping) reads it from the state, where it lives.
        """
        del query_state
        return self.cfg.dp.clip_norm

    def record_fields(self, query_metrics: dict[str, Any], query_state: Any) -> dict[str, Any]:
        """Fields of a round's metrics line from its DP query's metrics and the query state after it.

        `query_metrics`, `query_state`: `process.query_metrics` and `process.query_state` of the round's
        result (TFF's nesting already taken off). The base: the clip of the next round.
        """
        del query_metrics
        return {"next_clip_norm": self.clip_in(query_state)}


class AccountingPart(abc.ABC):
    """What a mechanism spends: pure Python and dp-accounting, no TensorFlow (`compute_epsilon`, the plan).

    The DP event of a round, the ledger that composes the released rounds (and
    replays a folder's ledger.jsonl), the event of a planned run (calibration),
    the samplers' out-of-reach bound, and what the epsilon covers of the
    cohorts. `privacy.events` builds every DpEvent; the sampling scheme
    (`self.scheme`) turns a round's mechanism into its amplified event.
    """

    # What one round's epsilon holds under: "add_or_remove_one", "replace_one", or None (no DP).
    neighboring_relation: ClassVar[str | None] = None
    # Whether the privacy ledger needs every cohort (participation counts), so records them.
    ledger_needs_cohorts: ClassVar[bool] = False

    def round_privacy(self) -> RoundPrivacy | None:
        """The DP event of one round, if this mode's epsilon depends only on the number of rounds."""
        return None

    def ledger(self) -> Ledger:
        """An empty ledger for this run (no DP: epsilon is infinite)."""
        return Ledger()

    def planned_event(self, rounds: int) -> tuple[Any, str] | None:
        """(DpEvent of `rounds` rounds run without a resume, its neighbouring relation), None if not one event."""
        rp = self.round_privacy()
        if rp is None:
            return None
        return events.self_composed(rp, rounds)

    def planned_out_of_reach(self, rounds: int) -> float:
        """The samplers' out-of-reach bound over the worst client's releases in `rounds` rounds (`privacy.truncation`).

        Pure arithmetic (no accountant); the ledger's `delta_sampler` of the same rounds adds only the
        normaliser's term. The base mechanism draws no noise.
        """
        del rounds
        return 0.0

    def projected(self, history: list[dict[str, Any]], resume_round: int, rounds: int) -> dict[str, Any]:
        """The ledger's figures at the end of the run: `history` first, then rounds resume_round+1..rounds.

        `history`: the run folder's verified ledger.jsonl entries (empty for a new run), replayed into a
        fresh ledger; every predicted epsilon (start-up line, dry run, calibration note, sweep) comes from here.
        """
        ledger = self.ledger()
        try:
            for entry in history:
                ledger.replay_entry(entry)
            return ledger.projected(resume_round, rounds)
        finally:
            ledger.close()

    def check_accountable(self) -> None:
        """Raises ConfigError unless the accountant can take this mode's events (builds the ledger once)."""
        self.ledger().close()

    @property
    def records_cohorts(self) -> bool:
        """Whether ledger.jsonl lists each round's cohort.

        With --log_cohorts; when this mode's ledger needs them; and with --client_sampling=shuffle, whose
        epochs a resumed run rebuilds from them (`sampling.EpochShuffler.restore`).
        """
        return self.cfg.log_cohorts or self.ledger_needs_cohorts or self.scheme.resume_needs_cohorts

    def cohort_size_covered(self) -> bool:
        """The realised cohort size reveals nothing under replace-one or a fixed cohort size."""
        return self.neighboring_relation == REPLACE_ONE or self.scheme.fixed_size


class PrivacyMechanism(AggregationPart, AccountingPart):
    """The privacy mode of a run: its aggregation part and its accounting part, its checks and its reports.

    `cfg` is the run's resolved configuration. The process takes the
    aggregation part (`aggregation`), the ledger and the plan the accounting
    part (`accounting`); both are this object, seen through the protocol of
    its part (tests/test_mechanism_contract.py checks that the accounting part
    of every registered mechanism runs with TensorFlow unimportable).
    """

    name: ClassVar[str]
    # --client_sampling when the flag is not given (None: the field's default, poisson).
    default_client_sampling: ClassVar[str | None] = None
    # Whether this mode gives a DP guarantee at all (False: plain FedAvg, epsilon is infinite).
    provides_dp: ClassVar[bool] = True
    # Whether --target_epsilon can calibrate this mode's noise multiplier (`accounting.with_calibrated_noise`).
    calibrates: ClassVar[bool] = True

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.scheme = scheme_of(cfg)  # how the cohorts are drawn, and what that does to a round's event

    @property
    def aggregation(self) -> AggregationPart:
        """The part the learning process runs (`process.build_learning_process`, the round loop's state)."""
        return self

    @property
    def accounting(self) -> AccountingPart:
        """The part the ledger, the plan, `compute_epsilon` and the budget guard read."""
        return self

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Raises ConfigError (one line naming the flag) for settings this mode refuses."""

    @classmethod
    def resolved(cls, cfg: ExperimentConfig, model_parameters: int | None = None) -> ExperimentConfig:
        """`cfg` with the settings this mode chooses itself resolved (banded MF's --bands=auto).

        Called by the plan once N is known (`plan.check`), and again with the model's size (`plan.prepare`),
        before the mechanism is built; the base returns `cfg`. Pure (no TensorFlow).

        Raises:
          ConfigError: nothing can be chosen (one line naming the flag).
        """
        del model_parameters
        return cfg

    @property
    def noise_seeded(self) -> bool:
        """Whether the noise follows `--noise_seed` (tests only: then there is no privacy)."""
        return self.cfg.dp.noise_seed is not None

    def summary_fields(self) -> dict[str, Any]:
        """Fields this mode adds to summary.json (beyond the epsilon fields the ledger gives)."""
        return {}

    def run_files(self) -> dict[str, dict[str, Any]]:
        """JSON files (name -> content) this mode writes into the run folder when the run starts (strategy.json)."""
        return {}

    @abc.abstractmethod
    def privacy_line(self, planned: dict[str, Any]) -> str:
        """The run's one line about its privacy, from the ledger's `planned` figures."""

    def delta_text(self, planned: dict[str, Any] | None = None) -> str:
        """`delta=...` as a privacy line states it: --target_delta and, from `planned`, the sampler's term."""
        cfg = self.cfg
        default = " (default 1/(num_clients+canary_clients)^1.1)" if cfg.canary_clients else " (default 1/num_clients^1.1)"
        text = f"delta={cfg.target_delta:.3g}{'' if cfg.dp.target_delta else default}"
        if planned is not None and "delta_sampler" in planned:
            text += f" + {planned['delta_sampler']:.2g} (noise sampler's bound)"
        return text
