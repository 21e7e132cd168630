"""--download against a loopback HTTP server serving tiny files in the real formats (tests/data_fixtures.py).

The server (127.0.0.1, an OS-chosen port) serves the tiny EMNIST and CIFAR-100 SQLite files LZMA-compressed and
the tiny CIFAR-10 batches as a tar.gz, honours Range requests and logs every request; the pinned sizes and
SHA-256s are those of the tiny files (`_pin`). Nothing here reaches beyond 127.0.0.1.
"""

import dataclasses
import hashlib
import http.server
import io
import lzma
import os
import socket
import tarfile
import threading

import pytest

from dpfl_tff.errors import DataMissingError, DownloadError
from dpfl_tff.tasks import download, load_task
from dpfl_tff.config import TaskConfig
from tests.conftest import run_driver
from tests.data_fixtures import write_cifar10_batches, write_cifar100_sqlite, write_emnist_sqlite


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_error(416)
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = srv.cut_after.pop(0) if srv.cut_after else None  # send only this many bytes, then hang up
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """{archive name: bytes} of the tiny files, as the real servers hold them."""
    src = tmp_path_factory.mktemp("src")
    out = {}
    for write, name in ((write_emnist_sqlite, "emnist_all.sqlite"), (write_cifar100_sqlite, "cifar100.sqlite")):
        path = write(str(src), num_clients=3, examples_per_client=4)
        out[name + ".lzma"] = lzma.compress(open(path, "rb").read())
    write_cifar10_batches(str(src), examples_per_batch=6)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(src, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    out["cifar-10-python.tar.gz"] = buf.getvalue()
    return out


@pytest.fixture()
def server(archives, monkeypatch):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.honour_range, srv.cut_after = dict(archives), [], True, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setattr(download, "BASE_URL_OVERRIDE", f"http://127.0.0.1:{srv.server_address[1]}")
    for task, remote in download.REMOTE_FILES.items():  # pin the tiny files, as the real ones are pinned
        body = archives.get(remote.archive)
        if body is not None and remote.sha256 is not None:  # stackoverflow.sqlite has no pin (test_text_download.py)
            monkeypatch.setitem(download.REMOTE_FILES, task, dataclasses.replace(
                remote, size=None if remote.size is None else len(body), sha256=hashlib.sha256(body).hexdigest()))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _lines():
    out = []
    return out, out.append


@pytest.mark.parametrize("task", ["emnist", "cifar100", "cifar10"])
def test_fetch_verify_unpack_then_the_loader_reads_it(server, tmp_path, task):
    lines, log = _lines()
    download.ensure_task_files(task, str(tmp_path), log)
    remote = download.REMOTE_FILES[task]
    assert server.log == [(f"/{remote.archive}", None)]
    assert os.path.exists(tmp_path / remote.target) and os.listdir(tmp_path) == [remote.target]  # archive removed
    assert any("fetching" in s for s in lines) and lines[-1].endswith("ready")
    data = load_task(TaskConfig(task=task, data_dir=str(tmp_path), num_clients=3), seed=0)
    assert data.num_clients == 3 and len(data.test) > 0
    download.ensure_task_files(task, str(tmp_path), log)  # there now: not fetched again
    assert len(server.log) == 1 and "already there" in lines[-1]


def test_driver_dry_run_downloads_and_checks(server, tmp_path, capsys):
    """--download is wired through the driver: --dry_run fetches, loads the data and builds the model."""
    code = run_driver(["--task=emnist", f"--data_dir={tmp_path / 'data'}", "--download", "--model=logistic",
                       "--clients_per_round=2", "--rounds=1", "--dry_run", f"--output_dir={tmp_path / 'run'}"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "--download: fetching http://127.0.0.1:" in printed and "emnist_all.sqlite ready" in printed
    assert "N = 3 clients" in printed and os.path.isfile(tmp_path / "data" / "emnist_all.sqlite")


def test_corrupted_file_is_refused(server, tmp_path, capsys):
    body = bytearray(server.files["emnist_all.sqlite.lzma"])
    body[100] ^= 0xFF  # same size, one byte differs
    server.files["emnist_all.sqlite.lzma"] = bytes(body)
    code = run_driver(["--task=emnist", f"--data_dir={tmp_path}", "--download", f"--output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: --download: emnist_all.sqlite.lzma refused: ") and "expected" in err
    assert "the partial file was deleted, nothing was unpacked" in err
    assert os.listdir(tmp_path) == ["run"] or os.listdir(tmp_path) == []  # no .part, no sqlite


def test_wrong_announced_size_is_refused_before_downloading(server, tmp_path):
    server.files["cifar100.sqlite.lzma"] += b"x"
    with pytest.raises(DownloadError, match=r"is \d+ bytes, not the pinned \d+: refused"):
        download.ensure_task_files("cifar100", str(tmp_path), lambda s: None)
    assert not os.path.exists(tmp_path / "cifar100.sqlite.lzma.part")


def test_interrupted_download_keeps_the_part_and_resumes_with_range(server, tmp_path):
    size = len(server.files["emnist_all.sqlite.lzma"])
    server.cut_after = [size // 3]  # the first response hangs up after a third
    with pytest.raises(DownloadError, match=r"stopped at \d+ of \d+ bytes.*kept: rerun with --download to resume"):
        download.ensure_task_files("emnist", str(tmp_path), lambda s: None)
    part = tmp_path / "emnist_all.sqlite.lzma.part"
    assert os.path.getsize(part) == size // 3
    lines, log = _lines()
    download.ensure_task_files("emnist", str(tmp_path), log)
    assert server.log[-1] == ("/emnist_all.sqlite.lzma", f"bytes={size // 3}-")
    assert any(s.startswith("--download: resuming") for s in lines)
    assert os.listdir(tmp_path) == ["emnist_all.sqlite"]
    assert load_task(TaskConfig(task="emnist", data_dir=str(tmp_path)), seed=0).num_clients == 3


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    body = server.files["cifar100.sqlite.lzma"]
    (tmp_path / "cifar100.sqlite.lzma.part").write_bytes(body[:50])
    server.honour_range = False
    lines, log = _lines()
    download.ensure_task_files("cifar100", str(tmp_path), log)
    assert server.log == [("/cifar100.sqlite.lzma", "bytes=50-")]
    assert any("ignored the resume request" in s for s in lines)
    assert os.listdir(tmp_path) == ["cifar100.sqlite"]


def test_tar_member_outside_the_folder_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    body = buf.getvalue()
    server.files["cifar-10-python.tar.gz"] = body
    download.REMOTE_FILES["cifar10"] = dataclasses.replace(  # restored by the fixture's monkeypatch
        download.REMOTE_FILES["cifar10"], size=len(body), sha256=hashlib.sha256(body).hexdigest())
    with pytest.raises(DownloadError, match=r"holds '\.\./evil', outside cifar-10-batches-py/: refused"):
        download.ensure_task_files("cifar10", str(tmp_path), lambda s: None)
    assert not os.path.exists(tmp_path.parent / "evil") and not os.path.exists(tmp_path / "cifar-10-batches-py")


def test_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(download, "BASE_URL_OVERRIDE", f"http://127.0.0.1:{port}")
    code = run_driver(["--task=cifar10", f"--data_dir={tmp_path}", "--download", f"--output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([e for e in err if e.startswith("error:")]) == 1
    assert err[-1].startswith(f"error: --download: cannot reach http://127.0.0.1:{port}/cifar-10-python.tar.gz (")
    assert "to place it by hand, fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err[-1]


@pytest.mark.parametrize("task", ["emnist", "cifar100", "cifar10"])
def test_without_download_nothing_is_fetched(tmp_path, monkeypatch, capsys, task):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network used without --download: {args}")

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataMissingError, match="rerun with --download to fetch it"):
        load_task(TaskConfig(task=task, data_dir=str(tmp_path)), seed=0)
    assert run_driver([f"--task={task}", f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'run'}"]) == 2
    assert "rerun with --download" in capsys.readouterr().err
    assert os.listdir(tmp_path) in ([], ["run"])


def test_archive_placed_by_hand_is_verified_and_unpacked_without_fetching(server, archives, tmp_path):
    (tmp_path / "cifar100.sqlite.lzma").write_bytes(archives["cifar100.sqlite.lzma"])
    download.ensure_task_files("cifar100", str(tmp_path), lambda s: None)
    assert server.log == [] and os.listdir(tmp_path) == ["cifar100.sqlite"]


def test_incomplete_cifar10_folder_only_gains_missing_files(server, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"the user's own file")
    download.ensure_task_files("cifar10", str(tmp_path), lambda s: None)
    assert (folder / "data_batch_1").read_bytes() == b"the user's own file"  # not overwritten
    assert {"data_batch_2", "data_batch_5", "test_batch", "batches.meta"} <= set(os.listdir(folder))


def test_download_does_not_block_resuming():
    """A run may resume with or without --download, also a run whose hparams.json predates the flag."""
    from dpfl_tff.config import ExperimentConfig
    from dpfl_tff.outputs import hparam_differences

    new = ExperimentConfig(task=TaskConfig(task="emnist", download=True)).to_dict()
    old = ExperimentConfig(task=TaskConfig(task="emnist")).to_dict()
    del old["task"]["download"]
    assert hparam_differences(old, new) == []
    assert hparam_differences(old, ExperimentConfig(task=TaskConfig(task="cifar10")).to_dict()) != []
