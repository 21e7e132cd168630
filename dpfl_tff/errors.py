"""Every error dpfl_tff raises on purpose, in one place (pure Python: importing it imports nothing else).

Drivers print any of the first six as one `error: ...` line and exit 2 (usage:
nothing was trained); `LedgerError` also exits 2 and leaves the run folder as
it was. The run-control exceptions `RunInterrupted` (a stop request) and
`RoundFailed` are raised by the round loop (`training.py`, which re-exports
them); drivers catch them without importing TensorFlow first.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting outside its allowed range. The message is one line naming the flag, the value and the range."""


class CheckpointMismatch(ConfigError):
    """A checkpoint that is intact but does not fit the model or training state built now."""


class DataMissingError(FileNotFoundError):
    """A data file is not where the task looks for it. The message says how to get it."""


class DownloadError(DataMissingError):
    """`--download` could not provide a data file (offline, HTTP error, interrupted, checksum mismatch).

    The message is one line naming the URL or file, what happened and what to do.
    """


class DataFileError(ValueError):
    """A data file is there but not in the format its task reads.

    The message is one line: the file's path, what is wrong with it and, in
    parentheses, what was expected.
    """


class LedgerError(Exception):
    """The ledger cannot be trusted to cover what the run released; the run must not resume."""


class RunInterrupted(Exception):
    """The run was asked to stop (e.g. SIGTERM); the last completed round is checkpointed.

    Returned by `stop_requested` (the run stops after the current round), or
    raised by a signal handler to cut the current round short: `run` then
    checkpoints the last completed round before it re-raises.
    """

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.exit_code = exit_code
        # What the exit line says of the last completed round (the loop replaces it when that round's state,
        # which stays in the local worker between checkpoints, was lost with the worker).
        self.checkpoint_note = "last completed round checkpointed"


class RoundFailed(RuntimeError):
    """A round's TFF computation failed; the last completed round is checkpointed."""
