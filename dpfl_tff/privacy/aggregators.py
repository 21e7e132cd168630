"""A privacy mode as a TFF aggregation factory (for TFF's own FedAvg and for tests).

`build_aggregator(dp, m)` is `tff.aggregators.DifferentiallyPrivateFactory`
around the mode's query (`privacy.queries`): TFF runs the query's
`preprocess_record` at CLIENTS (for local DP: clipping and noise happen
there), sums the records and calls `get_noised_result` at the server. Its
measurements are `dp_query_metrics` (the query's) and `dp`.
"""

from __future__ import annotations

import tensorflow_federated as tff

from dpfl_tff.config import DPConfig
from dpfl_tff.privacy.registry import MECHANISMS


def build_aggregator(dp: DPConfig, expected_cohort: float) -> tff.aggregators.UnweightedAggregationFactory:
    """The aggregation of `dp.mode` with expected cohort `expected_cohort` (central DP divides by it)."""
    return tff.aggregators.DifferentiallyPrivateFactory(MECHANISMS[dp.mode].query_of(dp, expected_cohort))
