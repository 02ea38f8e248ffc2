"""Downloads against a local HTTP server: success, mirrors, bad MD5, dropped connections."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import socket
import struct
import threading

import numpy as np
import pytest

from torchgloro._errors import DatasetError
from torchgloro.data import _download, _idx, get_dataset
from torchgloro.data._download import fetch

GOOD = bytes(range(256)) * 400  # 100 KiB
GOOD_MD5 = hashlib.md5(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path.startswith("/drop/"):
            body = GOOD[: len(GOOD) // 3]
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        body = type(self).files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    handler = type("H", (_Handler,), {"files": {}, "hits": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    handler.files["/good.bin"] = GOOD
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_fetch_good(server, tmp_path):
    base, h = server
    dest = tmp_path / "sub" / "good.bin"
    out = fetch([f"{base}/good.bin"], dest, GOOD_MD5, timeout=5, progress=False)
    assert out == dest and dest.read_bytes() == GOOD
    assert [p.name for p in dest.parent.iterdir()] == ["good.bin"]


def test_fetch_falls_back_to_mirror(server, tmp_path):
    base, h = server
    dest = tmp_path / "good.bin"
    urls = [
        f"http://127.0.0.1:{_closed_port()}/good.bin",
        f"{base}/missing.bin",
        f"{base}/good.bin",
    ]
    fetch(urls, dest, GOOD_MD5, timeout=5, progress=False)
    assert dest.read_bytes() == GOOD


def test_fetch_wrong_md5_leaves_nothing(server, tmp_path):
    base, h = server
    dest = tmp_path / "good.bin"
    before = len(h.hits)
    with pytest.raises(DatasetError) as ei:
        fetch([f"{base}/good.bin"], dest, "0" * 32, timeout=5, progress=False)
    msg = str(ei.value)
    assert f"{base}/good.bin" in msg and "MD5 mismatch" in msg and str(dest) in msg
    assert len(h.hits) - before == 2  # tried, then retried once
    assert list(tmp_path.iterdir()) == []


def test_fetch_dropped_connection_leaves_nothing(server, tmp_path):
    base, h = server
    dest = tmp_path / "drop.bin"
    before = len(h.hits)
    urls = [f"{base}/drop/a.bin", f"{base}/drop/b.bin"]
    with pytest.raises(DatasetError) as ei:
        fetch(urls, dest, GOOD_MD5, timeout=5, progress=False)
    msg = str(ei.value)
    assert urls[0] in msg and urls[1] in msg and str(dest) in msg
    assert "connection closed after" in msg
    assert h.hits[before:] == ["/drop/a.bin"] * 2 + ["/drop/b.bin"] * 2
    assert list(tmp_path.iterdir()) == []


def test_fetch_keyboard_interrupt_cleans_up(server, tmp_path, monkeypatch):
    base, h = server

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(_download.os, "fsync", interrupt)
    before = len(h.hits)
    with pytest.raises(KeyboardInterrupt):
        fetch([f"{base}/good.bin"], tmp_path / "good.bin", GOOD_MD5, timeout=5, progress=False)
    assert len(h.hits) - before == 1  # no retry after Ctrl-C
    assert list(tmp_path.iterdir()) == []


def _idx_gz(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return gzip.compress(header + arr.tobytes())


def test_get_dataset_download_end_to_end(server, tmp_path, monkeypatch):
    base, h = server
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 6, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 2, dtype=np.uint8),
    }
    res = {}
    for role, r in _idx.RESOURCES["mnist"].items():
        blob = _idx_gz(arrays[role])
        h.files[f"/mnist/{r.filename}"] = blob
        res[role] = dataclasses.replace(
            r,
            md5=hashlib.md5(blob).hexdigest(),
            urls=(f"http://127.0.0.1:{_closed_port()}/x", f"{base}/mnist/{r.filename}"),
        )
    monkeypatch.setitem(_idx.RESOURCES, "mnist", res)
    monkeypatch.setattr(_download, "DEFAULT_TIMEOUT", 5.0)
    with pytest.raises(DatasetError, match="download=True"):
        get_dataset("mnist", "train", root=tmp_path)
    tr = get_dataset("mnist", "train", root=tmp_path, download=True)
    assert tr.x.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(tr.y.numpy(), arrays["train_labels"])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    # a second call finds the files and does not download again
    n = len(h.hits)
    get_dataset("mnist", "train", root=tmp_path, download=True)
    assert len(h.hits) == n
