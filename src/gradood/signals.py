"""Signals: the per-sample quantities detectors are functions of, extracted once and reused.

A :class:`Request` names one per-sample signal and says how to compute it from one batch (the shared
forward pass's logits, features and layer taps, plus the model for gradient or perturbation work).
:class:`Signals` holds the signals of one dataset under one model: it computes every missing request in a
single streaming pass over the data, keeps the results (on CPU, and on disk when given a cache folder:
content-addressed and checksummed by :mod:`gradood.cache`, written atomically, resumable after an
interruption), and serves them to any number of detectors.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _passes
from . import cache as _cache
from ._labels import as_label_tensor
from .errors import InputError

if TYPE_CHECKING:
    from ._batches import BatchSource
    from .probe import Probe


@dataclass
class ProbeBatch:
    """One batch as requests see it: inputs (on the model's device), labels, and the shared forward pass."""

    x: torch.Tensor
    y: torch.Tensor | None
    logits: torch.Tensor
    features: torch.Tensor
    taps: dict[str, torch.Tensor]
    probe: "Probe"
    index: int


class Request(ABC):
    """A per-sample signal. Subclasses are frozen dataclasses: equal parameters give an equal ``key``.

    ``taps`` lists the layers whose activations ``compute`` reads from the shared forward pass.
    """

    taps: tuple[str, ...] = ()

    @property
    @abstractmethod
    def key(self) -> str:
        """A unique, stable, file-name-safe-ish name (used as cache key)."""

    @abstractmethod
    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        """Return a ``B x ...`` tensor for the batch."""

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Logits(Request):
    """The head's output, ``N x C``."""

    @property
    def key(self) -> str:
        return "logits"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        return batch.logits


@dataclass(frozen=True)
class Features(Request):
    """The head's input (penultimate features), ``N x D``."""

    @property
    def key(self) -> str:
        return "features"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        return batch.features


def sequence_mask(x: Any, a: torch.Tensor) -> torch.Tensor | None:
    """For token inputs (a dict with an ``attention_mask``, ``B x L``) and a ``B x T x H`` activation whose
    positions are the input's (``T <= L``, any dropped trailing columns padding in every row, as a model that
    trims padding leaves them): the ``B x T`` mask of real positions. Else None (channel-first maps)."""
    x = getattr(x, "inputs", x)  # token inputs moved in embedding space (probe.ShiftedTokens) keep their mask
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if not isinstance(mask, torch.Tensor) or a.ndim != 3 or mask.ndim != 2 or mask.shape[0] != a.shape[0]:
        return None
    t = a.shape[1]
    if t > mask.shape[1] or bool(mask[:, t:].any()):
        return None
    return mask[:, :t].to(a.dtype)


def is_feature_map(x: Any, a: torch.Tensor) -> bool:
    """A channel-first map ``B x C x ...`` (at least 3 dims), not a ``B x T x H`` token sequence of ``x``."""
    return a.ndim >= 3 and sequence_mask(x, a) is None


def position_mean(x: Any, a: torch.Tensor) -> torch.Tensor:
    """``B x C``: a layer's output averaged over its positions -- the spatial dims of a ``B x C x ...`` map,
    or the real (unpadded) tokens of a ``B x T x H`` sequence activation of token inputs."""
    if a.ndim <= 2:
        return a.reshape(a.shape[0], -1)
    mask = sequence_mask(x, a)
    if mask is not None:
        return (a * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return a.reshape(a.shape[0], a.shape[1], -1).mean(dim=2)


@dataclass(frozen=True)
class Tap(Request):
    """A layer's output: ``reduce="mean"`` averages over positions (Mahalanobis' per-layer feature;
    :func:`position_mean`: spatial dims of a map, real tokens of a sequence), ``"flatten"`` keeps every value
    (FSSD's flattened maps)."""

    layer: str
    reduce: str = "mean"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "flatten"):
            raise InputError(f"Tap reduce must be 'mean' or 'flatten', got {self.reduce!r}.")

    @property
    def taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.layer,)

    @property
    def key(self) -> str:
        return f"tap[{self.layer}]:{self.reduce}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        a = batch.taps[self.layer]
        if self.reduce == "flatten":
            return a.reshape(a.shape[0], -1)
        return position_mean(batch.x, a)


LOGITS = Logits()
FEATURES = Features()


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """Short content hash of tensors, for keys of requests that carry fitted state (e.g. a centre)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        a = t.detach().cpu().contiguous()
        h.update(str(a.dtype).encode() + str(tuple(a.shape)).encode())
        h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _safe_name(key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


#: how a cache key's parts read in a warning
_WHAT = {"data": "other data", "model": "another model (weights or classes)", "code": "other gradood code",
         "probe": "other probe settings (head, input_std/mean)"}


class _StalePartial(Exception):
    """The shards of an interrupted extraction were computed from other data than the source yields now."""


def _plain(v: Any) -> Any:
    """A JSON-able copy of a probe setting (tensors and arrays as lists)."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.tolist()
    if isinstance(v, (tuple, list)):
        return [_plain(e) for e in v]
    return v


def _callable_id(f: Any) -> str | None:
    """Name and (when available) source of a user callable that shapes the signals, e.g. ``Probe(logits=...)``."""
    if f is None:
        return None
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__name__)}"


def compute_requests(probe: "Probe", x: Any, y: Any, requests: Sequence[Request], index: int,
                     taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every request's rows for one batch (on the CPU) from one shared forward pass. The pass keeps its graph
    when a request perturbs the inputs and shares it (:mod:`gradood._passes`). Used by :class:`Signals`, the
    shard writer (:mod:`gradood.stream`) and the Ray actors (:mod:`gradood.distributed`) alike."""
    share = _passes.any_shares_input_grad(requests)
    out = probe.forward(_passes.grad_leaf(probe, x, index) if share else x, taps, batch_index=index, grad=share)
    batch = ProbeBatch(x=out.x, y=y, logits=out.logits, features=out.features, taps=out.taps, probe=probe,
                       index=index)
    values = {}
    for r in requests:
        v = r.compute(_passes.batch_for(r, batch, share))
        if v.shape[0] != out.logits.shape[0]:
            raise RuntimeError(f"request {r.key} returned {v.shape[0]} rows for a batch of {out.logits.shape[0]}")
        values[r.key] = v.detach().to("cpu")
    return values


class Signals:
    """The signals of one dataset under one model.

    ``executor`` (default None: this process) computes missing signals elsewhere; gradood.distributed's
    ``RayExecutor`` runs them on a Ray actor pool.

    Build it with :meth:`gradood.Probe.signals` (lazy: computes on demand by running the model) or with
    :meth:`Signals.from_arrays` (precomputed logits/features/labels; no model, so requests that need one
    raise a clear error).
    """

    executor: Any = None

    def __init__(
        self,
        *,
        source: "BatchSource | None" = None,
        probe: "Probe | None" = None,
        tensors: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        name: str = "data",
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        checkpoint_every: int = 50,
    ) -> None:
        self.source = source
        self.probe = probe
        self.name = name
        self.progress = progress
        self.checkpoint_every = max(1, int(checkpoint_every))
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self._labels = labels
        self._labels_known = labels is not None or source is None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._data_digest: str | None = None  # sha256 of the source's batches, once a pass has seen them all
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, *, logits: Any = None, features: Any = None, labels: Any = None,
                    head_weight: Any = None, head_bias: Any = None, name: str = "data",
                    **taps: Any) -> "Signals":
        """Signals from precomputed arrays (numpy or torch). ``head_weight`` (``C x D``) and ``head_bias``
        (``C``) are the classifier head's parameters, needed by ReAct and ViM. ``taps`` are keyed by layer
        name and stored as ``Tap(layer, 'mean')`` signals."""
        tensors: dict[str, torch.Tensor] = {}
        n: int | None = None

        def put(key: str, a: Any, what: str) -> None:
            nonlocal n
            t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
            if t.ndim != 2:
                raise InputError(f"{what} must be a 2-D array (samples x dims), got shape {tuple(t.shape)}.")
            if t.shape[0] == 0:
                raise InputError(f"{what} is empty: there are no samples to score.")
            if not torch.isfinite(t).all():
                raise InputError(f"{what} contain NaN or Inf; clean them before scoring.")
            if n is not None and t.shape[0] != n:
                raise InputError(f"{what} have {t.shape[0]} samples but other signals have {n}.")
            n = t.shape[0]
            tensors[key] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

        if logits is not None:
            put(LOGITS.key, logits, "logits")
        if features is not None:
            put(FEATURES.key, features, "features")
        for layer, a in taps.items():
            put(Tap(layer).key, a, f"tap {layer!r}")
        lab = None
        if labels is not None:
            lab = as_label_tensor(labels, "labels")
            if n is not None and len(lab) != n:
                raise InputError(f"labels have {len(lab)} entries but the signals have {n} samples.")
        if not tensors:
            raise InputError("from_arrays needs at least one of logits=, features= or a tap.")
        out = cls(tensors=tensors, labels=lab, name=name)
        if head_weight is not None:
            w = torch.as_tensor(np.asarray(head_weight) if not isinstance(head_weight, torch.Tensor) else head_weight)
            b = None if head_bias is None else torch.as_tensor(
                np.asarray(head_bias) if not isinstance(head_bias, torch.Tensor) else head_bias)
            if w.ndim != 2 or (b is not None and b.shape != (w.shape[0],)):
                raise InputError(f"head_weight must be C x D and head_bias C, got {tuple(w.shape)} and "
                                 f"{None if b is None else tuple(b.shape)}.")
            out._head = (w, b)
        return out

    # ------------------------------------------------------------------ access
    def head_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier head's ``(weight C x D, bias C or None)``, from the probe or from ``from_arrays``."""
        head = getattr(self, "_head", None)
        if head is not None:
            return head
        if self.probe is not None:
            if self.probe.head_name is None:
                self.require([LOGITS])
            return self.probe.weight.cpu(), None if self.probe.bias is None else self.probe.bias.cpu()
        raise InputError(
            f"{self.name!r} has no classifier head weights: pass head_weight= and head_bias= to "
            "Signals.from_arrays, or build the signals with probe.signals(data)."
        )

    def __len__(self) -> int:
        if self._tensors:
            return next(iter(self._tensors.values())).shape[0]
        n = self.source.num_samples if self.source is not None else None
        if n is None:
            self.require([LOGITS])
            return len(self)
        return n

    @property
    def logits(self) -> torch.Tensor:
        return self.get(LOGITS)

    @property
    def features(self) -> torch.Tensor:
        return self.get(FEATURES)

    @property
    def labels(self) -> torch.Tensor | None:
        """True labels when the data carried them (None otherwise)."""
        if not self._labels_known:
            self.require([LOGITS])
        return self._labels

    def known_num_classes(self) -> int | None:
        """The model's class count if it is known without running anything (computed logits, or the head)."""
        if LOGITS.key in self._tensors:
            return int(self._tensors[LOGITS.key].shape[1])
        head = getattr(self, "_head", None)
        if head is not None:
            return int(head[0].shape[0])
        if self.probe is not None and self.probe.head_name is not None:
            return int(self.probe.weight.shape[0])
        return None

    def has_head_bias(self) -> bool | None:
        """Whether the classifier head has a bias (None when the head is unknown, e.g. arrays without it)."""
        head = getattr(self, "_head", None)
        if head is not None:
            return head[1] is not None
        if self.probe is not None and self.probe.head_name is not None:
            return self.probe.bias is not None
        return None

    def warm_up(self) -> None:
        """Run the first batch through the probe if nothing has run yet (head discovery, input shape), e.g.
        when every signal came from the disk cache but a detector needs to run the model itself."""
        if self.probe is not None and self.probe.input_shape is None and self.source is not None:
            for x, _ in self.source.iter_batches():
                self.probe.forward(x, batch_index=0)
                break

    def has(self, request: Request) -> bool:
        return request.key in self._tensors

    def get(self, request: Request) -> torch.Tensor:
        if request.key not in self._tensors:
            self.require([request])
        return self._tensors[request.key]

    def require(self, requests: Iterable[Request]) -> None:
        """Make sure every request is available, computing all missing ones in one pass over the data."""
        missing: dict[str, Request] = {}
        for r in requests:
            if r.key not in self._tensors and r.key not in missing:
                missing[r.key] = r
        keys: dict[str, dict[str, str]] = {}
        if self.cache_dir is not None and self.probe is not None and self.source is not None \
                and (missing or not self._labels_known):
            keys = self._cache_keys(list(missing.values()))
            self._load_cached(missing, keys)
        if not missing and self._labels_known:
            return
        if self.probe is None or self.source is None:
            raise InputError(
                f"signals {sorted(missing)} are not in {self.name!r}, which was built from arrays without a model. "
                "Build it with probe.signals(data) so gradood can run the model, or pass them to from_arrays."
            )
        self._extract(list(missing.values()), keys)

    # ------------------------------------------------------------------ extraction
    def _extract(self, requests: Sequence[Request], cache_keys: dict[str, dict[str, str]] | None = None) -> None:
        assert self.probe is not None and self.source is not None
        cache_keys = cache_keys or {}
        if self.cache_dir is not None and any(r.key not in cache_keys for r in requests):
            cache_keys = {**cache_keys, **self._cache_keys([r for r in requests if r.key not in cache_keys])}
        if self.executor is not None:
            self._extract_with_executor(requests, cache_keys)
            return
        try:
            self._extract_pass(requests, cache_keys)
        except _StalePartial as e:
            warnings.warn(str(e), _cache.CacheWarning, stacklevel=3)
            self._extract_pass(requests, cache_keys, resume=False)

    def _extract_with_executor(self, requests: Sequence[Request], cache_keys: dict[str, dict[str, str]]) -> None:
        """Compute ``requests`` elsewhere (``self.executor``, e.g. :class:`gradood.distributed.RayExecutor`), then
        keep and cache them exactly as a local pass would."""
        assert self.probe is not None and self.source is not None
        self.warm_up()  # the head and input shape are known here too (head_params, input checks)
        tensors, labels = self.executor.extract(self.source, self.probe, requests)
        self._tensors.update(tensors)
        if not self._labels_known:
            self._labels, self._labels_known = labels, True
        if self.cache_dir is not None:
            hasher = _cache.DataHasher()
            for x, y in self.source.iter_batches():
                hasher.update(x, y)
            self._store(requests, cache_keys, hasher.digest())

    def _extract_pass(self, requests: Sequence[Request], cache_keys: dict[str, dict[str, str]],
                      resume: bool = True) -> None:
        assert self.probe is not None and self.source is not None
        keys = [r.key for r in requests]
        taps = sorted({t for r in requests for t in r.taps})
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        label_chunks: list[torch.Tensor] = []
        # The data's hash is taken as the batches stream by; with a cache it names the stored arrays, and the
        # shards of an interrupted pass are only resumed if the batches they skip hash to what they recorded.
        hasher = _cache.DataHasher() if self.cache_dir is not None else None
        partial = self._partial_dir(cache_keys, keys)
        if partial is not None and not resume:
            self._remove_partial(partial)
        start, prefixes = self._resume(partial, chunks, label_chunks) if partial is not None else (0, {})
        has_labels: bool | None = None if not label_chunks else True
        since_save = start
        bar = tqdm(total=self.source.num_batches, initial=start, desc=f"signals {self.name}", unit="batch",
                   disable=None if self.progress else True, leave=False, dynamic_ncols=True)
        b = -1
        try:
            for b, (x, y) in enumerate(self.source.iter_batches()):  # start > 0 only with a cache (a hasher)
                if hasher is not None:
                    hasher.update(x, y)
                    if b < start:
                        if b + 1 in prefixes and hasher.digest() != prefixes[b + 1]:
                            raise _StalePartial(
                                f"the interrupted extraction in {partial} was computed from other data (batches "
                                f"before {b + 1} hash differently): discarded it; recomputing from the start.")
                        continue
                for k, v in compute_requests(self.probe, x, y, requests, b, taps).items():
                    chunks[k].append(v)
                if has_labels is None:
                    has_labels = y is not None
                if y is not None and has_labels:
                    label_chunks.append(as_label_tensor(y, f"labels of batch {b} of {self.name!r}"))
                bar.update(1)
                if partial is not None and hasher is not None and b + 1 - since_save >= self.checkpoint_every:
                    self._save_partial(partial, chunks, label_chunks, since_save, b + 1, hasher.digest())
                    since_save = b + 1
        finally:
            bar.close()
        if b < 0:
            raise InputError(f"the dataset {self.name!r} is empty: there are no samples to score. Check the "
                             "path, filters and split that build it.")
        for k in keys:
            self._tensors[k] = chunks[k][0] if len(chunks[k]) == 1 else torch.cat(chunks[k])
        if not self._labels_known:
            self._labels = torch.cat(label_chunks) if has_labels and label_chunks else None
            self._labels_known = True
        if hasher is not None:
            self._store(requests, cache_keys, hasher.digest())
            if partial is not None:
                self._remove_partial(partial)

    # ------------------------------------------------------------------ disk cache (see gradood.cache)
    def _cache_keys(self, requests: Sequence[Request]) -> dict[str, dict[str, str]]:
        """Each request's cache key except the data part: request, code, model, probe settings."""
        p = self.probe
        assert p is not None
        model = _cache.model_fingerprint(p.model)
        probe = _cache.digest({
            "head": getattr(p, "requested_head", p.head_name) or "auto", "input_std": _plain(p.input_std),
            "input_mean": _plain(p.input_mean), "logits": _callable_id(getattr(p, "logits_fn", None)),
            "embeddings": getattr(p, "embeddings_name", None)})
        return {r.key: {"request": r.key, "code": _cache.code_fingerprint(type(r)), "model": model, "probe": probe}
                for r in requests}

    def _entry(self, key: dict[str, str], data: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / _safe_name(key["request"]) / f"{_cache.digest(key)}-{data[:24]}.npy"

    def _labels_entry(self, data: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "labels" / f"{data[:24]}.npy"

    def data_digest(self) -> str | None:
        """sha256 of every batch of the data (inputs and labels: dtype, shape, bytes), the data part of the
        cache keys; hashes the data once (without the model) if no pass has done it yet. None without a source."""
        if self._data_digest is None and self.source is not None:
            h = _cache.DataHasher()
            for x, y in self.source.iter_batches():
                h.update(x, y)
            self._data_digest = h.digest()
        return self._data_digest

    def _load_cached(self, missing: dict[str, Request], keys: dict[str, dict[str, str]]) -> None:
        """Move every request found under its full key from the disk cache into memory (verified reads)."""
        assert self.cache_dir is not None
        # The data's hash needs a pass over the data; it is only taken up front when a stored array could match
        # (same request, model, code and probe); otherwise the extraction hashes the data as it streams.
        candidates = [k for k in missing
                      if any(self._entry(keys[k], "").parent.glob(f"{_cache.digest(keys[k])}-*.npy"))]
        if candidates or (not missing and any((self.cache_dir / "labels").glob("*.npy*"))):
            data = self.data_digest()
            assert data is not None
            for k in candidates:
                path = self._entry(keys[k], data)
                t = _cache.load_array(path)
                if t is not None and _cache.read_key(path) == {**keys[k], "data": data}:
                    self._tensors[k] = t
                    del missing[k]
            if not self._labels_known:
                self._load_labels(data)
        for k in missing:
            self._say_recomputed(keys[k])

    def _load_labels(self, data: str) -> None:
        path = self._labels_entry(data)
        raw = _cache.read_verified(path)
        if raw is None or _cache.read_key(path) != {"data": data}:
            return
        if raw == b"none":
            self._labels, self._labels_known = None, True
            return
        t = _cache.load_array(path)
        if t is not None:
            self._labels, self._labels_known = t, True

    def _say_recomputed(self, key: dict[str, str]) -> None:
        """One warning when the folder holds this signal for data of the same name under other keys only (other
        data, model or code). Other names are other data sets sharing the folder: nothing to say."""
        assert self.cache_dir is not None
        folder = self._entry(key, "").parent
        if key["request"] in self._warned or not folder.is_dir():
            return
        found = [k for p in folder.glob("*.npy")
                 if (k := _cache.read_key(p)) and (_cache.read_key(p, "note") or {}).get("name") == self.name]
        if not found:
            return
        # the data is hashed up front only when an entry could match it; otherwise it is compared as equal here
        # (if every other part matched, that entry would have been a candidate and the data hashed)
        want = {**key, "data": self._data_digest}
        parts = _cache.differing_parts(want, [k if self._data_digest else {**k, "data": None} for k in found])
        parts = parts or ["data"]
        self._warned.add(key["request"])
        warnings.warn(
            f"signal {key['request']!r} of {self.name!r}: {self.cache_dir} holds it only for "
            f"{' and '.join(_WHAT.get(p, p) for p in parts)}; computing it under a new key (the old entries "
            "stay).", _cache.CacheWarning,
            stacklevel=4)

    def _store(self, requests: Sequence[Request], keys: dict[str, dict[str, str]], data: str) -> None:
        """Write the computed arrays and labels under their full keys (each file, then its checksum)."""
        if self._data_digest is not None and self._data_digest != data:
            warnings.warn(
                f"the data of {self.name!r} changed between two passes (a shuffled or randomly augmented "
                "loader?): its signals are not cached, since no later run could be sure to see the same data.",
                _cache.CacheWarning, stacklevel=4)
            return
        self._data_digest = data
        for r in requests:
            key = {**keys[r.key], "data": data}
            _cache.write_verified(self._entry(keys[r.key], data), _cache.array_bytes(self._tensors[r.key]), key,
                                  note={"name": self.name, "shape": list(self._tensors[r.key].shape)})
        labels = self._labels_entry(data)
        if _cache.read_verified(labels) is None:  # absent, or damaged (then named and deleted)
            raw = b"none" if self._labels is None else _cache.array_bytes(self._labels)
            _cache.write_verified(labels, raw, {"data": data})

    def _partial_dir(self, keys: dict[str, dict[str, str]], names: Sequence[str]) -> Path | None:
        if self.cache_dir is None or self.source is None or not self.source.deterministic:
            return None
        where = [self.name, self.source.num_samples, self.source.batch_size]
        return self.cache_dir / f"partial-{_cache.digest([sorted(names), [keys.get(n) for n in sorted(names)], where], 12)}"

    @staticmethod
    def _remove_partial(partial: Path) -> None:
        if partial.is_dir():  # no shard was written when the data is short
            for f in partial.glob("*"):
                f.unlink()
            partial.rmdir()

    def _save_partial(self, partial: Path, chunks: dict[str, list[torch.Tensor]],
                      label_chunks: list[torch.Tensor], first: int, end: int, data_prefix: str) -> None:
        """Save the batches [first, end) as one shard named by the range; its checksum file records the
        requests and the hash of every batch before ``end`` (what a resume must see again to reuse it)."""
        n_new = end - first
        names = sorted(chunks)
        arrays = {f"k{i}": torch.cat(chunks[k][-n_new:]).numpy() for i, k in enumerate(names)}
        if label_chunks:
            arrays["labels"] = torch.cat(label_chunks[-n_new:]).numpy()
        _cache.write_verified(partial / f"shard-{first:08d}-{end:08d}.npz", _cache.npz_bytes(arrays),
                              {"requests": names, "data_prefix": data_prefix})

    def _resume(self, partial: Path, chunks: dict[str, list[torch.Tensor]],
                label_chunks: list[torch.Tensor]) -> tuple[int, dict[int, str]]:
        """Load the verified shards of an interrupted extraction; return the batch index to continue from and
        the data hash each shard recorded at its end."""
        if not partial.is_dir():
            return 0, {}
        end, prefixes = 0, {}
        names = sorted(chunks)
        for s in sorted(partial.glob("shard-*.npz")):
            m = re.match(r"shard-(\d+)-(\d+)\.npz$", s.name)
            if m is None or int(m.group(1)) != end:
                break  # a gap: ignore what follows and recompute from here
            arrays = _cache.load_npz(s)
            key = _cache.read_key(s)
            if arrays is None or key is None or key.get("requests") != names \
                    or any(f"k{i}" not in arrays for i in range(len(names))):
                break
            for i, k in enumerate(names):
                chunks[k].append(torch.from_numpy(arrays[f"k{i}"]))
            if "labels" in arrays:
                label_chunks.append(torch.from_numpy(arrays["labels"]))
            end = int(m.group(2))
            prefixes[end] = str(key.get("data_prefix"))
        return end, prefixes

    # ------------------------------------------------------------------ splitting
    def subset(self, indices: Any, name: str | None = None) -> "Signals":
        """The signals of a subset of samples. Already computed signals are indexed; the data source is
        indexed too when it can be (arrays, map-style datasets), so more signals can still be computed."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).flatten()
        if idx.numel() == 0:
            raise InputError("subset() got no indices: the subset would be empty.")
        source = self.source.subset(idx.tolist()) if self.source is not None else None
        tensors = {k: v[idx] for k, v in self._tensors.items()}
        labels = self.labels
        sub = Signals(source=source, probe=self.probe if source is not None else None, tensors=tensors,
                      labels=None if labels is None else labels[idx], name=name or f"{self.name}[subset]",
                      progress=self.progress)
        sub._labels_known = True
        if getattr(self, "_head", None) is not None:
            sub._head = self._head
        sub.executor = self.executor
        return sub

    def __repr__(self) -> str:
        return f"Signals({self.name!r}, computed={sorted(self._tensors)})"
