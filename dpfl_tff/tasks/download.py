"""`--download`: fetch the data files of emnist, cifar100, cifar10, shakespeare and stackoverflow, verified.

Only called when `--download` is given (`plan.prepare`); without it nothing
is ever fetched (the loaders stop with `DataMissingError` instead).

Each file comes from its canonical public location (the URLs TFF 0.87's and
Keras' own loaders use) and lands in the layout the loaders read:

  emnist    emnist_all.sqlite.lzma  -> LZMA-decompressed to --data_dir/emnist_all.sqlite
  cifar100  cifar100.sqlite.lzma    -> LZMA-decompressed to --data_dir/cifar100.sqlite
  cifar10   cifar-10-python.tar.gz  -> unpacked to --data_dir/cifar-10-batches-py/
  shakespeare  shakespeare.sqlite.lzma -> LZMA-decompressed to --data_dir/shakespeare.sqlite
  stackoverflow  stackoverflow.word_count.tar.bz2 -> its stackoverflow.word_count to --data_dir/, and
                 stackoverflow.sqlite.lzma -> LZMA-decompressed to --data_dir/stackoverflow.sqlite

stackoverflow.sqlite.lzma has no public size or hash pin: its content is
verified instead (`verify_stackoverflow`: TFF's schema, and the clients and
examples per split of `client_metadata` equal TFF's documented counts; the
rows themselves are checked against `client_metadata` when the task first
indexes the file); the download says so, and a file that fails is deleted.

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
    size: int | None  # None: no public pin (then `verify` checks the content)
    sha256: str | None
    pin_source: str
    target: str
    unpack: str
    verify: str = ""  # name of a content check of the unpacked target (`CONTENT_CHECKS`)


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
    "shakespeare": RemoteFile(
        url="https://storage.googleapis.com/tff-datasets-public/shakespeare.sqlite.lzma",
        archive="shakespeare.sqlite.lzma",
        size=1_329_828,
        sha256="d3d11fceb9e105439ac6f4d52af6efafed5a2a1e1eb24c5bd2dd54ced242f5c4",
        pin_source="FedJAX's download test of this TFF file (TFF pins none)",
        target="shakespeare.sqlite",
        unpack="lzma",
    ),
    "stackoverflow_word_count": RemoteFile(
        url="https://storage.googleapis.com/tff-datasets-public/stackoverflow.word_count.tar.bz2",
        archive="stackoverflow.word_count.tar.bz2",
        size=None,
        sha256="1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c",
        pin_source="TFF 0.87's simulation/datasets/stackoverflow.py load_word_counts (file_hash)",
        target="stackoverflow.word_count",
        unpack="tar.bz2",
    ),
    "stackoverflow": RemoteFile(
        url="https://storage.googleapis.com/tff-datasets-public/stackoverflow.sqlite.lzma",
        archive="stackoverflow.sqlite.lzma",
        size=None,
        sha256=None,
        pin_source="no public pin: content verified against TFF's documented counts",
        target="stackoverflow.sqlite",
        unpack="lzma",
        verify="stackoverflow",
    ),
}
# The files of a task, fetched in this order (default: the file named like the task).
TASK_FILES = {"stackoverflow": ("stackoverflow_word_count", "stackoverflow")}
# TFF 0.87's stackoverflow.load_data docstring: (clients, examples) per split of stackoverflow.sqlite.
STACKOVERFLOW_COUNTS = {"train": (342_477, 135_818_730), "heldout": (38_758, 16_491_230),
                        "test": (204_088, 16_586_035)}


def url_of(remote: RemoteFile) -> str:
    return remote.url if BASE_URL_OVERRIDE is None else f"{BASE_URL_OVERRIDE.rstrip('/')}/{remote.archive}"


def ensure_task_files(task: str, data_dir: str, log: Callable[[str], None]) -> None:
    """Makes the files `task` reads exist in `data_dir`, downloading and verifying them if missing.

    Raises:
      DownloadError: offline, HTTP error, interrupted transfer (the `.part` is
        kept for resuming), or a size/checksum mismatch (the file is refused).
      OSError: --data_dir cannot be created or written, e.g. a full disk.
    """
    names = TASK_FILES.get(task, (task,))
    if not all(n in REMOTE_FILES for n in names):
        parts = {n for names_ in TASK_FILES.values() for n in names_ if n not in TASK_FILES}
        have = ", ".join(n for n in REMOTE_FILES if n not in parts)
        log(f"--download: only {have} have files to download; nothing fetched for --task={task}")
        return
    for name in names:
        _ensure_file(REMOTE_FILES[name], data_dir, log)


def _ensure_file(remote: RemoteFile, data_dir: str, log: Callable[[str], None]) -> None:
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
        _decompress_lzma(archive, target, remote.verify, log)
    elif remote.unpack == "tar.bz2":
        _unpack_file_from_tar(archive, data_dir, remote.target)
    else:
        _unpack_tar(archive, data_dir, remote.target)
    os.remove(archive)
    log(f"--download: {target} ready")


def _target_complete(remote: RemoteFile, target: str) -> bool:
    if remote.unpack in ("lzma", "tar.bz2"):
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
    if not os.path.exists(part) or remote.size is None or os.path.getsize(part) != remote.size:
        _fetch_to_part(remote, part, log)  # no size pin: resumed (a complete part gets HTTP 416)
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
    if remote.size is not None and offset > remote.size:
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
        if total is not None and remote.size is not None and total != remote.size:
            raise DownloadError(
                f"--download: {url} is {total} bytes, not the pinned {remote.size}: refused (the file changed "
                f"upstream or this is not it); {_by_hand(remote, data_dir)}"
            )
        log(f"--download: {'resuming' if resumed else 'fetching'} {url} "
            f"({_mib(remote.size or total)}{f', from {_mib(offset)}' if resumed else ''})"
            + ("" if remote.size else f"; no public size or hash pin for {remote.archive}: "
               + ("its content is verified after unpacking" if remote.verify else "its SHA-256 is checked")))
        _copy_with_progress(response, part, offset, remote, url, log, remote.size or total)


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
    response, part: str, offset: int, remote: RemoteFile, url: str, log: Callable[[str], None],
    expected: int | None = None,
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
                log(f"--download: {remote.archive} {_mib(done)}"
                    + (f" of {_mib(expected)} ({100 * done / expected:.0f}%)" if expected else ""))
                last_logged = time.monotonic()
    if expected is not None and done < expected:
        _interrupted(remote, url, part, None)
    log(f"--download: {remote.archive} {_mib(done)} received")


def _interrupted(remote: RemoteFile, url: str, part: str, cause: BaseException | None) -> None:
    got = os.path.getsize(part) if os.path.exists(part) else 0
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    raise DownloadError(
        f"--download: the transfer of {url} stopped at {got} of {remote.size or 'the announced'} bytes{why}; "
        f"{part} is kept: "
        "rerun with --download to resume it"
    ) from cause


def _verify(remote: RemoteFile, part: str) -> None:
    """Raises DownloadError (and deletes `part`) unless its size and SHA-256 are the pinned ones."""
    size = os.path.getsize(part)
    if remote.sha256 is None:
        return  # no pin: the content is verified after unpacking (`remote.verify`)
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if remote.size in (None, size) and digest.hexdigest() == remote.sha256:
        return
    os.remove(part)
    raise DownloadError(
        f"--download: {remote.archive} refused: {size} bytes with sha256 {digest.hexdigest()}, expected "
        f"{remote.size or 'any number of'} bytes with sha256 {remote.sha256} (pinned from {remote.pin_source}); the partial file "
        f"was deleted, nothing was unpacked"
    )


def _decompress_lzma(archive: str, target: str, verify: str = "", log: Callable[[str], None] = print) -> None:
    tmp = target + ".tmp"
    try:
        with lzma.open(archive, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        if verify:
            CONTENT_CHECKS[verify](tmp, log)
    except BaseException as e:
        if isinstance(e, DownloadError) and os.path.exists(archive):
            os.remove(archive)  # refused content: fetched again from scratch next time
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


def _unpack_file_from_tar(archive: str, data_dir: str, name: str) -> None:
    """Extracts the regular file `name` (at the top or anywhere in the tar.bz2) to `data_dir/name`."""
    tmp = os.path.join(data_dir, f".{name}.unpacking")
    try:
        with tarfile.open(archive, "r:bz2") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and os.path.basename(m.name) == name), None)
            if member is None:
                raise DownloadError(f"--download: {archive} holds no {name}: refused")
            with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        os.replace(tmp, os.path.join(data_dir, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_stackoverflow(path: str, log: Callable[[str], None]) -> None:
    """Raises DownloadError unless `path` has TFF's schema and `STACKOVERFLOW_COUNTS` clients and examples per split.

    There is no public size or hash pin of stackoverflow.sqlite.lzma; the
    per-client rows are checked against `client_metadata` when the task indexes the file.
    """
    import sqlite3

    from dpfl_tff.tasks import sqlite_stream

    name = os.path.basename(path).removesuffix(".tmp")
    try:
        sqlite_stream.check_file(path, "expected TFF's Stack Overflow file")
        con = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        try:
            found = {s: (int(c), int(n or 0)) for s, c, n in con.execute(
                "SELECT split_name, count(DISTINCT client_id), sum(num_examples) FROM client_metadata GROUP BY split_name")}
        finally:
            con.close()
    except Exception as e:  # noqa: BLE001  (any unreadable content is a refusal)
        raise DownloadError(f"--download: {name} refused: {e}; the file was deleted") from e
    if found != STACKOVERFLOW_COUNTS:
        raise DownloadError(
            f"--download: {name} refused: (clients, examples) per split {found}, TFF documents "
            f"{STACKOVERFLOW_COUNTS} (no public hash pins this file, so its content is checked); the file was deleted")
    log(f"--download: {name} has no public size or hash pin; its content was verified instead: TFF's schema and "
        + ", ".join(f"{s} {c:,} clients / {n:,} examples" for s, (c, n) in STACKOVERFLOW_COUNTS.items())
        + " as TFF documents (each client's rows are checked when the task first indexes the file)")


CONTENT_CHECKS: dict[str, Callable[[str, Callable[[str], None]], None]] = {"stackoverflow": verify_stackoverflow}


def _mib(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 2**20:.1f} MiB"
