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


from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy import truncation
from dpfl_tff.privacy.events import REPLACE_ONE, EpsilonTracker, RoundPrivacy, local_release, make_accountant
from dpfl_tff.sampling import scheme_of


class Ledger:
    """Epsilon bookkeeping of one run (the base class is the no-DP ledger).

    It counts *releases*: every round whose outputs were written. A round
    re-run after a resume is a new release and is counted again.
    """

    neighboring_relation: str | None = None
    delta: float = 0.0  # the accountant's delta (--target_delta); the stated delta adds `delta_sampler`

    def __init__(self):
        self.released = 0

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        """The samplers' out-of-reach bound summed over the worst client's releases (`privacy.truncation`).

        Args:
          released: rounds released (None: so far); participations: the worst
            client's rounds (None: as the ledger has it, or all of `released`).
        """
        del released, participations
        return 0.0

    def sampler_fields(self, released: int | None = None, participations: int | None = None) -> dict[str, Any]:
        """`delta_sampler`: the samplers' truncation term, which every stated delta adds to --target_delta."""
        return {"delta_sampler": truncation.delta_sampler(self.out_of_reach(released, participations), self.delta)}

    @property
    def amplified_by_sampling(self) -> bool:
        """Whether `epsilon` rests on amplification by secret sampling (the cohorts unknown to its reader)."""
        return False

    @property
    def unamplified_reason(self) -> str | None:
        """Why `epsilon` is not amplified by sampling although the mode could be (None: it is, or cannot be)."""
        return None

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
        return {"epsilon": math.inf, "rounds_accounted": self.released, **self.sampler_fields()}

    def replay(self, cohort) -> None:
        """Re-records a release from the ledger log (resume); computes no epsilon."""
        del cohort
        self.released += 1

    def replay_entry(self, entry: dict[str, Any]) -> None:
        """Re-records the release of one ledger.jsonl line (`release_log.LedgerLog` entry)."""
        self.replay(entry.get("cohort"))

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        """Figures of a planned run of `rounds` rounds (no training)."""
        return {"epsilon": math.inf, **self.sampler_fields(rounds, participations)}

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        """Figures at the end of a run that composes what this ledger holds, then runs rounds resume_round+1..rounds.

        The ledger holds the run's history (its verified ledger.jsonl, replayed; empty for a new run); the
        rounds left are run from the checkpoint of `resume_round` without a further resume, each counted
        as a new release (`planned` is the case of an empty history and `resume_round` 0). The ledger
        itself is not changed.
        """
        return {"epsilon": math.inf, **self.sampler_fields(self.released + max(rounds - resume_round, 0))}

    def summary_fields(self) -> dict[str, Any]:
        """Fields summary.json gets from the ledger when the run ends (beyond the last round's copies)."""
        return {}

    def prefetch(self) -> None:
        """Starts computing the epsilon of the next release (PLD: in the background)."""

    def close(self) -> None:
        pass


COHORTS_LISTED = (
    "ledger.jsonl lists the cohorts, so a reader of the run folder knows who took part and sampling gives no "
    "amplification against them: epsilon composes each round's Gaussian release over the worst client's "
    "participations; epsilon_if_cohorts_secret is the amplified figure, for a reader who sees only the model"
)


class Participations:
    """How often each client took part, from the cohorts a ledger sees.

    A round whose cohort is unknown (None: a ledger line without one) counts
    for every client, so `worst` bounds the participations of the client who
    took part most.
    """

    def __init__(self):
        self._counts: collections.Counter = collections.Counter()
        self._worst_listed = 0
        self._unlisted = 0

    @property
    def worst(self) -> int:
        return self._worst_listed + self._unlisted

    def worst_after(self, cohort) -> int:
        """`worst` after one more round with `cohort`."""
        if cohort is None:
            return self.worst + 1
        return max([self._worst_listed, *(self._counts[int(c)] + 1 for c in cohort)]) + self._unlisted

    def add(self, cohort) -> None:
        if cohort is None:
            self._unlisted += 1
            return
        self._worst_listed = self.worst_after(cohort) - self._unlisted
        self._counts.update(int(c) for c in cohort)


class CentralLedger(Ledger):
    """Central DP: epsilon depends only on the number of released rounds, each `round_privacy`.

    When the cohorts are listed in the run folder (`cohorts_listed`:
    --log_cohorts, or a replayed ledger line that holds one), amplification by
    sampling does not hold against a reader of the folder: `epsilon` is then
    `unamplified` (the round's Gaussian release without sampling) composed over
    the worst client's participations, and the amplified figure is reported
    beside it as `epsilon_if_cohorts_secret` (COHORTS_LISTED).

    `out_of_reach_per_round`: the samplers' out-of-reach bound of one round's
    releases (`privacy.truncation`; the mechanism computes it from its noise
    and relation). Any round may hold the worst client, so it counts every round.
    """

    def __init__(self, round_privacy: RoundPrivacy, delta: float, accountant: str,
                 unamplified: RoundPrivacy | None = None, cohorts_listed: bool = False,
                 out_of_reach_per_round: float = 0.0):
        super().__init__()
        self.round_privacy = round_privacy
        self.neighboring_relation = round_privacy.neighboring_relation
        self.delta = delta
        self.out_of_reach_per_round = out_of_reach_per_round
        self.tracker = EpsilonTracker(round_privacy, delta, accountant)
        self.unamplified, self._delta, self._accountant = unamplified, delta, accountant
        self._unamplified: EpsilonTracker | None = None  # built when first needed (cohorts listed)
        self.cohorts_listed = cohorts_listed and unamplified is not None
        self.participations = Participations()

    @property
    def amplified_by_sampling(self) -> bool:
        return not self.cohorts_listed

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        return (self.released if released is None else released) * self.out_of_reach_per_round

    @property
    def unamplified_reason(self) -> str | None:
        return COHORTS_LISTED if self.cohorts_listed else None

    def _fields(self, released: int, participations: int) -> dict[str, Any]:
        amplified = self.tracker.epsilon(released)
        if not self.cohorts_listed:
            return {"epsilon": amplified, **self.sampler_fields(released)}
        if self._unamplified is None:
            self._unamplified = EpsilonTracker(self.unamplified, self._delta, self._accountant)
        return {"epsilon": self._unamplified.epsilon(participations), "epsilon_if_cohorts_secret": amplified,
                "epsilon_analysis": "gaussian_cohorts_known", "max_participations": participations,
                **self.sampler_fields(released)}

    def preview(self, cohort) -> float:
        return self._fields(self.released + 1, self.participations.worst_after(cohort))["epsilon"]

    def commit(self, cohort) -> dict[str, Any]:
        self.released += 1
        self.participations.add(cohort)
        return {**self._fields(self.released, self.participations.worst), "rounds_accounted": self.released}

    def replay(self, cohort) -> None:
        if cohort is not None and self.unamplified is not None:
            self.cohorts_listed = True  # listed once, known for good
        self.participations.add(cohort)
        self.released += 1

    def planned(self, rounds: int, participations: int | None = None) -> dict[str, Any]:
        p = rounds if participations is None else participations  # any client may be in every round
        fields = {
            **self._fields(rounds, p),
            "effective_noise_multiplier": self.round_privacy.noise_multiplier,
            "analysis": self.round_privacy.description,
        }
        if self.cohorts_listed:
            fields["analysis"] = (f"{self.unamplified.description}, over the worst client's {p} participations "
                                  "(cohorts listed in ledger.jsonl: no amplification by sampling)")
        return fields

    def projected(self, resume_round: int, rounds: int) -> dict[str, Any]:
        left = max(rounds - resume_round, 0)
        total = self.released + left
        return {**self.planned(total, self.participations.worst + left), "rounds_accounted": total}

    def prefetch(self) -> None:
        self.tracker.prefetch(self.released + 1)

    def close(self) -> None:
        self.tracker.close()
        if self._unamplified is not None:
            self._unamplified.close()


class LocalLedger(Ledger):
    """Client-level (local) DP: two numbers, both under replace-one.

    * `local_epsilon`: what protects a client against the server, who sees
      each local release and who took part (no amplification by sampling).
      One release: Gaussian with noise multiplier z/2 (L2 sensitivity 2C), or
      Laplace with scale z C on L1 sensitivity 2C, epsilon 2/z (at delta
      `delta_sampler`: the sampler is bounded, `privacy.truncation`). Composed
      over the worst client's participations so far, at the run's delta; for
      Laplace the smaller of basic composition and the accountant's.
    * `epsilon` (central view, what the model reveals about one client): the
      model is post-processing of all local releases, so `local_epsilon`
      bounds it (analysis `post_processing`). For Gaussian noise with a fixed
      cohort of m (uniform sampling), the m local noises add up to Gaussian
      noise of std sqrt(m) z C on a sum of replace-one sensitivity 2C:
      `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(sqrt(m) z / 2))`
      per round; that amplification needs the cohorts secret, but the local
      ledger needs every client's participation count, so ledger.jsonl lists
      the cohorts (COHORTS_LISTED). `epsilon` is therefore the smaller of the
      post-processing bound and the same sum without sampling,
      `GaussianDpEvent(sqrt(m) z / 2)` over the worst client's participations
      (analysis `sum_gaussian_cohorts_known`); the amplified figure is
      `epsilon_if_cohorts_secret` (analysis `sampled_sum_gaussian`), true only
      for a reader who sees the model and never the folder. Under Poisson
      sampling the cohort size, and with it the total noise, depends on the
      neighbour, so only the post-processing bound is reported.
    """

    neighboring_relation = REPLACE_ONE

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.delta = cfg.target_delta
        dp = cfg.dp
        z = dp.noise_multiplier
        self.mechanism = dp.local_mechanism
        self._release = local_release(self.mechanism, z)
        if self.mechanism != "gaussian":
            self.pure_epsilon_per_release = 2.0 / z
        self.out_of_reach_per_release = truncation.local_release_out_of_reach(self.mechanism, z)
        self._local = EpsilonTracker(self._release, self.delta, dp.accountant)  # checks the accountant takes it
        self._sum: EpsilonTracker | None = None  # amplified by sampling: needs the cohorts secret
        self._sum_known: EpsilonTracker | None = None  # the same sum, the cohorts known
        scheme = scheme_of(cfg)
        n, m = cfg.population, cfg.train.clients_per_round
        summed = scheme.summed_local_round(n, m, z, cohort_known=False) if self.mechanism == "gaussian" else None
        if summed is not None:
            kind = dp.accountant if make_accountant(dp.accountant, REPLACE_ONE).supports(summed.event) else "rdp"
            self._sum = EpsilonTracker(summed, self.delta, kind)
            self._sum_known = EpsilonTracker(scheme.summed_local_round(n, m, z, cohort_known=True), self.delta,
                                             dp.accountant)
        self._participations: collections.Counter = collections.Counter()
        self.max_participations = 0

    def out_of_reach(self, released: int | None = None, participations: int | None = None) -> float:
        """Every output is post-processing of the worst client's local releases: its participations count."""
        if participations is None:
            participations = self.max_participations if released is None else released
        return participations * self.out_of_reach_per_release

    def local_epsilon(self, participations: int) -> float:
        eps = self._local.epsilon(participations)
        if self.mechanism == "laplace":
            eps = min(eps, participations * self.pure_epsilon_per_release)
        return eps

    @property
    def unamplified_reason(self) -> str | None:
        if self._sum is None:
            return None
        return ("local_epsilon needs every client's participation count, which a resume rebuilds from the cohorts "
                "in ledger.jsonl (a count per client would reveal them as well); " + COHORTS_LISTED)

    def _central(self, rounds: int, participations: int) -> tuple[float, str]:
        """The central view for a reader of the folder, who knows the cohorts (ledger.jsonl lists them)."""
        post = self.local_epsilon(participations)
        if self._sum_known is not None:
            summed = self._sum_known.epsilon(participations)
            if summed < post:
                return summed, "sum_gaussian_cohorts_known"
        return post, "post_processing"

    def _if_cohorts_secret(self, rounds: int, participations: int) -> float | None:
        """The central view amplified by sampling: for a reader who never sees the cohorts (None: no such analysis)."""
        if self._sum is None:
            return None
        return min(self._central(rounds, participations)[0], self._sum.epsilon(rounds))

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
            **self.sampler_fields(rounds, participations),
        }
        secret = self._if_cohorts_secret(rounds, participations)
        if secret is not None:
            fields["epsilon_if_cohorts_secret"] = secret
        if self.mechanism == "laplace":
            fields["local_epsilon_per_release"] = self.pure_epsilon_per_release  # at delta delta_sampler
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
        for tracker in (self._sum, self._sum_known):
            if tracker is not None:
                tracker.close()
