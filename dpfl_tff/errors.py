"""Every error dpfl_tff raises on purpose, in one place (pure Python: importing it imports nothing else).

Drivers print any of the first six as one `error: ...` line and exit 2 (usage:
nothing was trained); `LedgerError` also exits 2 and leaves the run folder as
it was. The run-control exceptions (`training.RunInterrupted`,
`training.RoundFailed`) live with the loop that raises them.
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

