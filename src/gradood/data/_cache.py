"""The user cache directory, sha256 helpers and atomic file writes.

Everything gradood downloads or derives lives under one folder: ``$GRADOOD_CACHE`` when set, else
``~/.cache/gradood`` (``$XDG_CACHE_HOME/gradood`` when that is set). Files enter the cache only by an atomic
rename of a complete, verified temporary file, so an interrupted download never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ChecksumError

CACHE_ENV = "GRADOOD_CACHE"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; cached and saved files get the usual permissions instead.
_FILE_MODE = 0o666 & ~_current_umask()


def cache_dir() -> Path:
    """The root of gradood's cache (created on first use)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "gradood"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_path(*parts: str) -> Path:
    """A path inside the cache; its parent folder is created."""
    p = cache_dir().joinpath(*parts)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory for large files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def checksum_error(path: Path, expected: str, actual: str, fix: str, removed: bool) -> ChecksumError:
    """A :class:`ChecksumError` that names the file, both hashes and what to do."""
    state = "It was deleted and not used." if removed else "It was not used."
    return ChecksumError(
        f"sha256 mismatch for {path.name} ({path}): expected {expected}, got {actual}. {state} {fix}"
    )


def verify_sha256(path: Path, expected: str | None, *, fix: str, remove_on_mismatch: bool = True,
                  display: Path | None = None) -> Path:
    """Check ``path`` against ``expected`` (no check when ``expected`` is None); on mismatch delete it
    (when allowed: never for files gradood does not own) and raise :class:`ChecksumError`.

    ``display`` is the path named in the error when ``path`` is a temporary file on its way to it."""
    if expected is None:
        return path
    actual = sha256_file(path)
    if actual != expected.lower():
        if remove_on_mismatch:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise checksum_error(display or path, expected, actual, fix, removed=remove_on_mismatch)
    return path


@contextlib.contextmanager
def atomic_target(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest`` atomically, on any
    error it is removed. Readers therefore see either no file or a complete one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def cached_arrays(key: str, build: Callable[[], dict[str, np.ndarray]], *, built_from: dict[str, str]
                  ) -> dict[str, np.ndarray]:
    """Arrays derived from verified source files, stored once as ``arrays/<key>.npz``.

    ``built_from`` (e.g. the sha256 of the source files) is recorded in a JSON sidecar with the npz's own
    sha256; a cached npz is used only when both match, and it is read with ``allow_pickle=False``. This is
    how pickled sources are unpickled once and never again. A stale or corrupt npz is rebuilt.
    """
    npz = cache_path("arrays", f"{key}.npz")
    meta_path = npz.with_suffix(".json")
    if npz.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("built_from") == built_from and meta.get("sha256") == sha256_file(npz):
            with np.load(npz, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    arrays = build()
    with atomic_target(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        digest = sha256_file(tmp)
    with atomic_target(meta_path) as tmp:
        tmp.write_text(json.dumps({"sha256": digest, "built_from": built_from}, indent=1))
    return arrays
