"""`--dry_run`: every check a run makes, its plan printed, nothing trained or written; and the lines a run starts with.

On a registered model and the offline task (`model_specs`), a dry run imports
no TensorFlow: the data is loaded with NumPy and scikit-learn, the model's
facts are read from `model_specs.json`, the noise calibrated and the epsilon
computed by dp-accounting. `training` prints the same privacy line and notes
when a run starts (`_privacy_line`, `_calibration_history_notes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpfl_tff import folder_lock, plan, resume, worker_auth
from dpfl_tff.config import ExperimentConfig
from dpfl_tff.privacy.mechanism import PrivacyMechanism


def _privacy_line(cfg: ExperimentConfig, mechanism: PrivacyMechanism, planned: dict[str, Any],
                  history: resume.History) -> str:
    """The run's privacy line: the mechanism's, how it composes the folder's history, the cohorts' secrecy."""
    composed = f"; {history.text()}" if history.entries else ""
    return f"{mechanism.privacy_line(planned)}{composed}; {_sampling_text(cfg, mechanism)}"


def _calibration_history_notes(cfg: ExperimentConfig, planned: dict[str, Any], history: resume.History) -> list[str]:
    """On a resume of a calibrated run: its epsilon at the end, with the history, against --target_epsilon."""
    target = cfg.dp.target_epsilon
    if target is None or not history.entries:
        return []
    eps = planned["epsilon"]
    where = (f"with the ledger's {history.releases} release(s) and rounds {history.resume_round + 1}.."
             f"{cfg.train.rounds} re-run from the checkpoint, epsilon would end at {eps:.4g}")
    if eps <= target:
        return [f"calibration: {where} <= --target_epsilon={target:g}"]
    return [f"calibration: {where} > --target_epsilon={target:g} (the noise cannot change within a run): the "
            "--target_epsilon guard stops the run before the round that would go above it"]


def _sampling_text(cfg: ExperimentConfig, mechanism: PrivacyMechanism) -> str:
    """How secret the cohorts are: what amplification by sampling rests on."""
    if cfg.train.sampling_seed is None:
        text = "cohorts drawn from OS entropy" + ("" if mechanism.accounting.records_cohorts else " (secret)")
    else:
        text = (
            "cohorts seeded by --sampling_seed: amplification by sampling holds only against readers who do "
            "not know that seed"
        )
    if cfg.log_cohorts:
        text += "; --log_cohorts: ledger.jsonl lists every cohort, so its readers know who took part"
    elif mechanism.accounting.records_cohorts:
        text += "; ledger.jsonl lists every cohort (this privacy mode's accounting or the epoch shuffle needs them)"
    if mechanism.accounting.records_cohorts and mechanism.provides_dp:
        text += ": no epsilon reported relies on amplification by sampling"
    return text


def worker_credential(cfg: ExperimentConfig) -> worker_auth.Credential | None:
    """The driver's credential for `cfg.workers` (None: no workers, or --insecure_workers).

    Raises:
      CredentialError: --worker_credentials is missing, incomplete or a worker's.
    """
    if not cfg.workers or cfg.insecure_workers:
        return None
    return worker_auth.load(cfg.worker_credentials, "driver")


def dry_run(cfg: ExperimentConfig, overwrite: bool = False, fresh: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Checks everything `run` would check, prints the plan, trains nothing and starts no TFF worker.

    Loads the data, builds and checks the model, calibrates the noise, computes
    the epsilon after `cfg.train.rounds` rounds and checks the output folder as
    a resume would (settings, ledger, checkpoint), without writing anything.

    Returns:
      The plan's figures (also printed through `log`).

    Raises:
      ConfigError, OSError, LedgerError: as `run` would, before training.
    """
    run_plan = plan.prepare(cfg, log, stored_model_spec=True)
    cfg, data, mechanism = run_plan.cfg, run_plan.data, run_plan.mechanism
    worker_credential(cfg)
    with folder_lock.probe(cfg.output_dir):  # a run writing the folder now would make these reads meaningless
        folder, history = resume.describe(cfg, mechanism, list(run_plan.initial_weights), overwrite, fresh)
    planned = run_plan.projected(history)
    for note in [*run_plan.notes, *_calibration_history_notes(cfg, planned, history)]:
        log(note)
    log("dry run: nothing is trained, no TFF worker is started, nothing is written")
    log(f"task: {data.description}")
    canary = f" + {cfg.canary_clients} canary clients" if cfg.canary_clients else ""
    log(f"clients: N = {data.num_clients}{canary}, {cfg.train.clients_per_round} per round ({cfg.train.client_sampling})")
    log(f"model: {cfg.train.model}, {run_plan.model_parameters:,} parameters")
    log(_privacy_line(cfg, mechanism, planned, history))
    if run_plan.not_covered:
        log(f"released but not covered by epsilon: {', '.join(run_plan.not_covered)} "
            "(--client_metrics=false leaves them out)")
    log(f"output: {folder}")
    return {"num_clients": data.num_clients, "model_parameters": run_plan.model_parameters,
            "epsilon": planned["epsilon"], "noise_multiplier": cfg.dp.noise_multiplier, "output": folder}
