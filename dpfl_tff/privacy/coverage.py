"""Which released numbers the reported epsilon covers.

The epsilon bounds what the *noised* aggregate reveals about one client, and
everything computed from it: the model, its test-set evaluation, the adaptive
clip (its count is noised too). A run also releases numbers computed from the
clients' data without noise; those are outside the guarantee and are listed in
`summary.json` as `outputs_not_covered_by_epsilon`:

* `train_loss`, `train_accuracy`: the clients' own training metrics, summed
  without noise (central DP and no DP; under local DP they never leave the
  clients and are not released at all).
* `nonfinite_clients`: how many clients' updates were non-finite (likewise).
* `clients_this_round` under Poisson sampling with add-or-remove-one: the
  realised cohort size depends on whether a client is in the data. Under
  uniform sampling it is always m, and under local DP (replace-one) it does
  not depend on any client's data.
* `round_seconds`, `accounting_seconds`, `wall_seconds`: timings, which depend
  on the cohort's data sizes.

`--client_metrics=false` leaves all of these out of every file and line, so
that every released number is covered by the epsilon or computed on the
held-out test set; the list is then empty.

Numbers that depend only on the sampling, never on data (local DP's
`max_participations` and the `local_epsilon` computed from it) are not in the
list; the threat model in docs/privacy.md says what they reveal about the cohorts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpfl_tff import round_record
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy.registry import mechanism_for

if TYPE_CHECKING:
    from dpfl_tff.privacy.mechanism import PrivacyMechanism

# Derived from the record's declaration (`round_record`), where each field says what epsilon covers of it.
CLIENT_TRAINING_FIELDS = round_record.names(round_record.CLIENT_STATISTICS)
(COHORT_SIZE_FIELD,) = round_record.names(round_record.COHORT_SIZE)
TIMING_FIELDS = round_record.timing_fields()


def client_statistics_released(cfg: ExperimentConfig, mechanism: PrivacyMechanism | None = None) -> bool:
    """Whether the clients' unnoised training metrics leave the clients and are written.

    Never under local DP: nothing computed from a client's data but its
    noised update leaves the client computation.
    """
    return cfg.client_metrics and (mechanism or mechanism_for(cfg)).aggregation.releases_client_statistics


def cohort_size_covered(cfg: ExperimentConfig, mechanism: PrivacyMechanism | None = None) -> bool:
    """The realised cohort size is covered unless a random cohort size meets add-or-remove-one."""
    return (mechanism or mechanism_for(cfg)).accounting.cohort_size_covered()


def not_covered(cfg: ExperimentConfig, mechanism: PrivacyMechanism | None = None) -> list[str]:
    """Names of the released fields that the epsilon of `cfg` does not cover (see the module docstring).

    `mechanism`: `cfg`'s, if already built (the run plan's).
    """
    if not cfg.client_metrics:
        return []
    mechanism = mechanism or mechanism_for(cfg)
    fields: list[str] = []
    if client_statistics_released(cfg, mechanism):
        fields += CLIENT_TRAINING_FIELDS
    if not cohort_size_covered(cfg, mechanism):
        fields.append(COHORT_SIZE_FIELD)
    fields += TIMING_FIELDS
    return fields


def cohort_size_released(cfg: ExperimentConfig, mechanism: PrivacyMechanism | None = None) -> bool:
    """Whether `clients_this_round` is written."""
    return cfg.client_metrics or cohort_size_covered(cfg, mechanism)
