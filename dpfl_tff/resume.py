"""Opening a run folder: a new run, a resume checked before anything is written, or a finished run.

`open_folder` does every check a resume needs before the run writes a byte:
settings that must not change (`outputs.ExperimentDir`), the privacy ledger
(intact, hash-chained, covering every release the checkpoints, metrics and
summary record: `release_log.check_ledger_covers`), the newest checkpoint
against the model built now, and whether the run has anything left to do.
`restore` then loads the state, replays the ledger into the accountant and
trims metrics.jsonl to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from dpfl_tff import checkpoints, outputs, release_log
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy.ledgers import Ledger
from dpfl_tff.privacy.mechanism import PrivacyMechanism


@dataclasses.dataclass
class RunFolder:
    """The run folder's handles; `finished` is its summary when the run has nothing left to do."""

    out: outputs.ExperimentDir
    ckpts: checkpoints.CheckpointManager
    ledger_log: release_log.LedgerLog
    finished: dict[str, Any] | None = None


def open_folder(cfg: ExperimentConfig, mechanism: PrivacyMechanism, model_weights: list, overwrite: bool,
                fresh: bool, warn: Callable[[str], None] = print, create: bool = True) -> RunFolder:
    """Checks `cfg.output_dir` as a run would use it; writes nothing but an absent folder (if `create`).

    Raises:
      ConfigError: settings differ from the run in the folder, or a checkpoint no longer fits the model.
      LedgerError: the ledger does not cover what the folder says was released.
      OSError, FileExistsError: the folder cannot be used.
    """
    out = outputs.ExperimentDir(cfg.output_dir, cfg.to_dict(), overwrite=overwrite, fresh=fresh, create=create)
    folder = RunFolder(out, checkpoints.CheckpointManager(cfg.output_dir, warn=warn),
                       release_log.LedgerLog(cfg.output_dir))
    if out.resuming:
        folder.ledger_log.load(needs_cohorts=mechanism.accounting.ledger_needs_cohorts)
        release_log.check_ledger_covers(folder.ledger_log, cfg.output_dir, folder.ckpts.dir)
        folder.ckpts.check_fits(model_weights, cfg.train.model)
        folder.finished = finished_summary(out, cfg)
    return folder


def describe(cfg: ExperimentConfig, mechanism: PrivacyMechanism, model_weights: list, overwrite: bool,
             fresh: bool) -> tuple[str, History]:
    """What a run would do with its folder (for --dry_run), checked as `open_folder` does, writing nothing.

    Returns:
      (the sentence to print, the folder's history: what the prediction composes first).
    """
    path = cfg.output_dir
    if not os.path.exists(path):
        return f"new run in {path}", History()
    if not os.path.isdir(path):
        raise OSError(f"--output_dir={path}: is a file, not a folder; give a folder path")
    if overwrite:
        return f"{path}: an earlier run there would be deleted (--overwrite), then a new run", History()
    folder = open_folder(cfg, mechanism, model_weights, overwrite=False, fresh=fresh, create=False)
    if not folder.out.resuming:
        return f"new run in {path}", History()
    history = history_of(folder)
    if folder.finished is not None:  # nothing left to run: the prediction is the ledger's own figure
        history = dataclasses.replace(history, resume_round=max(history.resume_round, cfg.train.rounds))
        return (f"{path} holds this run, already complete ({folder.finished['rounds']} rounds): nothing would be "
                "done", history)
    return (f"resumes {path} from its newest checkpoint (round {history.resume_round}); its ledger holds "
            f"{folder.ledger_log.count} release(s)", history)


@dataclasses.dataclass(frozen=True)
class History:
    """What a run folder has already released: the verified ledger's entries and the round a resume starts from.

    `resume_round` is the newest checkpoint's round (0: none); should that checkpoint prove unreadable,
    the run says so and reprints its privacy line from the round it did restore (`training`).
    """

    entries: tuple[dict[str, Any], ...] = ()
    resume_round: int = 0

    @property
    def releases(self) -> int:
        return len(self.entries)

    def text(self) -> str:
        """'' for a new run, else how the prediction composes the history (for the privacy line)."""
        if not self.entries:
            return ""
        return (f"composed after the ledger's {self.releases} release(s), resuming from round "
                f"{self.resume_round}")


def history_of(folder: RunFolder) -> History:
    """The history of an opened (checked) folder; empty unless it is resumed."""
    if not folder.out.resuming:
        return History()
    return History(tuple(folder.ledger_log.entries), max(folder.ckpts.rounds(), default=0))


def read_history(cfg: ExperimentConfig, mechanism: PrivacyMechanism) -> History:
    """The history of `cfg.output_dir` read without writing (sweep plans): verified as a resume checks the ledger.

    Raises:
      LedgerError: the ledger is damaged or does not cover what the folder says was released.
    """
    root = cfg.output_dir
    if not os.path.isdir(root):
        return History()
    ledger_log = release_log.LedgerLog(root)
    ledger_log.load(needs_cohorts=mechanism.accounting.ledger_needs_cohorts)
    ckpts = checkpoints.CheckpointManager(root)
    release_log.check_ledger_covers(ledger_log, root, ckpts.dir)
    return History(tuple(ledger_log.entries), max(ckpts.rounds(), default=0))


def finished_summary(out: outputs.ExperimentDir, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The folder's summary if its run has nothing left to do under `cfg`, else None.

    Finished: completed with at least `cfg.train.rounds` rounds, or stopped at
    the budget guard: by `--target_epsilon`, or by a `--max_epsilon` that is not
    larger now (and caps the same `--max_epsilon_view`).
    """
    summary = out.read_summary()
    if summary is None or not isinstance(summary.get("rounds"), int):
        return None
    if summary.get("status") == "completed" and summary["rounds"] >= cfg.train.rounds:
        return summary
    if summary.get("status") != "stopped_at_budget":
        return None
    if summary.get("stop_guard") == "target_epsilon":  # the target cannot change within a run
        return summary
    old_dp = (out.previous_hparams or {}).get("dp", {})
    old, new = old_dp.get("max_epsilon"), cfg.dp.max_epsilon
    same_view = old_dp.get("max_epsilon_view", "guarantee") == cfg.dp.max_epsilon_view
    if new is not None and old is not None and new <= old and same_view:
        return summary
    return None


def restore(folder: RunFolder, ledger: Ledger, state: Any,
            log: Callable[[str], None]) -> tuple[int, Any, list[dict[str, Any]]]:
    """Restores state, accountant and metrics of an interrupted run: (round, state, records).

    Round state a mechanism keeps (an adaptive clip, a tree's position) is in the restored process state.

    Every release in the (verified) ledger is replayed into the accountant,
    also those after the checkpoint, which are about to be re-run.
    """
    done, record = 0, None
    ckpts, ledger_log = folder.ckpts, folder.ledger_log
    loaded = ckpts.load_latest(state)
    if loaded is not None:
        done, state, record = loaded
    elif ckpts.rounds():
        log(f"WARNING: no checkpoint in {ckpts.dir} is readable: the run restarts from round 1 "
            f"(the ledger keeps its {ledger_log.count} release(s): epsilon counts them)")
    elif ledger_log.count:
        log(f"no checkpoint was written: the run restarts from round 1 "
            f"(the ledger keeps its {ledger_log.count} release(s): epsilon counts them)")
    for entry in ledger_log.entries:
        ledger.replay_entry(entry)
    return done, state, folder.out.truncate_metrics(done, record)
