"""--download of the text tasks' files from a local server: the pinned Shakespeare and word-count archives, and
stackoverflow.sqlite.lzma (no public pin) verified by content."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import lzma
import os
import tarfile
import threading

import pytest

from dpfl_tff.config import TaskConfig
from dpfl_tff.errors import DownloadError
from dpfl_tff.tasks import download, load_task
from tests.data_fixtures import write_shakespeare_sqlite, write_stackoverflow_sqlite
from tests.test_download import _Handler


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    out = {"shakespeare.sqlite.lzma": lzma.compress(open(write_shakespeare_sqlite(str(src)), "rb").read()),
           "stackoverflow.sqlite.lzma": lzma.compress(open(write_stackoverflow_sqlite(str(src)), "rb").read())}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        tar.add(os.path.join(src, "stackoverflow.word_count"), arcname="stackoverflow.word_count")
    out["stackoverflow.word_count.tar.bz2"] = buf.getvalue()
    return out


@pytest.fixture()
def server(archives, monkeypatch):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.honour_range, srv.cut_after = dict(archives), [], True, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setattr(download, "BASE_URL_OVERRIDE", f"http://127.0.0.1:{srv.server_address[1]}")
    for name in ("shakespeare", "stackoverflow_word_count"):  # pin the tiny files, as the real ones are pinned
        body, remote = archives[download.REMOTE_FILES[name].archive], download.REMOTE_FILES[name]
        monkeypatch.setitem(download.REMOTE_FILES, name, dataclasses.replace(
            remote, size=None if remote.size is None else len(body), sha256=hashlib.sha256(body).hexdigest()))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_pins_are_the_published_ones():
    files = download.REMOTE_FILES
    assert (files["shakespeare"].size, files["shakespeare"].sha256) == (
        1_329_828, "d3d11fceb9e105439ac6f4d52af6efafed5a2a1e1eb24c5bd2dd54ced242f5c4")
    assert files["stackoverflow_word_count"].sha256 == "1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c"
    assert files["stackoverflow"].sha256 is None and files["stackoverflow"].verify == "stackoverflow"
    assert download.STACKOVERFLOW_COUNTS["train"] == (342_477, 135_818_730)


def test_shakespeare_is_fetched_verified_and_read(server, tmp_path):
    lines = []
    download.ensure_task_files("shakespeare", str(tmp_path), lines.append)
    assert os.listdir(tmp_path) == ["shakespeare.sqlite"] and lines[-1].endswith("ready")
    assert load_task(TaskConfig(task="shakespeare", data_dir=str(tmp_path)), 0).num_clients == 4


def test_stackoverflow_is_verified_by_content(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "STACKOVERFLOW_COUNTS", {"train": (4, 12), "test": (3, 9), "heldout": (1, 1)})
    lines = []
    download.ensure_task_files("stackoverflow", str(tmp_path), lines.append)
    assert sorted(os.listdir(tmp_path)) == ["stackoverflow.sqlite", "stackoverflow.word_count"]
    assert any("no public size or hash pin for stackoverflow.sqlite.lzma: its content is verified" in s for s in lines)
    assert any("its content was verified instead: TFF's schema and train 4 clients / 12 examples" in s for s in lines)
    assert load_task(TaskConfig(task="stackoverflow", data_dir=str(tmp_path)), 0).num_clients == 4


def test_stackoverflow_with_other_counts_is_refused_and_deleted(server, tmp_path):
    with pytest.raises(DownloadError, match=r"stackoverflow.sqlite refused: \(clients, examples\) per split .*TFF "
                                            r"documents .*342477, 135818730"):
        download.ensure_task_files("stackoverflow", str(tmp_path), lambda _: None)
    assert os.listdir(tmp_path) == ["stackoverflow.word_count"]  # nothing of the refused file is left
