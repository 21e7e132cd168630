"""`--dp_mode=ftrl`: DP-FTRL, tree-aggregation noise without sampling (Kairouz et al. 2021, arXiv:2103.00039).

What it assumes, instead of DP-FedAvg's secret random sampling: every client
takes part at most once per epoch (`--client_sampling=shuffle`,
`sampling.EpochShuffler`: a permutation of the clients cut into rounds of m,
the N mod m left over sitting the epoch out). The order may be public.

The server clips every update to L2 norm C, sums, and releases the round's
residual of a tree-aggregated prefix sum (`privacy.tree_query`): every tree
node gets fresh Gaussian noise of std z C, one tree per epoch (restarted at
every epoch's first round with a fresh seed), divided by m. The server
optimizer applies that noised residual mean: with `sgd` the model is the
FTRL iterate of the paper, with `sgdm` its momentum variant (the paper's
DP-FTRLM); both are post-processing of the noised prefix sums. `adam` is
refused (not in the paper; also post-processing, but untested here).

Privacy (client level, REPLACE_SPECIAL: a neighbour replaces one client's data
by a zero update, who takes part when staying the same; the cohorts are not
protected and ledger.jsonl records them): `privacy.tree_ledger` composes one
`SingleEpochTreeAggregationDpEvent(z, steps)` per tree (RDP only).

Noise seeds: every tree's seed comes from OS entropy (or, tests only, from
--noise_seed and the tree's number); a resume that re-runs released rounds
starts a fresh tree for them (`TreeLedger.begin_round`), so no tree noise is
ever used on two different sets of updates. The checkpoints hold the current
tree's seed and noise: keep checkpoints/ as private as the server.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy.events import REPLACE_SPECIAL
from dpfl_tff.privacy.mechanism import PrivacyMechanism, refuse
from dpfl_tff.privacy.events import tree_event
from dpfl_tff.privacy.tree_ledger import TreeLedger, planned_trees
from dpfl_tff.sampling import EpochShuffle, scheme_of

SERVER_OPTIMIZERS = ("sgd", "sgdm")


class TreeAggregationFTRL(PrivacyMechanism):
    """Residual tree-aggregation noise, one tree per epoch (see the module docstring)."""

    name = "ftrl"
    neighboring_relation = REPLACE_SPECIAL
    ledger_needs_cohorts = True  # the shuffle's epochs are rebuilt from them on a resume; each tree is checked
    default_client_sampling = EpochShuffle.name

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        t, dp = cfg.train, cfg.dp
        refusals = [
            (not scheme_of(cfg).once_per_epoch,
             f"--client_sampling={t.client_sampling} with --dp_mode=ftrl: DP-FTRL needs each client at most once "
             "per epoch; use --client_sampling=shuffle (the default with ftrl, but a flagfile that sets "
             "--client_sampling, such as configs/quickstart.cfg, needs it given too)"),
            (dp.accountant != "rdp",
             f"--accountant={dp.accountant} with --dp_mode=ftrl: dp-accounting accounts tree aggregation with RDP "
             "only; use --accountant=rdp"),
            (t.server_optimizer not in SERVER_OPTIMIZERS,
             f"--server_optimizer={t.server_optimizer} with --dp_mode=ftrl: must be one of "
             f"{', '.join(SERVER_OPTIMIZERS)} (DP-FTRL, with or without momentum)"),
            (dp.adaptive_clipping,
             "--adaptive_clipping with --dp_mode=ftrl: not supported; use a fixed --clip_norm"),
            (t.fedavg_impl != "grouped",
             f"--fedavg_impl={t.fedavg_impl} with --dp_mode=ftrl: not supported (the tree is restarted through the "
             "grouped process' state); use --fedavg_impl=grouped"),
            (dp.noise_multiplier == 0 and dp.target_epsilon is None and not cfg.canary_clients,
             "--noise_multiplier=0 with --dp_mode=ftrl: zero noise gives no privacy; use --dp_mode=none, "
             "or set --noise_multiplier > 0"),
        ]
        refuse(refusals)

    @property
    def rounds_per_epoch(self) -> int:
        """floor(N / m): the rounds of one epoch, and the most steps of one tree."""
        return self.cfg.population // self.cfg.train.clients_per_round

    def query(self, record_specs: Any = None):
        from dpfl_tff.privacy import tree_query

        if record_specs is None:
            raise ValueError("the DP-FTRL query needs the model update's TensorSpecs")
        dp = self.cfg.dp
        return tree_query.ftrl_query(dp.clip_norm, dp.noise_multiplier, self.cfg.train.clients_per_round,
                                     record_specs, self.rounds_per_epoch, self.tree_seeds(0))

    def tree_seeds(self, tree: int) -> np.ndarray:
        """The noise seed (two int64) of tree `tree`: OS entropy, or (tests only) from --noise_seed and `tree`."""
        if self.cfg.dp.noise_seed is None:
            return np.array([secrets.randbits(63), secrets.randbits(63)], np.int64)
        return np.random.default_rng([self.cfg.dp.noise_seed, 23, tree]).integers(0, 2**63 - 1, 2, dtype=np.int64)

    def prepare_state(self, state: Any, round_fields: dict[str, Any]) -> Any:
        """At a tree's first round: the state with a new tree, freshly seeded (`tree_query.with_new_tree`)."""
        if round_fields.get("tree_round") != 1:
            return state
        from dpfl_tff.privacy import tree_query

        return state._replace(aggregator=tree_query.with_new_tree(state.aggregator,
                                                                  self.tree_seeds(round_fields["tree"])))

    def ledger(self) -> TreeLedger:
        return TreeLedger(self.cfg.dp.noise_multiplier, self.cfg.target_delta, self.rounds_per_epoch)

    def planned_out_of_reach(self, rounds: int) -> float:
        return self.ledger().out_of_reach(rounds)

    def planned_event(self, rounds: int) -> tuple[Any, str]:
        return tree_event(self.cfg.dp.noise_multiplier, planned_trees(rounds, self.rounds_per_epoch)), REPLACE_SPECIAL

    def summary_fields(self) -> dict[str, Any]:
        return {"rounds_per_epoch": self.rounds_per_epoch,
                "clients_left_out_per_epoch": self.cfg.population % self.cfg.train.clients_per_round}

    def privacy_line(self, planned: dict[str, Any]) -> str:
        cfg = self.cfg
        return (
            f"privacy: {planned['analysis']}; accountant RDP, {self.delta_text(planned)}; epsilon after "
            f"{cfg.train.rounds} rounds: {planned['epsilon']:.4g} (no amplification by sampling: each client at "
            "most once per epoch, cohorts not protected)"
        )
