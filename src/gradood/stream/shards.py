"""Signals on disk in fixed-size shards: extraction that never holds a dataset's signals in memory.

A shard folder holds, per shard, one ``.npy`` file per signal (and the labels), each written atomically with a
sha256 sidecar (:mod:`gradood.cache`), plus ``manifest.json`` listing the finished shards, the signals' keys and
the key of what produced them (model, code, probe settings, data). Reads are memory-mapped after the checksum is
verified, so a pass over 10^6 samples touches one shard at a time.

An interrupted extraction resumes after its last finished shard, after checking that the batches it skips hash
to what was recorded; a folder written by another model, other code or other data is never reused (it is
recomputed, with a warning naming what differs).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import cache as _cache
from ..errors import InputError
from ..signals import Request, Signals, compute_requests

MANIFEST = "manifest.json"
HEAD = "head.npz"
LABELS = "labels"


def _file_name(key: str) -> str:
    readable = "".join(c if c.isalnum() or c in "_.=-" else "_" for c in key)[:60]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npy"


def _verify_file(path: Path) -> None:
    """Check ``path`` against its sidecar by streaming it (no full copy in memory); raise InputError if bad."""
    try:
        meta = json.loads(_cache.sidecar(path).read_bytes())
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
                size += len(block)
    except (OSError, ValueError) as e:
        raise InputError(f"shard file {path} or its checksum cannot be read ({e}): re-extract this folder.") from e
    if size != int(meta.get("size", -1)) or h.hexdigest() != meta.get("sha256"):
        raise InputError(f"shard file {path} does not match its sha256 (corrupted or truncated): delete the folder "
                         "and re-extract.")


@dataclass
class ShardInfo:
    name: str
    rows: int
    end_batch: int
    data_prefix: str  # sha256 of the input batches up to end_batch


class ShardedSignals:
    """The signals of one dataset, on disk in shards. Iterate with :meth:`iter_signals` (one in-memory
    :class:`~gradood.signals.Signals` per shard) or read one signal's shards with :meth:`iter_arrays`."""

    def __init__(self, folder: str | Path, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        manifest = _cache.load_json(self.folder / MANIFEST)
        if not isinstance(manifest, dict) or not manifest.get("complete"):
            raise InputError(f"{self.folder} holds no finished shard extraction (no valid {MANIFEST}): run "
                             "gradood.stream.extract_to_shards into it first.")
        self.keys: list[str] = list(manifest["keys"])
        self.key: dict[str, Any] = dict(manifest["key"])
        self.shards = [ShardInfo(**s) for s in manifest["shards"]]
        self.has_labels: bool = bool(manifest["has_labels"])
        self.name: str = manifest.get("name", self.folder.name)
        if verify:
            for s in self.shards:
                for k in self._stored(s):
                    _verify_file(self.folder / s.name / _file_name(k))
        head = _cache.load_npz(self.folder / HEAD)
        self.head = None if head is None else (torch.from_numpy(head["weight"]),
                                               torch.from_numpy(head["bias"]) if "bias" in head else None)

    def _stored(self, s: ShardInfo) -> list[str]:
        return self.keys + ([LABELS] if self.has_labels else [])

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def offsets(self) -> list[int]:
        """Index of each shard's first sample in the whole dataset."""
        return list(np.cumsum([0] + [s.rows for s in self.shards])[:-1].astype(int))

    def array(self, shard: int, key: str) -> np.ndarray:
        """One signal of one shard, memory-mapped (read-only)."""
        return np.load(self.folder / self.shards[shard].name / _file_name(key), mmap_mode="r", allow_pickle=False)

    def iter_arrays(self, key: str) -> Iterator[np.ndarray]:
        for i in range(len(self.shards)):
            yield self.array(i, key)

    def shard_signals(self, i: int) -> Signals:
        """Shard ``i`` as in-memory Signals (with the head's weights when they were recorded)."""
        tensors = {k: torch.from_numpy(np.array(self.array(i, k))) for k in self.keys}
        labels = torch.from_numpy(np.array(self.array(i, LABELS))) if self.has_labels else None
        s = Signals(tensors=tensors, labels=labels, name=f"{self.name}[shard {i}]")
        if self.head is not None:
            s._head = self.head
        return s

    def iter_signals(self) -> Iterator[Signals]:
        for i in range(len(self.shards)):
            yield self.shard_signals(i)

    def __repr__(self) -> str:
        return f"ShardedSignals({str(self.folder)!r}, {len(self)} samples in {len(self.shards)} shards, {self.keys})"


# ---------------------------------------------------------------------- writing
class ShardWriter:
    """Buffers per-batch signals and writes a shard every ``shard_rows`` samples; ``close`` marks the folder
    complete. The manifest is rewritten (atomically, checksummed) after each shard, which makes it resumable."""

    def __init__(self, folder: Path, keys: Sequence[str], key: dict[str, Any], shard_rows: int, name: str,
                 shards: Sequence[ShardInfo] = ()) -> None:
        self.folder, self.keys, self.key, self.shard_rows, self.name = folder, list(keys), key, shard_rows, name
        self.shards = list(shards)
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in [*self.keys, LABELS]}
        self._rows = 0
        self.has_labels: bool | None = None

    def append(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None, batch_end: int, data_prefix: str) -> None:
        if self.has_labels is None:
            self.has_labels = labels is not None
        for k in self.keys:
            self._buf[k].append(arrays[k])
        if labels is not None and self.has_labels:
            self._buf[LABELS].append(labels)
        self._rows += len(arrays[self.keys[0]])
        if self._rows >= self.shard_rows:
            self.flush(batch_end, data_prefix)

    def flush(self, batch_end: int, data_prefix: str) -> None:
        if self._rows == 0:
            return
        name = f"shard-{len(self.shards):06d}"
        for k in [*self.keys, *([LABELS] if self.has_labels else [])]:
            a = np.concatenate(self._buf[k]) if len(self._buf[k]) > 1 else self._buf[k][0]
            _cache.write_verified(self.folder / name / _file_name(k), _cache.array_bytes(a), {"signal": k})
        self.shards.append(ShardInfo(name, self._rows, batch_end, data_prefix))
        self._buf = {k: [] for k in self._buf}
        self._rows = 0
        self.write_manifest(complete=False)

    def write_manifest(self, complete: bool) -> None:
        manifest = {"version": 1, "complete": complete, "keys": self.keys, "key": self.key, "name": self.name,
                    "has_labels": bool(self.has_labels), "shards": [vars(s) for s in self.shards]}
        _cache.write_verified(self.folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def extraction_key(probe: Any, requests: Sequence[Request]) -> dict[str, Any]:
    """What the shards depend on besides the data: the requests, their code, the model and the probe."""
    from ..signals import _plain

    return {"requests": sorted(r.key for r in requests),
            "code": _cache.digest(sorted(_cache.code_fingerprint(type(r)) for r in requests)),
            "model": _cache.model_fingerprint(probe.model),
            "probe": _cache.digest({"head": getattr(probe, "requested_head", None) or "auto",
                                    "input_std": _plain(probe.input_std), "input_mean": _plain(probe.input_mean)})}


def _resumable(folder: Path, key: dict[str, Any]) -> list[ShardInfo]:
    manifest = _cache.load_json(folder / MANIFEST) if (folder / MANIFEST).exists() else None
    if not isinstance(manifest, dict):
        return []
    if manifest.get("key", {}).get("requests") is not None:
        old = {k: v for k, v in manifest["key"].items() if k != "data"}
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            warnings.warn(f"{folder} holds shards of another {'/'.join(diff)}: they are not reused; re-extracting.",
                          _cache.CacheWarning, stacklevel=3)
            return []
    shards = []
    for info in (ShardInfo(**s) for s in manifest.get("shards", [])):
        try:
            for k in [*manifest["keys"], *([LABELS] if manifest.get("has_labels") else [])]:
                _verify_file(folder / info.name / _file_name(k))
        except InputError as e:
            warnings.warn(f"{e} It and the shards after it are recomputed.", _cache.CacheWarning, stacklevel=3)
            break
        shards.append(info)
    return shards


def extract_to_shards(probe: Any, data: Any, requests: Sequence[Request], folder: str | Path, *,
                      shard_rows: int = 16384, batch_size: int = 256, name: str | None = None,
                      progress: bool = True) -> ShardedSignals:
    """Run ``probe``'s model over ``data`` once and write every request's signal to shards in ``folder``.

    Memory: one shard's buffer (``shard_rows`` rows of every signal) plus one batch, whatever the dataset size.
    ``data`` is anything :class:`gradood.Probe.signals` accepts. A finished folder with the same model, code,
    probe settings and data is reused after re-hashing the data (no forward pass); an interrupted one resumes.
    """
    from .._batches import BatchSource

    if shard_rows < 1:
        raise InputError(f"shard_rows must be >= 1, got {shard_rows}.")
    folder = Path(folder)
    source = data if isinstance(data, BatchSource) else BatchSource(data, batch_size=batch_size)
    requests = list(dict.fromkeys(requests))
    key = extraction_key(probe, requests)
    done = _resumable(folder, key)
    writer = ShardWriter(folder, [r.key for r in requests], key, shard_rows, name or folder.name, done)
    if done:
        previous = _cache.load_json(folder / MANIFEST)
        writer.has_labels = bool(previous.get("has_labels")) if isinstance(previous, dict) else None
    taps = sorted({t for r in requests for t in r.taps})
    start = done[-1].end_batch if done else 0
    prefixes = {s.end_batch: s.data_prefix for s in done}
    hasher = _cache.DataHasher()
    bar = tqdm(total=source.num_batches, initial=start, desc=f"shards {writer.name}", unit="batch",
               disable=not progress, leave=False, dynamic_ncols=True)
    b = -1
    try:
        for b, (x, y) in enumerate(source.iter_batches()):
            hasher.update(x, y)
            if b < start:
                if b + 1 in prefixes and hasher.digest() != prefixes[b + 1]:
                    warnings.warn(f"{folder}: the finished shards were computed from other data; re-extracting.",
                                  _cache.CacheWarning, stacklevel=2)
                    return extract_to_shards_fresh(probe, source, requests, folder, shard_rows, name, progress)
                continue
            values = compute_requests(probe, x, y, requests, b, taps)
            labels = None if y is None else y.detach().cpu().long().flatten().numpy()
            writer.append({k: v.numpy() for k, v in values.items()}, labels, b + 1, hasher.digest())
            bar.update(1)
    finally:
        bar.close()
    if b < 0:
        raise InputError(f"the dataset {writer.name!r} is empty: there are no samples to extract.")
    if b + 1 < start:
        warnings.warn(f"{folder}: the finished shards cover more batches than the data has; re-extracting.",
                      _cache.CacheWarning, stacklevel=2)
        return extract_to_shards_fresh(probe, source, requests, folder, shard_rows, name, progress)
    writer.flush(b + 1, hasher.digest())
    return finish_extraction(writer, probe, {**key, "data": hasher.digest()})


def finish_extraction(writer: ShardWriter, probe: Any, key: dict[str, Any]) -> ShardedSignals:
    """Record the full key and the head's weights, then mark the folder complete (the manifest goes last)."""
    writer.key = key
    head = _head_arrays(probe)
    if head is not None:
        _cache.write_verified(writer.folder / HEAD, _cache.npz_bytes(head))
    writer.write_manifest(complete=True)
    return ShardedSignals(writer.folder)


def extract_to_shards_fresh(probe, source, requests, folder, shard_rows, name, progress) -> ShardedSignals:
    """Start over: drop the manifest (old shard files are overwritten shard by shard)."""
    for p in (folder / MANIFEST, _cache.sidecar(folder / MANIFEST)):
        p.unlink(missing_ok=True)
    return extract_to_shards(probe, source, requests, folder, shard_rows=shard_rows, name=name, progress=progress)


def _head_arrays(probe: Any) -> dict[str, np.ndarray] | None:
    if getattr(probe, "head_name", None) is None:
        return None
    out = {"weight": probe.weight.detach().cpu().numpy()}
    if probe.bias is not None:
        out["bias"] = probe.bias.detach().cpu().numpy()
    return out
