"""Client sampling per round; must match what accounting assumes.

* `poisson`: every client joins independently with probability q = m / N.
  Drawn as K ~ Binomial(N, q) and then a uniform K-subset, which has exactly
  the same distribution, in O(K) time and memory.
* `uniform`: exactly m clients, uniformly without replacement.
* `shuffle` (DP-FTRL's participation, `EpochShuffler`): epoch e is a uniformly
  random permutation of the N clients cut into floor(N / m) rounds of exactly
  m; the N mod m clients at the end of each epoch's permutation sit that epoch
  out. No client takes part twice in an epoch. Its privacy analysis needs no
  secrecy of the order (`privacy.ftrl`), so a resumed run re-runs a round with
  the clients the ledger recorded for it.
* `banded` (banded MF's participation, `BandedSampler`): each client is put
  in one of B secret groups uniformly at random when the run (or a resumed
  run) starts; round r samples each client of group (r - 1) mod B
  independently with probability q = m B / N (the expected cohort stays m).
  A client is eligible at most once in any B consecutive rounds.
* `cyclic` (BLT-DP-FTRL's participation, `CyclicSampler`): the clients are
  split once into b = floor(N / m) fixed groups (a random permutation dealt
  round-robin, so the groups hold floor(N/b) or ceil(N/b) clients) and round
  r trains group (r - 1) mod b: any two participations of a client are
  exactly b rounds apart. Its analysis (`privacy.blt`) needs no secrecy; a
  resumed run rebuilds the groups from the cohorts the ledger recorded.

Amplification by sampling holds only against someone who does not know who
took part. So cohorts are secret by default: `CohortSampler` draws them from a
generator seeded with 128 bits of OS entropy when the run starts (a resumed
run starts a new one), never from the public `--seed`. With `sampling_seed`
(tests, debugging) the cohort of the k-th execution of round r is a pure
function of (sampling_seed, r, k): reproducible, and a round re-run after a
resume (k = 2, 3, ...) still gets a cohort drawn independently of the first,
so no cohort is ever used twice and every execution is an independently
sampled round for the accountant.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from dpfl_tff.config import BANDS_AUTO, CLIENT_SAMPLING, ExperimentConfig
from dpfl_tff.privacy import events
from dpfl_tff.privacy.events import ADD_OR_REMOVE_ONE, REPLACE_ONE, RoundPrivacy


def _subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    # Generator.choice without replacement uses Floyd's/tail-shuffle methods: O(k) when k << n.
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False))


def draw_cohort(scheme: str, num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted client ids of one round of the scheme named `scheme` (`poisson` or `uniform`) drawn with `rng`.

    Args:
      scheme: `poisson` or `uniform`.
      num_clients: N.
      clients_per_round: m, the expected (poisson) or exact (uniform) size.
      rng: the randomness; it must be secret for amplification by sampling.
    """
    return scheme_named(scheme).draw(num_clients, clients_per_round, rng)


class CohortSampler:
    """Draws the cohort of every executed round.

    Args:
      scheme, num_clients, clients_per_round: as `draw_cohort`.
      sampling_seed: None (default): a fresh PCG64 generator seeded from OS
        entropy (`numpy.random.SeedSequence()`), whose draws are never
        written anywhere unless the run is asked to log cohorts. An integer:
        the cohort of execution k of round r is drawn from
        `default_rng([sampling_seed, 7, r, k])`; anyone who knows the seed
        knows every cohort.
    """

    def __init__(self, scheme: str, num_clients: int, clients_per_round: int, sampling_seed: int | None = None):
        scheme_named(scheme)  # raises for an unknown name
        self.scheme = scheme
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.sampling_seed = sampling_seed
        self._secret = None if sampling_seed is not None else np.random.default_rng(np.random.SeedSequence())

    @property
    def seeded(self) -> bool:
        return self.sampling_seed is not None

    def cohort(self, round_num: int, execution: int = 1) -> np.ndarray:
        """Cohort of the `execution`-th run (1-based) of round `round_num` (1-based).

        Unseeded, every call is a fresh draw: call it once per executed round.
        """
        if self._secret is not None:
            rng = self._secret
        else:
            rng = np.random.default_rng([self.sampling_seed, 7, int(round_num), int(execution)])
        return draw_cohort(self.scheme, self.num_clients, self.clients_per_round, rng)

    def restore(self, ledger_entries: list[dict]) -> None:
        """Takes the cohorts a resumed run's ledger recorded (only `shuffle` reuses them)."""
        del ledger_entries


class EpochShuffler(CohortSampler):
    """`--client_sampling=shuffle`: every epoch a fresh permutation of the clients, cut into rounds of m.

    rounds_per_epoch = floor(N / m); round r is in epoch e = (r - 1) // rounds_per_epoch
    (0-based) at position k = (r - 1) % rounds_per_epoch and gets the clients at
    positions k m .. (k + 1) m - 1 of epoch e's permutation; the last N mod m
    clients of the permutation sit the epoch out. Every execution of a round
    gets the same clients. Permutations: `default_rng([sampling_seed, 13, e])`
    with a seed; without, drawn from a generator seeded by OS entropy when the
    epoch is first needed. `restore` fixes the cohorts a resumed run's ledger
    holds: epoch e's permutation starts with those rounds' clients and goes on
    with the others in the seeded order (seeded: the very same permutation)
    or in a fresh random order (unseeded).
    """

    def __init__(self, scheme: str, num_clients: int, clients_per_round: int, sampling_seed: int | None = None):
        super().__init__(scheme, num_clients, clients_per_round, sampling_seed)
        if clients_per_round > num_clients:
            raise ValueError(f"--clients_per_round={clients_per_round}: must be <= the {num_clients} clients")
        self.rounds_per_epoch = num_clients // clients_per_round
        self._recorded: dict[int, np.ndarray] = {}  # round -> the cohort its first execution had
        self._permutations: dict[int, np.ndarray] = {}

    def epoch_of(self, round_num: int) -> int:
        """0-based epoch of round `round_num` (1-based)."""
        return (int(round_num) - 1) // self.rounds_per_epoch

    def restore(self, ledger_entries: list[dict]) -> None:
        for entry in ledger_entries:
            if entry.get("cohort") is not None:
                self._recorded.setdefault(int(entry["round"]), np.asarray(entry["cohort"], np.int64))
        self._permutations.clear()

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of all N clients (the first rounds_per_epoch * m take part)."""
        if epoch not in self._permutations:
            rng = self._secret if self._secret is not None else np.random.default_rng([self.sampling_seed, 13, epoch])
            order = rng.permutation(self.num_clients)
            first = epoch * self.rounds_per_epoch + 1
            rounds = [r for r in range(first, first + self.rounds_per_epoch) if r in self._recorded]
            if rounds != list(range(first, first + len(rounds))):
                raise ValueError(f"the ledger's rounds of epoch {epoch + 1} are not its first ones: {rounds}")
            fixed = [self._recorded[r] for r in rounds]
            taken = np.concatenate([np.zeros(0, np.int64), *fixed])
            if len(np.unique(taken)) != len(taken):
                raise ValueError(f"the ledger's cohorts of epoch {epoch + 1} repeat a client")
            self._permutations[epoch] = np.concatenate([taken, order[~np.isin(order, taken)]])
        return self._permutations[epoch]

    def cohort(self, round_num: int, execution: int = 1) -> np.ndarray:
        """The clients of round `round_num` (every execution the same: see the class docstring)."""
        del execution
        k = (int(round_num) - 1) % self.rounds_per_epoch
        m = self.clients_per_round
        return np.sort(self.permutation(self.epoch_of(round_num))[k * m:(k + 1) * m])


class BandedSampler(CohortSampler):
    """`--client_sampling=banded`: secret groups of B, round r Poisson-samples group (r - 1) mod B at q = m B / N.

    The grouping is drawn once per sampler (a run, or a resumed run: `privacy.bandmf` starts a new noise
    stream then) from OS entropy, or from `default_rng([sampling_seed, 17])` when seeded; round r's draw is
    a fresh Binomial(|group|, q) count and a uniform subset of that size, which is exactly independent
    Bernoulli(q) sampling of the group.
    """

    def __init__(self, scheme: str, num_clients: int, clients_per_round: int, sampling_seed: int | None = None,
                 bands: int = 1):
        super().__init__(scheme, num_clients, clients_per_round, sampling_seed)
        self.bands = int(bands)
        self.q = clients_per_round * self.bands / num_clients
        if self.q > 1:
            raise ValueError(f"--bands={bands}: q = clients_per_round * bands / N = {self.q:.4g} must be <= 1")
        rng = self._secret if self._secret is not None else np.random.default_rng([sampling_seed, 17])
        self.groups = rng.integers(0, self.bands, size=num_clients)
        self._members = [np.flatnonzero(self.groups == g) for g in range(self.bands)]

    def group_of_round(self, round_num: int) -> int:
        return (int(round_num) - 1) % self.bands

    def cohort(self, round_num: int, execution: int = 1) -> np.ndarray:
        if self._secret is not None:
            rng = self._secret
        else:
            rng = np.random.default_rng([self.sampling_seed, 7, int(round_num), int(execution)])
        members = self._members[self.group_of_round(round_num)]
        k = int(rng.binomial(len(members), self.q))
        return np.sort(members[_subset(rng, len(members), k)])
class CyclicSampler(CohortSampler):
    """`--client_sampling=cyclic`: b = floor(N / m) fixed groups, round r trains group (r - 1) mod b.

    The groups: a permutation of the N clients dealt round-robin (group g gets
    positions g, g + b, g + 2b, ...), so group g holds N // b + (g < N mod b)
    clients. Permutation: `default_rng([sampling_seed, 29])` with a seed,
    else from OS entropy. `restore` fixes the groups a resumed run's ledger
    recorded (the cohort of a round is its group's); the groups not yet
    recorded are dealt from the other clients in the seeded order (seeded:
    the very same groups) or in a fresh random order.
    """

    def __init__(self, scheme: str, num_clients: int, clients_per_round: int, sampling_seed: int | None = None):
        super().__init__(scheme, num_clients, clients_per_round, sampling_seed)
        if clients_per_round > num_clients:
            raise ValueError(f"--clients_per_round={clients_per_round}: must be <= the {num_clients} clients")
        self.groups_count = num_clients // clients_per_round
        self._recorded: dict[int, np.ndarray] = {}  # group -> its clients, from the ledger
        self._groups: list[np.ndarray] | None = None

    def group_of_round(self, round_num: int) -> int:
        """0-based group of round `round_num` (1-based)."""
        return (int(round_num) - 1) % self.groups_count

    def group_size(self, group: int) -> int:
        return self.num_clients // self.groups_count + (1 if group < self.num_clients % self.groups_count else 0)

    def restore(self, ledger_entries: list[dict]) -> None:
        for entry in ledger_entries:
            if entry.get("cohort") is None:
                continue
            g, cohort = self.group_of_round(entry["round"]), np.sort(np.asarray(entry["cohort"], np.int64))
            if g in self._recorded and not np.array_equal(self._recorded[g], cohort):
                raise ValueError(f"the ledger's round {entry['round']} has other clients than group {g + 1}'s")
            if cohort.size != self.group_size(g):
                raise ValueError(f"the ledger's round {entry['round']} has {cohort.size} clients, group {g + 1} "
                                 f"has {self.group_size(g)}")
            self._recorded[g] = cohort
        self._groups = None

    def groups(self) -> list[np.ndarray]:
        """The b groups' sorted client ids."""
        if self._groups is None:
            rng = self._secret if self._secret is not None else np.random.default_rng([self.sampling_seed, 29])
            order = rng.permutation(self.num_clients)
            taken = np.concatenate([np.zeros(0, np.int64), *self._recorded.values()])
            if len(np.unique(taken)) != len(taken):
                raise ValueError("the ledger's cyclic groups share a client")
            if not self._recorded:
                dealt = [order[g::self.groups_count] for g in range(self.groups_count)]
            else:
                rest = iter(order[~np.isin(order, taken)])
                dealt = [self._recorded[g] if g in self._recorded else
                         np.array([next(rest) for _ in range(self.group_size(g))], np.int64)
                         for g in range(self.groups_count)]
            self._groups = [np.sort(np.asarray(g, np.int64)) for g in dealt]
        return self._groups

    def cohort(self, round_num: int, execution: int = 1) -> np.ndarray:
        """Group (round_num - 1) mod b (every execution the same)."""
        del execution
        return self.groups()[self.group_of_round(round_num)]


class SamplingScheme(abc.ABC):
    """How a round's cohort is drawn (`--client_sampling`), and what that does to a round's DP event.

    The one place that knows a scheme: it draws cohorts (`sampler`, secret
    unless seeded) and turns a round's Gaussian sum into the accounted DpEvent
    and neighbouring relation (amplified by the sampling, or with the cohort
    known to the reader); the events themselves are built in `privacy.events`.
    Mechanisms ask a scheme's properties, never its name.
    """

    name: ClassVar[str]
    # Whether secret random cohorts amplify a round's privacy (DP-FedAvg's analysis rests on it).
    amplifies: ClassVar[bool] = True
    # Whether every cohort has the same public size m (then the realised size reveals nothing).
    fixed_size: ClassVar[bool] = True
    # Whether every client takes part at most once per epoch of floor(N / m) rounds (DP-FTRL's assumption).
    once_per_epoch: ClassVar[bool] = False
    # Whether a resumed run needs the ledger's cohorts to draw the same epochs (so the ledger records them).
    resume_needs_cohorts: ClassVar[bool] = False
    # Whether each client takes part exactly every b = floor(N / m) rounds in a fixed group (BLT's min-separation).
    fixed_groups: ClassVar[bool] = False
    # The relation a round's epsilon holds under with this scheme.
    relation: ClassVar[str] = REPLACE_ONE
    # Whether a client is eligible only once in every B rounds (banded MF's participation; B = `bands`).
    banded: ClassVar[bool] = False

    def sampler(self, num_clients: int, clients_per_round: int, sampling_seed: int | None = None) -> CohortSampler:
        """The sampler that draws every executed round's cohort (secret unless `sampling_seed`)."""
        return CohortSampler(self.name, num_clients, clients_per_round, sampling_seed)

    def draw(self, num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
        """One round's sorted cohort drawn with `rng` (schemes whose rounds are drawn independently)."""
        raise ValueError(f"--client_sampling={self.name} draws epochs, not rounds: use {type(self).__name__}.sampler")

    @abc.abstractmethod
    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        """One round of a Gaussian sum (noise std z C) amplified by this scheme's secret sampling."""

    def known_cohort_round(self, z: float) -> RoundPrivacy:
        """The same round, its cohort known to the reader: no amplification, at this scheme's relation."""
        return events.known_cohort_gaussian_round(z, self.relation)

    def summed_local_round(self, num_clients: int, clients_per_round: int, z: float,
                           cohort_known: bool) -> RoundPrivacy | None:
        """The server's sum of m local Gaussian noises as one amplified release, if this scheme gives it one."""
        del num_clients, clients_per_round, z, cohort_known
        return None


class PoissonSampling(SamplingScheme):
    """`poisson`: every client joins independently with probability q = m / N (add-or-remove-one)."""

    name = "poisson"
    fixed_size = False
    relation = ADD_OR_REMOVE_ONE

    def draw(self, num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.binomial(num_clients, clients_per_round / num_clients))
        return _subset(rng, num_clients, k)

    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        return events.poisson_gaussian_round(num_clients, clients_per_round, z)


class FixedSizeSampling(SamplingScheme):
    """`uniform`: exactly m clients, uniformly without replacement (replace-one)."""

    name = "uniform"

    def draw(self, num_clients: int, clients_per_round: int, rng: np.random.Generator) -> np.ndarray:
        return _subset(rng, num_clients, clients_per_round)

    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        return events.fixed_cohort_gaussian_round(num_clients, clients_per_round, z)

    def summed_local_round(self, num_clients: int, clients_per_round: int, z: float,
                           cohort_known: bool) -> RoundPrivacy | None:
        return events.summed_local_gaussian_round(num_clients, clients_per_round, z, cohort_known)


class EpochShuffle(SamplingScheme):
    """`shuffle`: epochs of a fresh permutation cut into rounds of m (`EpochShuffler`); no amplification."""

    name = "shuffle"
    amplifies = False
    once_per_epoch = True
    resume_needs_cohorts = True

    def sampler(self, num_clients: int, clients_per_round: int, sampling_seed: int | None = None) -> CohortSampler:
        return EpochShuffler(self.name, num_clients, clients_per_round, sampling_seed)

    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        raise ValueError("--client_sampling=shuffle: a shuffle's order is not secret random sampling, it amplifies "
                         "nothing (DP-FTRL's tree accounts it)")


class BandedPoissonSampling(SamplingScheme):
    """`banded`: secret groups of B, one group Poisson-sampled per round at q = m B / N (`BandedSampler`)."""

    name = "banded"
    fixed_size = False
    relation = ADD_OR_REMOVE_ONE
    banded = True

    def __init__(self, bands: int | str = 1):
        # --bands=auto before the plan has chosen B (`privacy.bands_auto`): only `banded` may be asked.
        self.bands = bands if bands == BANDS_AUTO else int(bands)

    def _resolved_bands(self) -> int:
        if self.bands == BANDS_AUTO:
            raise ValueError(f"--bands={BANDS_AUTO} is not resolved yet (the plan chooses B once N is known)")
        return self.bands

    def sampler(self, num_clients: int, clients_per_round: int, sampling_seed: int | None = None) -> CohortSampler:
        return BandedSampler(self.name, num_clients, clients_per_round, sampling_seed, self._resolved_bands())

    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        """One participation of a client (banded MF composes ceil(T / B) of them: `privacy.bandmf`)."""
        return events.banded_participation(num_clients, clients_per_round, self._resolved_bands(), z)


class CyclicSampling(SamplingScheme):
    """`cyclic`: b = floor(N / m) fixed groups taking turns (`CyclicSampler`); no amplification.

    A client is in every round of its group, b rounds apart, which BLT-DP-FTRL's
    min-separation sensitivity accounts (`privacy.blt`). `once_per_epoch` is
    left False: DP-FTRL's tree keeps its shuffle (issue 25).
    """

    name = "cyclic"
    amplifies = False
    fixed_size = False  # groups of floor(N/b) or ceil(N/b): the size depends on N
    fixed_groups = True
    resume_needs_cohorts = True
    relation = ADD_OR_REMOVE_ONE

    def sampler(self, num_clients: int, clients_per_round: int, sampling_seed: int | None = None) -> CohortSampler:
        return CyclicSampler(self.name, num_clients, clients_per_round, sampling_seed)

    def gaussian_round(self, num_clients: int, clients_per_round: int, z: float) -> RoundPrivacy:
        raise ValueError("--client_sampling=cyclic: fixed groups are not secret random sampling, they amplify "
                         "nothing (BLT-DP-FTRL's min-separation sensitivity accounts them)")


SCHEMES: dict[str, SamplingScheme] = {s.name: s for s in (PoissonSampling(), FixedSizeSampling(), EpochShuffle(),
                                                          BandedPoissonSampling(), CyclicSampling())}
assert tuple(SCHEMES) == CLIENT_SAMPLING, "config.CLIENT_SAMPLING must list the registered sampling schemes"


def scheme_named(name: str) -> SamplingScheme:
    """The scheme of `--client_sampling=name`."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"--client_sampling={name}: must be one of {', '.join(SCHEMES)}") from None


def scheme_of(cfg: ExperimentConfig) -> SamplingScheme:
    """The scheme `cfg` samples its cohorts with (the banded scheme with --bands)."""
    scheme = scheme_named(cfg.train.client_sampling)
    return BandedPoissonSampling(cfg.dp.bands) if scheme.banded else scheme


def sampler_for(scheme: str, num_clients: int, clients_per_round: int,
                sampling_seed: int | None = None) -> CohortSampler:
    """The sampler of `--client_sampling=scheme` (`EpochShuffler` for shuffle)."""
    return scheme_named(scheme).sampler(num_clients, clients_per_round, sampling_seed)
