"""Ledgers: the epsilon bookkeeping of one run, fed one released round at a time.

A mechanism builds its ledger (`PrivacyMechanism.ledger`); the round loop
asks it for the epsilon before a round (`preview`, the budget guard), records
each released round (`commit`) and replays the privacy ledger's file on a
resume (`replay`). Pure Python and dp-accounting.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import dp_accounting

from dpfl_tff.config import ExperimentConfig
from dpfl_tff.errors import ConfigError
from dpfl_tff.privacy.events import REPLACE_ONE, EpsilonTracker, RoundPrivacy, make_accountant


class Ledger:
    """Epsilon bookkeeping of one run (the base class is the no-DP ledger).

    It counts *releases*: every round whose outputs were written. A round
    re-run after a resume is a new release and is counted again.
    """

    neighboring_relation: str | None = None

    def __init__(self):
        self.released = 0

    def begin_round(self, round_num: int) -> dict[str, Any]:
        """Called once before round `round_num` runs (before `preview`); returns fields for its ledger line.

        The fields also go into the round's metrics; the base ledger has none.
        """
        del round_num
        return {}

    def preview(self, cohort) -> float:
        """Epsilon (central view) if one more round runs with `cohort`."""
        del cohort
        return math.inf

    def preview_of(self, cohort, view: str) -> tuple[float, str]:
        """(epsilon, its field name) that `--max_epsilon` caps if one more round runs with `cohort`.

        `view` (`--max_epsilon_view`): "guarantee", the epsilon the mode promises, or "central", the
        central view (`epsilon`). They are the same but under local DP (`LocalLedger`).
        """
        del view
        return self.preview(cohort), "epsilon"

    def guarded_field(self, view: str) -> str:
        """The metrics field `preview_of(cohort, view)` previews."""
        del view
        return "epsilon"

    def commit(self, cohort) -> dict[str, Any]:
        """Records one more released round with `cohort`; returns its metrics fields."""
        del cohort
        self.released += 1
        return {"epsilon": math.inf, "rounds_accounted": self.released}

    def replay(self, cohort) -> None:
        """Re-records a release from the ledger log (resume); computes no epsilon."""
        del cohort
        self.released += 1

    def replay_entry(self, entry: dict[str, Any]) -> None:
        """Re-records the release of one ledger.jsonl line (`checkpoints.LedgerLog` entry)."""
        self.replay(entry.get("cohort"))

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        """Figures of a planned run of `rounds` rounds (no training)."""
        del rounds, participations
        return {"epsilon": math.inf}

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        """Figures at the end of a run that composes what this ledger holds, then runs rounds resume_round+1..rounds.

        The ledger holds the run's history (its verified ledger.jsonl, replayed; empty for a new run); the
        rounds left are run from the checkpoint of `resume_round` without a further resume, each counted
        as a new release (`planned` is the case of an empty history and `resume_round` 0). The ledger
        itself is not changed.
        """
        del resume_round, rounds
        return {"epsilon": math.inf}

    def prefetch(self) -> None:
        """Starts computing the epsilon of the next release (PLD: in the background)."""

    def close(self) -> None:
        pass


class CentralLedger(Ledger):
    """Central DP: epsilon depends only on the number of released rounds, each `round_privacy`."""

    def __init__(self, round_privacy: RoundPrivacy, delta: float, accountant: str):
        super().__init__()
        self.round_privacy = round_privacy
        self.neighboring_relation = round_privacy.neighboring_relation
        self.tracker = EpsilonTracker(round_privacy, delta, accountant)

    def preview(self, cohort) -> float:
        return self.tracker.epsilon(self.released + 1)

    def commit(self, cohort) -> dict[str, Any]:
        self.released += 1
        return {"epsilon": self.tracker.epsilon(self.released), "rounds_accounted": self.released}

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        return {
            "epsilon": self.tracker.epsilon(rounds),
            "effective_noise_multiplier": self.round_privacy.noise_multiplier,
            "analysis": self.round_privacy.description,
        }

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        total = self.released + max(rounds - resume_round, 0)
        return {**self.planned(total), "rounds_accounted": total}

    def prefetch(self) -> None:
        self.tracker.prefetch(self.released + 1)

    def close(self) -> None:
        self.tracker.close()


class LocalLedger(Ledger):
    """Client-level (local) DP: two numbers, both under replace-one.

    * `local_epsilon`: what protects a client against the server, who sees
      each local release and who took part (no amplification by sampling).
      One release: Gaussian with noise multiplier z/2 (L2 sensitivity 2C), or
      Laplace with scale z C on L1 sensitivity 2C, pure epsilon 2/z. Composed
      over the worst client's participations so far, at the run's delta; for
      Laplace the smaller of pure composition (delta 0) and the accountant's.
    * `epsilon` (central view, what the model reveals about one client): the
      model is post-processing of all local releases, so `local_epsilon`
      bounds it (analysis `post_processing`). For Gaussian noise with a fixed
      cohort of m (uniform sampling), the m local noises add up to Gaussian
      noise of std sqrt(m) z C on a sum of replace-one sensitivity 2C:
      `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(sqrt(m) z / 2))`
      per round; the smaller of the two is reported (analysis
      `sampled_sum_gaussian`). Under Poisson sampling the cohort size, and with
      it the total noise, depends on the neighbour, so only the
      post-processing bound is reported.
    """

    neighboring_relation = REPLACE_ONE

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.delta = cfg.target_delta
        dp = cfg.dp
        z = dp.noise_multiplier
        self.mechanism = dp.local_mechanism
        if self.mechanism == "gaussian":
            release = dp_accounting.GaussianDpEvent(z / 2)
        else:
            release = dp_accounting.LaplaceDpEvent(z / 2)
            self.pure_epsilon_per_release = 2.0 / z
        self._release = RoundPrivacy(release, REPLACE_ONE, z, f"local {self.mechanism} release, replace-one")
        acc = make_accountant(dp.accountant, REPLACE_ONE)
        if not acc.supports(release):
            raise ConfigError(
                f"--accountant={dp.accountant}: dp-accounting cannot account a local {self.mechanism} release; "
                "use --accountant=rdp"
            )
        self._local = EpsilonTracker(self._release, self.delta, dp.accountant)
        self._sum: EpsilonTracker | None = None
        if self.mechanism == "gaussian" and cfg.train.client_sampling == "uniform":
            n, m = cfg.population, cfg.train.clients_per_round
            summed = RoundPrivacy(
                dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(math.sqrt(m) * z / 2)),
                REPLACE_ONE, math.sqrt(m) * z, "sum of m local Gaussian noises, fixed cohort, replace-one",
            )
            kind = dp.accountant if make_accountant(dp.accountant, REPLACE_ONE).supports(summed.event) else "rdp"
            self._sum = EpsilonTracker(summed, self.delta, kind)
        self._participations: collections.Counter = collections.Counter()
        self.max_participations = 0

    def local_epsilon(self, participations: int) -> float:
        eps = self._local.epsilon(participations)
        if self.mechanism == "laplace":
            eps = min(eps, participations * self.pure_epsilon_per_release)
        return eps

    def _central(self, rounds: int, participations: int) -> tuple[float, str]:
        post = self.local_epsilon(participations)
        if self._sum is not None:
            summed = self._sum.epsilon(rounds)
            if summed < post:
                return summed, "sampled_sum_gaussian"
        return post, "post_processing"

    def _max_after(self, cohort) -> int:
        return max([self.max_participations, *(self._participations[int(c)] + 1 for c in cohort)])

    def preview(self, cohort) -> float:
        return self._central(self.released + 1, self._max_after(cohort))[0]

    def preview_of(self, cohort, view: str) -> tuple[float, str]:
        """Local DP promises `local_epsilon` (against the server); "central" guards the central view instead."""
        if view == "central":
            return self.preview(cohort), "epsilon"
        return self.local_epsilon(self._max_after(cohort)), "local_epsilon"

    def guarded_field(self, view: str) -> str:
        return "epsilon" if view == "central" else "local_epsilon"

    def replay(self, cohort) -> None:
        self.max_participations = self._max_after(cohort)
        self._participations.update(int(c) for c in cohort)
        self.released += 1

    def commit(self, cohort) -> dict[str, Any]:
        self.max_participations = self._max_after(cohort)
        self._participations.update(int(c) for c in cohort)
        self.released += 1
        return {**self._fields(self.released, self.max_participations), "rounds_accounted": self.released}

    def _fields(self, rounds: int, participations: int) -> dict[str, Any]:
        eps, analysis = self._central(rounds, participations)
        fields = {
            "epsilon": eps,
            "epsilon_analysis": analysis,
            "local_epsilon": self.local_epsilon(participations),
            "max_participations": participations,
        }
        if self.mechanism == "laplace":
            fields["local_epsilon_per_release"] = self.pure_epsilon_per_release  # pure, delta 0
            fields["local_epsilon_pure"] = participations * self.pure_epsilon_per_release
        return fields

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        p = rounds if participations is None else participations
        fields = self._fields(rounds, p)
        fields["analysis"] = (
            f"local {self.mechanism}, z={self.cfg.dp.noise_multiplier:g}, replace-one, "
            f"{p} participations of the worst client; central view: {fields['epsilon_analysis']}"
        )
        return fields

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        left = max(rounds - resume_round, 0)  # the worst client may take part in every round left
        fields = self.planned(self.released + left, self.max_participations + left)
        fields["rounds_accounted"] = self.released + left
        return fields

    def close(self) -> None:
        self._local.close()
        if self._sum is not None:
            self._sum.close()
