"""Accounting of DP-FTRL (tree aggregation, Kairouz et al. 2021): trees composed, each a dp-accounting event.

Pure Python and dp-accounting. One tree (`privacy.tree_query`) covers
consecutive rounds in which every client takes part at most once; its rounds
release noised prefix sums whose nodes each get Gaussian noise of std z C on
a sum of L2 sensitivity C. Under REPLACE_SPECIAL (a neighbour replaces one
client's data by a special record whose clipped update is zero, the
participation pattern staying the same; Kairouz et al. 2021, Definition 1.1)
a tree of T steps is `SingleEpochTreeAggregationDpEvent(z, T)`: dp-accounting
gives it RDP alpha ceil(log2(T + 1)) / (2 z^2), one Gaussian per tree level.

A run's trees are composed (`ComposedDpEvent`), each with its own step count:
one tree per epoch, a partial last epoch as a shorter tree, and a tree cut
short by a resume plus the fresh tree that re-runs its rounds as two trees (a
client is at most once in each; composition needs nothing more). dp-accounting
supports these events with RDP only.
"""

from __future__ import annotations

from typing import Any

import dp_accounting

from dpfl_tff.errors import LedgerError
from dpfl_tff.privacy import truncation
from dpfl_tff.privacy.events import REPLACE_SPECIAL, tree_event
from dpfl_tff.privacy.ledgers import Ledger


def trees_epsilon(noise_multiplier: float, tree_steps: list[int], delta: float) -> float:
    """Epsilon at `delta` of the trees `tree_steps` (RDP, REPLACE_SPECIAL)."""
    if not any(tree_steps):
        return 0.0
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(tree_event(noise_multiplier, tree_steps))
    return float(acc.get_epsilon(delta))


def planned_trees(rounds: int, rounds_per_epoch: int) -> list[int]:
    """Steps of the trees of `rounds` rounds without a resume: one per epoch, the last one possibly shorter."""
    full, rest = divmod(int(rounds), int(rounds_per_epoch))
    return [rounds_per_epoch] * full + ([rest] if rest else [])


class TreeLedger(Ledger):
    """DP-FTRL's ledger: which released rounds formed which tree, and their composed epsilon.

    Before a round runs, `begin_round(r)` says whether it starts a new tree:
    at the first round of every epoch, and when the previous release was not
    round r - 1 (a resume from a checkpoint older than the ledger: the rounds
    after the checkpoint are re-run in a fresh tree, never with the noise of
    the tree the checkpoint holds). Its fields (`epoch`, `tree`, `tree_round`)
    go into the round's ledger.jsonl line and metrics; `replay_entry` rebuilds
    the trees from those lines. Every tree's cohorts are checked to hold each
    client at most once.
    """

    neighboring_relation = REPLACE_SPECIAL

    def __init__(self, noise_multiplier: float, delta: float, rounds_per_epoch: int):
        super().__init__()
        self.noise_multiplier, self.delta, self.rounds_per_epoch = noise_multiplier, delta, rounds_per_epoch
        # A node's sum has L2 sensitivity C under replace-special and noise std zC: shift 1/z per node.
        self.out_of_reach_per_node = truncation.gaussian_out_of_reach(1 / noise_multiplier) if noise_multiplier else 0.0
        self.trees: list[int] = []  # steps of every tree so far; the last one is the current tree
        self._clients: set[int] = set()  # clients of the current tree
        self._last_round = 0
        self._pending: dict[str, Any] | None = None
        self._pending_round = 0

    def begin_round(self, round_num: int) -> dict[str, Any]:
        r = int(round_num)
        new = not self.trees or (r - 1) % self.rounds_per_epoch == 0 or self._last_round != r - 1
        self._pending = {
            "epoch": (r - 1) // self.rounds_per_epoch + 1,
            "tree": len(self.trees) + (1 if new else 0),
            "tree_round": 1 if new else self.trees[-1] + 1,
        }
        self._pending_round = r
        return dict(self._pending)

    def _trees_after(self, fields: dict[str, Any]) -> list[int]:
        if fields["tree_round"] == 1:
            return [*self.trees, 1]
        return [*self.trees[:-1], self.trees[-1] + 1]

    def tree_out_of_reach(self, tree_steps: list[int]) -> float:
        """The worst client is in one leaf per tree, which enters `truncation.tree_levels(steps)` noised nodes."""
        return sum(truncation.tree_levels(t) for t in tree_steps) * self.out_of_reach_per_node

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        del participations
        trees = self.trees if released is None else planned_trees(released, self.rounds_per_epoch)
        return self.tree_out_of_reach(trees)

    def epsilon(self, tree_steps: list[int] | None = None) -> float:
        return trees_epsilon(self.noise_multiplier, self.trees if tree_steps is None else tree_steps, self.delta)

    def preview(self, cohort) -> float:
        if self._pending is None:
            raise RuntimeError("TreeLedger.preview before begin_round")
        return self.epsilon(self._trees_after(self._pending))

    def _add(self, round_num: int, fields: dict[str, Any], cohort, error: type[Exception]) -> None:
        if fields["tree"] not in (len(self.trees), len(self.trees) + 1) or (
                fields["tree_round"] != (1 if fields["tree"] > len(self.trees) else self.trees[-1] + 1)):
            raise error(f"round {round_num}: tree {fields['tree']} step {fields['tree_round']} does not follow "
                        f"the {len(self.trees)} tree(s) before it")
        if fields["tree_round"] == 1:
            self._clients = set()
        clients = [int(c) for c in cohort] if cohort is not None else []
        if len(set(clients)) != len(clients) or self._clients.intersection(clients):
            raise error(f"round {round_num}: a client takes part twice in tree {fields['tree']}")
        self._clients.update(clients)
        self.trees = self._trees_after(fields)
        self._last_round = round_num
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        if self._pending is None:
            raise RuntimeError("TreeLedger.commit before begin_round")
        fields, self._pending = self._pending, None
        self._add(self._pending_round, fields, cohort, RuntimeError)
        return {"epsilon": self.epsilon(), "rounds_accounted": self.released, "trees": len(self.trees),
                **self.sampler_fields()}

    def replay(self, cohort) -> None:
        raise LedgerError("a DP-FTRL ledger line must be replayed with its tree (replay_entry)")

    def replay_entry(self, entry: dict[str, Any]) -> None:
        try:
            fields = {k: int(entry[k]) for k in ("epoch", "tree", "tree_round")}
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger release {entry.get('release')}: no tree fields, which DP-FTRL needs") from e
        self._add(int(entry["round"]), fields, entry.get("cohort"), LedgerError)

    def projected_trees(self, resume_round: int, rounds: int) -> list[int]:
        """The trees after the ledger's own and rounds resume_round+1..rounds run as `begin_round` would start them."""
        trees, last = list(self.trees), self._last_round
        for r in range(resume_round + 1, rounds + 1):
            if not trees or (r - 1) % self.rounds_per_epoch == 0 or last != r - 1:
                trees.append(1)
            else:
                trees[-1] += 1
            last = r
        return trees

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        trees = self.projected_trees(resume_round, rounds)
        return {**self._planned_fields(trees), "rounds_accounted": self.released + max(rounds - resume_round, 0)}

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        return self._planned_fields(planned_trees(rounds, self.rounds_per_epoch))

    def _planned_fields(self, trees: list[int]) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(trees),
            "delta_sampler": truncation.delta_sampler(self.tree_out_of_reach(trees), self.delta),
            "trees": len(trees),
            "rounds_per_epoch": self.rounds_per_epoch,
            "analysis": (
                f"tree aggregation (DP-FTRL), noise z={self.noise_multiplier:.6g} per tree node, "
                f"{len(trees)} tree(s) of <= {self.rounds_per_epoch} rounds (one per epoch"
                + (f", steps {trees} after the run's ledger" if self.released else "") + "), replace-special"
            ),
        }
