"""The content-addressed cache behind ``probe.signals(data, cache_dir=...)`` and ``gradood bench``.

What a cached array is stored under (its *key*) and what a read checks:

* **data**: a hash (XXH3-128, or sha256 without ``xxhash``) of every input batch as it streams (dtype, shape
  and bytes of the inputs and of the labels), so other data, another order or another batch size is another key;
* **model**: a hash of every parameter and buffer (names, dtypes, shapes, values), the class of every submodule
  and the source files that define those classes, the torch version, the device type and the parameter dtype;
* **probe**: the head as asked for (a name, or "auto" when the probe finds it), ``input_std`` and ``input_mean``;
* **code**: the source of the module that defines the signal's :class:`~gradood.signals.Request` class, of every
  gradood module it imports at module level or inside the class (transitively), and of the modules every signal
  goes through (``signals.py``, ``probe.py``, ``_batches.py``, ``cache.py``, the ``grads`` package);
* **request**: the request's own key (its parameters).

A key that differs in any part is a miss: the signal is computed and stored under the new key, and a warning
says once which parts differ from what the folder holds. Every file is written atomically, followed by a
sidecar ``<file>.sha256`` (JSON: sha256, size, key) that is checked on every read; a file whose sidecar is
missing, unreadable or disagrees with its bytes is named in a :class:`CacheWarning`, deleted and recomputed.

What it does not promise: that code outside the files listed above (e.g. a helper module of your own that a
model's ``forward`` imports, or a different BLAS / thread count) leaves the numbers unchanged.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

#: Files (relative to the gradood package) that every cached signal depends on, whatever computes it.
BASE_SIGNAL_SOURCES = ("signals.py", "probe.py", "_batches.py", "cache.py", "grads")

SIDECAR = ".sha256"
_ROOT = Path(__file__).resolve().parent


def new_hash(prefix: bytes) -> Any:
    """A running hash for content keys (data, weights): xxHash's XXH3-128 when the ``xxhash`` package is there
    (about 25 GB/s, so hashing every input batch costs little next to a forward pass), else sha256 (~1 GB/s).
    The two give digests of different lengths, so keys made with one are never taken for keys of the other.
    Files' checksums are always sha256."""
    try:
        import xxhash
    except ImportError:  # pragma: no cover - xxhash is a dependency; a bare environment still works
        return hashlib.sha256(prefix)
    return xxhash.xxh3_128(prefix)


class CacheWarning(UserWarning):
    """A cached file was unusable (corrupt, truncated, without checksum) or the cache holds other keys."""


# ---------------------------------------------------------------------------------------------- hashing
def update_tensor(h: Any, t: torch.Tensor | np.ndarray | None) -> None:
    """Feed a tensor's dtype, shape and bytes (no copy for contiguous CPU tensors) into ``h``."""
    if t is None:
        h.update(b"none;")
        return
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


class DataHasher:
    """Running hash (:func:`new_hash`) of a stream of ``(inputs, labels)`` batches; ``digest()`` at any point is the key of the
    batches seen so far (used both for the final key and to check the prefix a resumed extraction skips)."""

    def __init__(self) -> None:
        self._h = new_hash(b"gradood-data-v1;")

    def update(self, x: torch.Tensor | Mapping[str, torch.Tensor], y: torch.Tensor | None) -> None:
        if isinstance(x, Mapping):  # keyword inputs (e.g. input_ids, attention_mask)
            for k in sorted(x):
                self._h.update(f"{k}=".encode())
                update_tensor(self._h, x[k])
        else:
            update_tensor(self._h, x)
        update_tensor(self._h, y)

    def digest(self) -> str:
        return self._h.copy().hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash (16 hex digits, :func:`new_hash`) of a model: parameters and buffers (names, dtypes, shapes, values), the class of
    every submodule and the source of the files defining them, the torch version, device type and dtype."""
    h = new_hash(f"gradood-model-v1;torch={torch.__version__};".encode())
    for name, t in list(model.named_parameters()) + [(f"buffer:{n}", b) for n, b in model.named_buffers()]:
        h.update(f"{name}|{t.device.type}|".encode())
        update_tensor(h, t)
    classes = sorted({(type(m).__module__, type(m).__qualname__) for m in model.modules()})
    for module_name, qualname in classes:
        h.update(f"class {module_name}.{qualname};".encode())
    for f in sorted({_class_file(m) for m, _ in classes} - {None}):
        h.update(f"{f}={source_digest(f)};".encode())
    return h.hexdigest()[:16]


def _class_file(module_name: str) -> Path | None:
    mod = sys.modules.get(module_name)
    f = getattr(mod, "__file__", None)
    return Path(f).resolve() if f and f.endswith(".py") and os.path.exists(f) else None


def read_source(path: Path) -> bytes:
    """The bytes of a source file (one place, so a test can stand in for an edited file)."""
    return Path(path).read_bytes()


#: sha256 of each source file as first read by this process: the code a process runs is the code it imported,
#: so a file edited while it runs does not change its keys half-way
_SOURCE_DIGESTS: dict[Path, str] = {}


def source_digest(path: Path) -> str:
    d = _SOURCE_DIGESTS.get(path)
    if d is None:
        d = _SOURCE_DIGESTS[path] = hashlib.sha256(read_source(path)).hexdigest()
    return d


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    f = getattr(mod, "__file__", None)
    if f is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        f = None if spec is None else spec.origin
    return Path(f).resolve() if f and str(f).endswith(".py") and os.path.exists(f) else None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Absolute module names an import statement refers to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        parts = importer.split(".")
        base_parts = parts if is_pkg else parts[:-1]
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts)
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    # ``from pkg import sub`` may import a submodule: keep both, unknown names are dropped later
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports(tree: ast.AST, module_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of a module: at module level (including ``if``/``try`` blocks there) or anywhere."""
    if not module_level_only:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out: list[ast.Import | ast.ImportFrom] = []
    todo = list(getattr(tree, "body", []))
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.append(n)
        elif isinstance(n, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo += getattr(n, field, []) or []
        elif isinstance(n, ast.ExceptHandler):
            todo += n.body
    return out


@functools.lru_cache(maxsize=None)
def _closure(module_name: str, class_name: str | None = None) -> tuple[Path, ...]:
    """Source files of ``module_name`` and of every module of the same top-level package or of gradood that it
    imports at module level -- or anywhere inside class ``class_name`` -- transitively. Lazy imports in other
    functions are not followed (e.g. the detector registry importing every detector)."""
    roots = {module_name.split(".")[0], "gradood"}
    seen: dict[str, Path] = {}
    todo: list[tuple[str, str | None]] = [(module_name, class_name)]
    while todo:
        name, cls = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        try:
            tree = ast.parse(read_source(path))
        except (SyntaxError, ValueError):
            continue
        nodes = _imports(tree, module_level_only=True)
        if cls is not None:
            for c in getattr(tree, "body", []):
                if isinstance(c, ast.ClassDef) and c.name == cls:
                    nodes += _imports(c, module_level_only=False)
        for node in nodes:
            for target in _resolve(name, _is_package(path), node):
                if target.split(".")[0] in roots and target not in seen:
                    todo.append((target, None))
                    # a submodule import runs its packages' __init__ first
                    parent = target.rsplit(".", 1)[0]
                    if parent != target and parent.split(".")[0] in roots:
                        todo.append((parent, None))
    return tuple(sorted(set(seen.values())))


def _base_files() -> tuple[Path, ...]:
    files: list[Path] = []
    for part in BASE_SIGNAL_SOURCES:
        p = _ROOT / part
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return tuple(files)


def code_files(request_cls: type) -> tuple[Path, ...]:
    """Every source file whose code decides what ``request_cls`` computes (see the module docstring)."""
    qual = request_cls.__qualname__.split(".")[0]
    return tuple(sorted(set(_base_files()) | set(_closure(request_cls.__module__, qual))))


def code_fingerprint(request_cls: type) -> str:
    """sha256 (16 hex digits) of the source files of :func:`code_files` (paths relative to their package)."""
    h = hashlib.sha256(b"gradood-code-v1;")
    for f in code_files(request_cls):
        h.update(f"{_display(f)}={source_digest(f)};".encode())
    if _module_file(request_cls.__module__) is None:  # defined in a notebook / __main__ without a file
        try:
            h.update(inspect.getsource(request_cls).encode())
        except (OSError, TypeError):
            h.update(f"{request_cls.__module__}.{request_cls.__qualname__}".encode())
    return h.hexdigest()[:16]


def _display(f: Path) -> str:
    try:
        return str(f.relative_to(_ROOT.parent))
    except ValueError:
        return f.name


def digest(obj: Any, n: int = 16) -> str:
    """sha256 (``n`` hex digits) of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def write_verified(path: Path, data: bytes, key: Mapping[str, Any] | None = None,
                   note: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` atomically, then its sidecar (sha256, size, key, and a ``note`` that is not part of the
    key, e.g. the data set's name): the sidecar marks the file complete."""
    atomic_write_bytes(path, data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "key": dict(key or {})}
    if note:
        meta["note"] = dict(note)
    atomic_write_bytes(sidecar(path), json.dumps(meta, sort_keys=True, indent=1).encode())


def read_key(path: Path, part: str = "key") -> dict[str, Any] | None:
    """The key (or ``part="note"``) recorded in a file's sidecar; None when it cannot be read (nothing is
    checked or deleted here)."""
    try:
        meta = json.loads(sidecar(path).read_bytes())
        return meta[part] if isinstance(meta, dict) and isinstance(meta.get(part), dict) else None
    except (OSError, ValueError):
        return None


def discard(path: Path, reason: str) -> None:
    """Delete a cached file and its sidecar after a failed check, saying so."""
    warnings.warn(f"cache file {path} {reason}: discarded it; it is recomputed.", CacheWarning, stacklevel=3)
    for p in (path, sidecar(path)):
        with contextlib.suppress(OSError):
            p.unlink()


def read_verified(path: Path) -> bytes | None:
    """The bytes of ``path`` if they match its sidecar; None when it is absent or failed the check (then it is
    named in a :class:`CacheWarning` and deleted)."""
    path = Path(path)
    if not path.exists():
        if sidecar(path).exists():
            discard(path, "is missing but its checksum file exists")
        return None
    try:
        meta = json.loads(sidecar(path).read_bytes())
        want, size = str(meta["sha256"]), int(meta["size"])
    except FileNotFoundError:
        discard(path, "has no checksum file (an interrupted write?)")
        return None
    except (OSError, ValueError, KeyError, TypeError):
        discard(path, f"has an unreadable checksum file {sidecar(path).name}")
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        discard(path, f"cannot be read ({e})")
        return None
    if len(data) != size:
        discard(path, f"has {len(data)} bytes instead of {size} (truncated or overwritten)")
        return None
    if hashlib.sha256(data).hexdigest() != want:
        discard(path, "does not match its sha256 (corrupted)")
        return None
    return data


def array_bytes(a: torch.Tensor | np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.numpy() if isinstance(a, torch.Tensor) else a, allow_pickle=False)
    return buf.getvalue()


def load_array(path: Path) -> torch.Tensor | None:
    """A verified ``.npy`` as a tensor, or None (absent or discarded)."""
    data = read_verified(path)
    if data is None:
        return None
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:  # written by a broken writer, yet checksummed
        discard(path, f"is not a valid .npy file ({e})")
        return None


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` with fixed member timestamps and order: the same arrays always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """A verified ``.npz`` as a dict of arrays, or None (absent or discarded)."""
    data = read_verified(path)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        discard(path, f"is not a valid .npz file ({e})")
        return None


def load_json(path: Path) -> Any | None:
    """A verified JSON file, or None (absent or discarded)."""
    data = read_verified(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        discard(path, f"is not valid JSON ({e})")
        return None


def differing_parts(want: Mapping[str, Any], found: Iterable[Mapping[str, Any]]) -> list[str]:
    """The key parts (data, model, code, ...) in which the closest of ``found`` differs from ``want``."""
    best: list[str] | None = None
    for key in found:
        diff = sorted(k for k in set(want) | set(key) if want.get(k) != key.get(k))
        if best is None or len(diff) < len(best):
            best = diff
    return best or []
