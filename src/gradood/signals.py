"""Signals: the per-sample quantities detectors are functions of, extracted once and reused.

A :class:`Request` names one per-sample signal and says how to compute it from one batch (the shared
forward pass's logits, features and layer taps, plus the model for gradient or perturbation work).
:class:`Signals` holds the signals of one dataset under one model: it computes every missing request in a
single streaming pass over the data, keeps the results (on CPU, and on disk when given a cache folder,
written atomically and resumable after an interruption), and serves them to any number of detectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _passes
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


@dataclass(frozen=True)
class Tap(Request):
    """A layer's output: ``reduce="mean"`` averages over spatial/sequence dims (Mahalanobis' per-layer
    feature), ``"flatten"`` keeps every value (FSSD's flattened maps)."""

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
        if self.reduce == "flatten" or a.ndim <= 2:
            return a.reshape(a.shape[0], -1)
        return a.reshape(a.shape[0], a.shape[1], -1).mean(dim=2)


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
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


def _save_array(path: Path, t: torch.Tensor) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _load_array(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False))


class Signals:
    """The signals of one dataset under one model.

    Build it with :meth:`gradood.Probe.signals` (lazy: computes on demand by running the model) or with
    :meth:`Signals.from_arrays` (precomputed logits/features/labels; no model, so requests that need one
    raise a clear error).
    """

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
        if self.cache_dir is not None:
            self._load_meta()

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
        if self.cache_dir is not None:
            for key in list(missing):
                path = self.cache_dir / f"{_safe_name(key)}.npy"
                if path.exists():
                    self._tensors[key] = _load_array(path)
                    del missing[key]
            labels_path = self.cache_dir / "labels.npy"
            if not self._labels_known and labels_path.exists():
                self._labels, self._labels_known = _load_array(labels_path), True
            if not self._labels_known and (self.cache_dir / "labels.none").exists():
                self._labels_known = True
        if not missing and self._labels_known:
            return
        if self.probe is None or self.source is None:
            raise InputError(
                f"signals {sorted(missing)} are not in {self.name!r}, which was built from arrays without a model. "
                "Build it with probe.signals(data) so gradood can run the model, or pass them to from_arrays."
            )
        self._extract(list(missing.values()))

    # ------------------------------------------------------------------ extraction
    def _extract(self, requests: Sequence[Request]) -> None:
        assert self.probe is not None and self.source is not None
        keys = [r.key for r in requests]
        taps = sorted({t for r in requests for t in r.taps})
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        label_chunks: list[torch.Tensor] = []
        partial = self._partial_dir(keys)
        start = self._resume(partial, chunks, label_chunks) if partial is not None else 0
        has_labels: bool | None = None if not label_chunks else True
        share = _passes.any_shares_input_grad(requests)  # perturbations reuse this pass's graph (_passes)
        since_save = start
        bar = tqdm(total=self.source.num_batches, initial=start, desc=f"signals {self.name}", unit="batch",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        b = start - 1
        try:
            for b, (x, y) in enumerate(self.source.iter_batches(start_batch=start), start=start):
                out = self.probe.forward(_passes.grad_leaf(self.probe, x, b) if share else x, taps, batch_index=b,
                                         grad=share)
                batch = ProbeBatch(x=out.x, y=y, logits=out.logits,
                                   features=out.features, taps=out.taps, probe=self.probe, index=b)
                for r in requests:
                    v = r.compute(_passes.batch_for(r, batch, share))
                    if v.shape[0] != out.logits.shape[0]:
                        raise RuntimeError(f"request {r.key} returned {v.shape[0]} rows for a batch of "
                                           f"{out.logits.shape[0]}")
                    chunks[r.key].append(v.detach().to("cpu"))
                if has_labels is None:
                    has_labels = y is not None
                if y is not None and has_labels:
                    label_chunks.append(as_label_tensor(y, f"labels of batch {b} of {self.name!r}"))
                bar.update(1)
                if partial is not None and b + 1 - since_save >= self.checkpoint_every:
                    self._save_partial(partial, chunks, label_chunks, since_save, b + 1)
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
        if self.cache_dir is not None:
            for k in keys:
                _save_array(self.cache_dir / f"{_safe_name(k)}.npy", self._tensors[k])
            if self._labels is not None:
                _save_array(self.cache_dir / "labels.npy", self._labels)
            else:
                atomic_write_bytes(self.cache_dir / "labels.none", b"")
            self._save_meta()
            if partial is not None and partial.is_dir():  # no shard was written when the data is short
                for f in partial.glob("*"):
                    f.unlink()
                partial.rmdir()

    def _partial_dir(self, keys: Sequence[str]) -> Path | None:
        if self.cache_dir is None or self.source is None or not self.source.deterministic:
            return None
        digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
        return self.cache_dir / f"partial-{digest}"

    def _save_partial(self, partial: Path, chunks: dict[str, list[torch.Tensor]],
                      label_chunks: list[torch.Tensor], first: int, end: int) -> None:
        """Save the batches [first, end) as one shard; the shard's name records the range."""
        import io

        n_new = end - first
        arrays = {f"k{i}": torch.cat(v[-n_new:]).numpy() for i, (k, v) in enumerate(chunks.items())}
        if label_chunks:
            arrays["labels"] = torch.cat(label_chunks[-n_new:]).numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(partial / f"shard-{first:08d}-{end:08d}.npz", buf.getvalue())

    def _resume(self, partial: Path, chunks: dict[str, list[torch.Tensor]],
                label_chunks: list[torch.Tensor]) -> int:
        """Load finished shards of an interrupted extraction; return the batch index to continue from."""
        if not partial.is_dir():
            return 0
        shards = sorted(partial.glob("shard-*.npz"))
        end = 0
        for s in shards:
            m = re.match(r"shard-(\d+)-(\d+)\.npz$", s.name)
            if m is None or int(m.group(1)) != end:
                break  # a gap: ignore what follows and recompute from here
            with np.load(s, allow_pickle=False) as z:
                for i, k in enumerate(chunks):
                    chunks[k].append(torch.from_numpy(z[f"k{i}"]))
                if "labels" in z:
                    label_chunks.append(torch.from_numpy(z["labels"]))
            end = int(m.group(2))
        return end

    def _meta_path(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "meta.json"

    def _load_meta(self) -> None:
        p = self._meta_path()
        if not p.exists() or self.source is None:
            return
        meta = json.loads(p.read_text())
        n = self.source.num_samples
        if n is not None and meta.get("num_samples") not in (None, n):
            raise InputError(
                f"the signal cache {self.cache_dir} was written for {meta['num_samples']} samples but the data has "
                f"{n}: it belongs to other data. Delete that folder or use another cache_dir."
            )

    def _save_meta(self) -> None:
        n = next(iter(self._tensors.values())).shape[0] if self._tensors else None
        atomic_write_bytes(self._meta_path(), json.dumps({"num_samples": n, "name": self.name,
                                                          "written": time.time()}).encode())

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
        return sub

    def __repr__(self) -> str:
        return f"Signals({self.name!r}, computed={sorted(self._tensors)})"
