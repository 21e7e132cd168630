"""A privacy mode's DP query as a TFF aggregation factory, for the tests that run a query alone.

TFF's own FedAvg path builds the same `tff.aggregators.DifferentiallyPrivateFactory` around
`mechanism.query()` (`process.build_learning_process`): TFF runs the query's `preprocess_record` at
CLIENTS (local DP clips and noises there), sums the records and calls `get_noised_result` at the server.
"""

from __future__ import annotations

import tensorflow_federated as tff

from dpfl_tff.config import DPConfig, ExperimentConfig, TrainConfig
from dpfl_tff.privacy.registry import mechanism_for


def build_aggregator(dp: DPConfig, expected_cohort: int) -> tff.aggregators.UnweightedAggregationFactory:
    """The aggregation of `dp.mode` with expected cohort m = `expected_cohort` (central DP divides by it)."""
    cfg = ExperimentConfig(dp=dp, train=TrainConfig(clients_per_round=int(expected_cohort))).validate()
    return tff.aggregators.DifferentiallyPrivateFactory(mechanism_for(cfg).query())
