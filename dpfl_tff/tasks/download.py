"""`--download`: fetch the data files of emnist, cifar100 and cifar10 into --data_dir, verified.

Only called when `--download` is given (`plan.prepare`); without it nothing
is ever fetched (the loaders stop with `DataMissingError` instead).

Each file comes from its canonical public location (the URLs TFF 0.87's and
Keras' own loaders use) and lands in the layout the loaders read:

  emnist    emnist_all.sqlite.lzma  -> LZMA-decompressed to --data_dir/emnist_all.sqlite
  cifar100  cifar100.sqlite.lzma    -> LZMA-decompressed to --data_dir/cifar100.sqlite
  cifar10   cifar-10-python.tar.gz  -> unpacked to --data_dir/cifar-10-batches-py/

Guarantees:
  * The download goes to `<name>.part` in --data_dir. A `.part` left by an
    interrupted download is resumed with an HTTP Range request (a server that
    ignores the range sends the whole file, which then replaces the part).
  * The complete file's size and SHA-256 are compared with the pinned values
    (`REMOTE_FILES`, each with the source of its pin) before anything is
    decompressed or unpacked. A mismatch deletes the `.part` (its bytes cannot
    become the pinned file by resuming) and raises `DownloadError`: the file is
    refused, nothing is written to the loaders' paths.
  * Decompressing and unpacking write to a temporary name and rename it into
    place, so the loaders never see half a file; the verified archive is
    deleted afterwards. An incomplete cifar-10-batches-py/ only gains the
    files it lacks (nothing of the user's is overwritten or deleted).
  * An archive already in --data_dir under its own name (e.g. fetched by
    hand) is verified and unpacked like a finished download; a `.part` longer
    than the pinned size is discarded and fetched afresh.
  * A file the loaders already find is neither fetched nor checked again.
  * No network, a refused connection, an HTTP error or a stalled transfer
    raises `DownloadError`: one line naming the URL and how to place the file
    by hand.

`BASE_URL_OVERRIDE` (a module attribute, no flag) points every URL at another
server: tests serve tiny files from 127.0.0.1 with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from dpfl_tff.errors import DownloadError

# Tests only: serve every file from `BASE_URL_OVERRIDE + "/" + archive name` instead of its canonical URL.
BASE_URL_OVERRIDE: str | None = None
TIMEOUT_SECONDS = 60.0  # per connection attempt and per read of a chunk
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One archive to fetch and how it becomes the file or folder a loader reads.

    Attributes:
      url: canonical public location.
      archive: file name of the download in --data_dir (`.part` while incomplete).
      size: its size in bytes; sha256: its SHA-256 (hex); pin_source: where both come from.
      target: the file or folder the task's loader reads, relative to --data_dir.
      unpack: "lzma" (decompress the archive to `target`) or "tar.gz" (unpack the `target` folder out of it).
    """

    url: str
    archive: str
    size: int
    sha256: str
    pin_source: str
    target: str
    unpack: str


REMOTE_FILES: dict[str, RemoteFile] = {
    "emnist": RemoteFile(
        url="https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma",
        archive="emnist_all.sqlite.lzma",
        size=170_507_172,
        sha256="c3aaf91b4cf4e69d53d81627ad119eccdc878ff906f68e66063ff10f67faad48",
        pin_source="a third-party dataset provenance record (TFF itself pins no hash for this file)",
        target="emnist_all.sqlite",
        unpack="lzma",
    ),
    "cifar100": RemoteFile(
        url="https://storage.googleapis.com/tff-datasets-public/cifar100.sqlite.lzma",
        archive="cifar100.sqlite.lzma",
        size=153_019_920,
        sha256="23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939",
        pin_source="FedJAX's fedjax/datasets/cifar100.py, which validates this TFF file (TFF pins none)",
        target="cifar100.sqlite",
        unpack="lzma",
    ),
    "cifar10": RemoteFile(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        size=170_498_071,
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        pin_source="Keras' keras/src/datasets/cifar10.py (sha256); the size as published with the archive",
        target="cifar-10-batches-py",
        unpack="tar.gz",
    ),
}


def url_of(remote: RemoteFile) -> str:
    return remote.url if BASE_URL_OVERRIDE is None else f"{BASE_URL_OVERRIDE.rstrip('/')}/{remote.archive}"


def ensure_task_files(task: str, data_dir: str, log: Callable[[str], None]) -> None:
    """Makes the files `task` reads exist in `data_dir`, downloading and verifying them if missing.

    Raises:
      DownloadError: offline, HTTP error, interrupted transfer (the `.part` is
        kept for resuming), or a size/checksum mismatch (the file is refused).
      OSError: --data_dir cannot be created or written, e.g. a full disk.
    """
    remote = REMOTE_FILES.get(task)
    if remote is None:
        log(f"--download: only {', '.join(REMOTE_FILES)} have files to download; nothing fetched for --task={task}")
        return
    target = os.path.join(data_dir, remote.target)
    if _target_complete(remote, target):
        log(f"--download: {target} is already there; not downloading")
        return
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--data_dir={data_dir}: cannot create the folder ({e.strerror or e})") from e
    archive = os.path.join(data_dir, remote.archive)
    fetch_verified(remote, archive, log)
    log(f"--download: unpacking {remote.archive} to {target}")
    if remote.unpack == "lzma":
        _decompress_lzma(archive, target)
    else:
        _unpack_tar(archive, data_dir, remote.target)
    os.remove(archive)
    log(f"--download: {target} ready")


def _target_complete(remote: RemoteFile, target: str) -> bool:
    if remote.unpack == "lzma":
        return os.path.isfile(target)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return all(os.path.isfile(os.path.join(target, n)) for n in names)


def fetch_verified(remote: RemoteFile, path: str, log: Callable[[str], None]) -> None:
    """Downloads `remote` to `path` (via `path.part`, resumed if present) and checks its size and SHA-256.

    A complete `path` already there is only verified. On success `path` holds
    the verified archive.

    Raises:
      DownloadError: see `ensure_task_files`.
    """
    part = path + ".part"
    if os.path.isfile(path) and not os.path.exists(part):
        os.replace(path, part)  # an archive kept from before: verify it like a finished download
    if not os.path.exists(part) or os.path.getsize(part) != remote.size:
        _fetch_to_part(remote, part, log)
    _verify(remote, part)
    os.replace(part, path)


def _open(url: str, offset: int):
    request = urllib.request.Request(url, headers={"User-Agent": "dpfl_tff-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310  (https URLs, or the test server)


def _by_hand(remote: RemoteFile, data_dir_hint: str) -> str:
    fetch = "fetch it" if url_of(remote) == remote.url else f"fetch {remote.url}"
    return (
        f"to place it by hand, {fetch} on a machine with internet and put "
        f"{'its decompressed ' + remote.target if remote.unpack == 'lzma' else 'the unpacked ' + remote.target + '/'} "
        f"in {data_dir_hint} (docs/tasks-and-models.md \"Getting the data files\")"
    )


def _fetch_to_part(remote: RemoteFile, part: str, log: Callable[[str], None]) -> None:
    """Appends the rest of the file to `part` (Range request) or writes it afresh; logs progress."""
    url = url_of(remote)
    data_dir = os.path.dirname(part) or "."
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if offset > remote.size:
        os.remove(part)  # longer than the pinned file: cannot be a prefix of it
        offset = 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing after `offset`: the part may already be complete
            return
        raise DownloadError(f"--download: {url} answered HTTP {e.code} {e.reason}; {_by_hand(remote, data_dir)}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(
            f"--download: cannot reach {url} ({reason}): no network?; rerun with --download when online, or "
            f"{_by_hand(remote, data_dir)}"
        ) from e
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            log(f"--download: the server ignored the resume request; fetching {remote.archive} from the start")
            offset = 0
        total = _announced_total(response, offset)
        if total is not None and total != remote.size:
            raise DownloadError(
                f"--download: {url} is {total} bytes, not the pinned {remote.size}: refused (the file changed "
                f"upstream or this is not it); {_by_hand(remote, data_dir)}"
            )
        log(f"--download: {'resuming' if resumed else 'fetching'} {url} "
            f"({_mib(remote.size)}{f', from {_mib(offset)}' if resumed else ''})")
        _copy_with_progress(response, part, offset, remote, url, log)


def _announced_total(response, offset: int) -> int | None:
    """The whole file's size as the server states it (Content-Range of a 206, else Content-Length)."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + (offset if response.status == 206 else 0)


def _copy_with_progress(
    response, part: str, offset: int, remote: RemoteFile, url: str, log: Callable[[str], None]
) -> None:
    """Appends the response body to `part`, a progress line every 5 s; an interrupted transfer keeps `part`."""
    done, last_logged = offset, time.monotonic()
    with open(part, "ab" if offset else "wb") as out:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
                out.close()
                _interrupted(remote, url, part, e)
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as e:
                raise OSError(f"--download: cannot write {part} ({e.strerror or e})") from e
            done += len(chunk)
            if time.monotonic() - last_logged >= 5:
                log(f"--download: {remote.archive} {_mib(done)} of {_mib(remote.size)} "
                    f"({100 * done / remote.size:.0f}%)")
                last_logged = time.monotonic()
    if done < remote.size:
        _interrupted(remote, url, part, None)
    log(f"--download: {remote.archive} {_mib(done)} received")


def _interrupted(remote: RemoteFile, url: str, part: str, cause: BaseException | None) -> None:
    got = os.path.getsize(part) if os.path.exists(part) else 0
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    raise DownloadError(
        f"--download: the transfer of {url} stopped at {got} of {remote.size} bytes{why}; {part} is kept: "
        "rerun with --download to resume it"
    ) from cause


def _verify(remote: RemoteFile, part: str) -> None:
    """Raises DownloadError (and deletes `part`) unless its size and SHA-256 are the pinned ones."""
    size = os.path.getsize(part)
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if size == remote.size and digest.hexdigest() == remote.sha256:
        return
    os.remove(part)
    raise DownloadError(
        f"--download: {remote.archive} refused: {size} bytes with sha256 {digest.hexdigest()}, expected "
        f"{remote.size} bytes with sha256 {remote.sha256} (pinned from {remote.pin_source}); the partial file "
        f"was deleted, nothing was unpacked"
    )


def _decompress_lzma(archive: str, target: str) -> None:
    tmp = target + ".tmp"
    try:
        with lzma.open(archive, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, lzma.LZMAError):
            raise DownloadError(f"--download: {archive} passed its checksum but is not LZMA data ({e})") from e
        raise
    os.replace(tmp, target)


def _unpack_tar(archive: str, data_dir: str, folder: str) -> None:
    """Unpacks `folder/` from the tar.gz `archive` into `data_dir` (members elsewhere are refused).

    An existing, incomplete `data_dir/folder` only gains the files it lacks: nothing there is overwritten.
    """
    tmp = os.path.join(data_dir, f".{folder}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            outside = [m.name for m in members if m.name != folder and not m.name.startswith(folder + "/")]
            if outside:
                raise DownloadError(f"--download: {archive} holds {outside[0]!r}, outside {folder}/: refused")
            tar.extractall(tmp, members=members, filter="data")
        final = os.path.join(data_dir, folder)
        if not os.path.exists(final):
            os.replace(os.path.join(tmp, folder), final)
        else:
            for name in os.listdir(os.path.join(tmp, folder)):
                if not os.path.exists(os.path.join(final, name)):
                    os.replace(os.path.join(tmp, folder, name), os.path.join(final, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
