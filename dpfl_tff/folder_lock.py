"""One run per folder: an exclusive `flock` on `<run folder>/.lock`, held for the run's life.

A run takes the lock before it reads anything of the folder for a resume or
writes anything there (`--overwrite`'s deletion included); a second run on the
same folder then fails at once with `FolderInUse`, naming the holder's pid and
host (written into the lock file after locking), and changes nothing. The
kernel drops the lock when the holder's process ends, however it ends
(SIGKILL, a power cut of a local disk), so a crashed run never leaves a stale
lock: its stale pid in the file is only read when the lock is held.

`--dry_run` takes a shared lock for its reads (`probe`): it writes nothing, so
it neither creates the file nor records itself; a run that starts meanwhile
is told a dry run is reading the folder.

`flock` locks are per open file description: a second `acquire` in the same
process also fails, as it should. On network file systems `flock` is only as
good as the server's lock support (NFSv4 emulates it with POSIX locks; some
FUSE mounts ignore it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator

LOCK_FILE = ".lock"


class FolderInUse(OSError):
    """Another process holds the run folder's lock; nothing was read or written."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    fields = dict(part.split("=", 1) for part in text if "=" in part)
    if "pid" not in fields:
        return "pid unknown"
    since = f", since {fields['since']}" if "since" in fields else ""
    return f"pid {fields['pid']} on host {fields.get('host', '?')}{since}"


def _in_use(path: str, fd: int) -> FolderInUse:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only shared holders: dry runs reading the folder
        fcntl.flock(fd, fcntl.LOCK_UN)
        who = "a --dry_run reading it; try again in a moment"
    except OSError:
        who = f"another run ({_holder(fd)}); wait for it to end, or choose another --output_dir"
    return FolderInUse(f"--output_dir={path}: in use by {who}")


class FolderLock:
    """The held lock of one run folder; `release()` (or the process's end) frees it."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(path: str) -> FolderLock:
    """Creates the folder if absent and locks it for this process; returns the held lock.

    Raises:
      FolderInUse: another process holds it (the message names its pid and host).
      OSError: `path` is a file, or the folder cannot be created or written.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--output_dir={path}: is a file, not a folder; give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if os.path.isdir(path) and not os.access(path, os.W_OK):
            raise OSError(f"--output_dir={path}: folder is not writable") from e
        raise OSError(f"--output_dir={path}: cannot create the folder ({e.strerror})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        error = _in_use(path, fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else e
        os.close(fd)
        raise error from None
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:  # who holds it, for the message of a run refused; a full disk only loses the names
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
    except OSError:
        pass
    return FolderLock(path, fd)


@contextlib.contextmanager
def probe(path: str) -> Iterator[None]:
    """A shared lock for reading `path` without writing (--dry_run), if a run ever locked it.

    Raises:
      FolderInUse: a run holds the folder.
    """
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (no run has locked the folder) or no folder: nothing to wait for
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise FolderInUse(f"--output_dir={path}: in use by another run ({_holder(fd)}); "
                              "wait for it to end, or choose another --output_dir") from None
        yield
    finally:
        os.close(fd)
