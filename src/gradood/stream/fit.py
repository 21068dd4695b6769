"""Fitting and scoring detectors from shards, with memory that does not grow with the number of samples.

A :class:`StreamFit` describes a fit as passes over the shards; each pass maps every shard to a mergeable
statistic (:mod:`gradood.stream.stats`) and reduces them in shard order, so the fitted state is the same
whether one process reads the shards or many workers do (:mod:`gradood.distributed` runs the maps on a Ray
cluster). The fitted attributes are the ones the in-memory ``fit`` sets, so a streamed detector scores, saves
and reports like any other; tests check both fits agree to float64 round-off.

Streamable fits: ``mahalanobis`` (class moments -> tied covariance), ``vim`` (uncentred second moment about
the origin, then the mean residual norm), ``klmatching`` (per-class softmax sums), ``react`` (the exact
percentile by radix selection on the values' bits), ``rg-additive`` (moments of the seeded subset), ``knn``
(a normalised bank written as shards and searched shard by shard). Detectors without fitted state (MSP,
Energy, GradNorm, ...) need nothing. Other fitted detectors raise a ConfigError naming these.

Fits that run the model on every pass (``MODEL_FITS``) stream from the input batches instead of signal shards:
:func:`fit_from_data` computes each pass as partial sums over consecutive blocks of batches, merged in data
order, and :func:`gradood.distributed.fit_from_data` computes the same blocks on a Ray actor pool:

* ``lowdim`` and its variants (the PCA of per-sample gradients by power iterations, or the per-class mean
  gradients): moments; per-class sums; ``G^T Y``, ``1^T Y`` and the R factor of ``Y = Z W`` per power
  iteration. Memory: a few P x K sketches, not N (plus the head's N x K projections).
* ``mahalanobis-ensemble``: per-layer class moments of the averaged activations (a D x D scatter per layer,
  not N x D); the combiner and the eps tuning read N x L per-layer scores, as in memory.
* ``fssd``: its in-memory fit already keeps only N x L distances; run on the data's batches.

They score from shards like the others (their scores are per-batch requests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .. import cache as _cache
from ..errors import ConfigError, InputError
from ..signals import FEATURES, Signals
from .shards import ShardedSignals
from .stats import (ClassMoments, ExactRankSelector, Moments, Sums, merge_smallest, numpy_linear_percentile,
                    percentile_ranks)

#: Runs ``fitter.map(pass_index, shard_index)`` over every shard; yields the results in shard order.
MapShards = Callable[["StreamFit", int], Iterable[Any]]


class StreamFit:
    """A fit as passes of map (one shard -> statistic) and reduce (statistics in shard order -> state)."""

    passes: int = 1

    def __init__(self, detector: Any, shards: ShardedSignals) -> None:
        self.detector = detector
        self.folder = str(shards.folder)
        self.n = len(shards)
        self.offsets = shards.offsets
        self._shards: ShardedSignals | None = shards

    @property
    def shards(self) -> ShardedSignals:
        if self._shards is None:  # in a worker process: reopen the folder (checksums were checked by the driver)
            self._shards = ShardedSignals(self.folder, verify=False)
        return self._shards

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def map(self, p: int, i: int) -> Any:
        return self.map_signals(p, self.shards.shard_signals(i), self.offsets[i], i)

    def map_signals(self, p: int, s: Signals, offset: int, i: int) -> Any:
        raise NotImplementedError

    def reduce(self, p: int, parts: Iterable[Any]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


def _merged(parts: Iterable[Any]) -> Any:
    """Merge in order, one part at a time: only the running total and one shard's statistic are alive."""
    out = None
    for p in parts:
        out = p if out is None else out.merge(p)
    return out


class MahalanobisFit(StreamFit):
    def map_signals(self, p, s, offset, i):
        from ..detectors._checks import class_labels

        return ClassMoments.of(s.features, class_labels(s, "mahalanobis"))

    def reduce(self, p, parts):
        self.moments: ClassMoments = _merged(parts)

    def finish(self):
        from ..detectors.mahalanobis import TiedGaussian

        C = self.detector.n_classes_ if hasattr(self.detector, "n_classes_") else max(self.moments.per_class) + 1
        counts = self.moments.counts(C)
        if bool((counts == 0).any()):
            raise InputError(f"the ID fit shards have no samples of classes {(counts == 0).nonzero().flatten().tolist()[:10]}: "
                             "Mahalanobis needs every class's mean. Fit on data covering all classes.")
        cov = self.moments.tied_covariance()
        if self.detector.ridge == 0:
            from ..detectors.mahalanobis import _warn_if_rank_deficient

            _warn_if_rank_deficient(cov, self.n, self.moments.constant_units(), "mahalanobis",
                                    f"the shards in {self.folder} (penultimate features)", C,
                                    "To choose: pass ridge=1e-6 for the ridge form, or fit on more samples.")
        self.detector.gaussian_ = TiedGaussian.from_moments(self.moments.means(C), cov, ridge=self.detector.ridge)


class ViMFit(StreamFit):
    passes = 2

    def __init__(self, detector, shards):
        super().__init__(detector, shards)
        first = shards.shard_signals(0)
        w, b = first.head_params()
        self.D = int(first.features.shape[1])
        self.origin = (-torch.linalg.pinv(w.double()) @ b.double()) if b is not None else torch.zeros(self.D, dtype=torch.float64)

    def map_signals(self, p, s, offset, i):
        x = s.features.double() - self.origin
        if p == 0:
            return Sums(len(x), {"xx": x.T @ x, "maxlogit": s.logits.double().amax(dim=1).sum()})
        return Sums(len(x), {"residual": (x @ self.residual_basis).norm(dim=1).sum()})

    def reduce(self, p, parts):
        total = _merged(parts)
        if p == 0:
            from ..detectors.vim import vim_residual_basis

            self.mean_maxlogit = total.values["maxlogit"] / total.n
            self.dim, self.residual_basis = vim_residual_basis(self.detector, total.values["xx"] / total.n, total.n)
        else:
            self.mean_residual = total.values["residual"] / total.n

    def finish(self):
        d = self.detector
        d.origin_, d.residual_basis_, d.dim_ = self.origin, self.residual_basis, self.dim
        d.alpha_ = float(self.mean_maxlogit / self.mean_residual)


class KLMatchingFit(StreamFit):
    def map_signals(self, p, s, offset, i):
        prob = torch.softmax(s.logits.double(), dim=1)
        C = prob.shape[1]
        pred = prob.argmax(dim=1)
        return Sums(len(prob), {"sums": torch.zeros(C, C, dtype=torch.float64).index_add_(0, pred, prob),
                                "counts": torch.bincount(pred, minlength=C).double()})

    def reduce(self, p, parts):
        self.total: Sums = _merged(parts)

    def finish(self):
        from ..detectors.logit_scores import kl_templates

        self.detector.templates_, self.detector.class_counts_ = kl_templates(
            self.total.values["sums"], self.total.values["counts"], self.detector.smoothing)


class ReActFit(StreamFit):
    def __init__(self, detector, shards):
        super().__init__(detector, shards)
        first = shards.array(0, FEATURES.key)
        self.count = self.n * int(np.prod(first.shape[1:]))
        self.ranks = percentile_ranks(self.count, float(detector.percentile))
        self.selector = ExactRankSelector(list(self.ranks), np.float64 if first.dtype == np.float64 else np.float32)
        self.passes = 0 if detector.clip is not None else self.selector.total_bits // ExactRankSelector.BITS

    def map(self, p, i):
        return self.selector.counts_of(np.asarray(self.shards.array(i, FEATURES.key)))

    def reduce(self, p, parts):
        self.selector.start_pass()
        for c in parts:
            self.selector.add_counts(c)
        self.selector.end_pass()

    def finish(self):
        if self.detector.clip is None:
            lo, hi = self.selector.values
            self.detector.clip_ = numpy_linear_percentile(lo, hi, self.count, float(self.detector.percentile))


class RGAdditiveFit(StreamFit):
    def __init__(self, detector, shards):
        super().__init__(detector, shards)
        g = torch.Generator().manual_seed(detector.seed)
        keep = torch.zeros(self.n, dtype=torch.bool)
        keep[torch.randperm(self.n, generator=g)[: min(detector.n_fit, self.n)]] = True
        self.keep = keep

    def map_signals(self, p, s, offset, i):
        from ..detectors.output_feature import _clipped_sum

        rows = self.keep[offset: offset + len(s)]
        energy = torch.logsumexp(s.logits[rows].double(), dim=1)
        clipped = _clipped_sum(s.features[rows].double(), self.detector.k)
        return Moments.of(torch.stack([energy, clipped], dim=1), outer=False)

    def reduce(self, p, parts):
        self.moments: Moments = _merged(parts)

    def finish(self):
        sd_energy, sd_c = (float(v) for v in self.moments.std())
        if not sd_c > 0:
            raise InputError("the clipped feature sum is constant on the fit samples (all features >= k or all zero), "
                             "so alpha is undefined: lower k or check the features.")
        self.detector.alpha_s_ = sd_energy / sd_c
        self.detector.alpha_ = self.detector.m * self.detector.alpha_s_


class KNNFit(StreamFit):
    """Writes the normalised (and ``fraction``-subsampled) bank as shards beside the fit shards."""

    def __init__(self, detector, shards):
        super().__init__(detector, shards)
        keep = torch.ones(self.n, dtype=torch.bool)
        if detector.fraction < 1:
            g = torch.Generator().manual_seed(detector.seed)
            keep = torch.zeros(self.n, dtype=torch.bool)
            keep[torch.randperm(self.n, generator=g)[: max(1, int(round(detector.fraction * self.n)))]] = True
        self.keep = keep
        params = _cache.digest({"normalize": detector.normalize, "fraction": detector.fraction, "seed": detector.seed,
                                "data": shards.key.get("data"), "model": shards.key.get("model")})
        self.bank = Path(self.folder) / f"knn-bank-{params}"

    def map_signals(self, p, s, offset, i):
        z = self.detector._embed(s.features)[self.keep[offset: offset + len(s)]].contiguous()
        path = self.bank / f"bank-{i:06d}.npy"
        _cache.write_verified(path, _cache.array_bytes(z), {"bank shard": i})
        return (str(path), int(len(z)))

    def reduce(self, p, parts):
        self.parts = [(path, rows) for path, rows in parts if rows > 0]

    def finish(self):
        total = sum(rows for _, rows in self.parts)
        if self.detector.k > total:
            raise InputError(f"k={self.detector.k} but the feature bank has only {total} samples: lower k or fit on "
                             "more data.")
        self.detector.bank_ = None  # never in memory: searched shard by shard
        self.detector.bank_shards_ = [path for path, _ in self.parts]


FITTERS: dict[str, type[StreamFit]] = {"Mahalanobis": MahalanobisFit, "ViM": ViMFit, "KLMatching": KLMatchingFit,
                                       "ReAct": ReActFit, "RGAdditive": RGAdditiveFit, "KNN": KNNFit}


#: Detectors whose fit needs the model on every pass: streamed from the input batches, not from signal shards.
MODEL_FITS = ("LowDimGradient", "MahalanobisEnsemble", "FSSD")


def _fitter_for(detector: Any, shards: ShardedSignals) -> StreamFit | None:
    name = type(detector).__name__
    if name in FITTERS:
        return FITTERS[name](detector, shards)
    if name in MODEL_FITS:
        raise ConfigError(f"{detector.label} cannot be fitted from shards yet: its fit runs the model on every pass "
                          "(per-sample gradients, per-layer activations), so stream it from the input data with "
                          "stream.fit_from_data(detector, probe, data) (or distributed.fit_from_data on Ray), then "
                          f"score it from shards as usual. Streamable from shards: {', '.join(sorted(FITTERS))}.")
    if detector._needs_fit():
        raise ConfigError(f"{detector.label} cannot be fitted from shards yet (streamable fits: "
                          f"{', '.join(sorted(FITTERS))}; from the input data with stream.fit_from_data: "
                          f"{', '.join(MODEL_FITS)}); fit it in memory with .fit(signals).")
    return None


def local_map(fitter: StreamFit, p: int) -> Iterator[Any]:
    """One pass's map, here, shard after shard (lazily: the reduce consumes each result before the next)."""
    return (fitter.map(p, i) for i in range(len(fitter.offsets)))


def fit_streaming(detector: Any, shards: ShardedSignals, *, map_shards: MapShards = local_map) -> Any:
    """Fit ``detector`` on the ID signals in ``shards`` one shard at a time; returns the detector.

    ``map_shards`` runs one pass's map over every shard (default: here, in order; :mod:`gradood.distributed`
    passes one that runs them as Ray tasks). The reduce always merges in shard order."""
    first = shards.shard_signals(0)
    first.require(detector.fit_requests())
    detector._record_shapes(first)
    fitter = _fitter_for(detector, shards)
    if fitter is not None:
        for p in range(fitter.passes):
            fitter.reduce(p, map_shards(fitter, p))
        fitter.finish()
    detector.fitted_ = True
    return detector


def block_ranges(n_batches: int, splits: int | None, block_batches: int = 16) -> list[tuple[int, int]]:
    """Consecutive batch ranges ``[b0, b1)`` whose partial sums a model-based fit merges in order: ``splits``
    near-equal blocks, or (None) one per ``block_batches`` batches -- never a function of the number of workers,
    so neither is the fitted state."""
    if n_batches < 1:
        raise InputError("the fit data has no batches.")
    if splits is None:
        splits = -(-n_batches // block_batches)
    if splits < 1:
        raise ConfigError(f"splits must be >= 1, got {splits}.")
    parts = np.array_split(np.arange(n_batches), min(splits, n_batches))
    return [(int(p[0]), int(p[-1]) + 1) for p in parts]


def _model_fit_source(detector: Any, data: Any, batch_size: int, ood_val: Any = None, id_val: Any = None
                      ) -> tuple[Any, Any]:
    """The detector's fit batches (its seeded ``n_fit`` subset of ``data``) as a BatchSource, and the indices."""
    from .._batches import BatchSource
    from ..detectors.lowdim import fit_indices

    if type(detector).__name__ not in MODEL_FITS:
        raise ConfigError(f"fit_from_data streams the fits that run the model on every pass ({', '.join(MODEL_FITS)}); "
                          f"for {detector.label} extract its signals with stream.extract_to_shards and fit with "
                          "stream.fit_streaming (or fit it in memory).")
    if type(detector).__name__ == "LowDimGradient" and (ood_val is not None or id_val is not None):
        raise ConfigError(f"{detector.label} fits on ID data only: it takes no ood_val= or id_val=.")
    source = BatchSource(data, batch_size=batch_size)
    n = source.num_samples
    if n is None:
        raise InputError("fit_from_data needs data of known length (arrays, a (inputs, labels) tuple, a map-style "
                         "Dataset or a DataLoader over one).")
    idx = fit_indices(n, getattr(detector, "n_fit", None), getattr(detector, "seed", 0))
    if idx is None:
        return source, None
    sub = source.subset(idx.tolist())
    if sub is None:
        raise InputError(f"n_fit={detector.n_fit} < {n} samples needs indexable data (arrays or a map-style Dataset) "
                         "to draw the seeded subset: pass one, or n_fit=None.")
    return sub, idx


def fit_from_data(detector: Any, probe: Any, data: Any, *, batch_size: int = 256, splits: int | None = None,
                  progress: bool = True, ood_val: Signals | None = None, id_val: Signals | None = None) -> Any:
    """Fit a detector whose fit runs the model on every pass (``MODEL_FITS``) from ``data`` in batches, with
    memory bounded by its statistics, not by the number of samples; returns the detector.

    * ``lowdim`` (the PCA of per-sample gradients by power iterations, or per-class mean gradients): each pass
      is computed as partial sums over ``splits`` consecutive blocks of batches (default one per 16 batches),
      merged in data order (:mod:`gradood.detectors.lowdim`: moments, ``G^T Y`` and the R factor of Y); the
      head is then fitted on the fit samples' K-dim projections (N x K, the state a KNN head keeps anyway).
    * ``mahalanobis-ensemble``: per-layer class moments of the spatially averaged activations, per block,
      merged in order (:class:`~gradood.stream.stats.ClassMoments`: one D x D scatter per layer, not N x D
      activations); the combiner (mean-z statistics, or the logistic regression on ``id_val`` -- default: the
      fit data's N x L per-layer scores -- against ``ood_val``) and the eps tuning as in memory.
    * ``fssd``: its in-memory fit already keeps only the N x L per-layer distances (the singularities come
      from noise inputs); this runs it on the batches of ``data``.

    :func:`gradood.distributed.fit_from_data` computes the same blocks on a Ray actor pool. Score from shards
    as any detector: ``score_streaming(det, extract_to_shards(probe, test, det.requests(), folder))``."""
    import itertools

    from tqdm.auto import tqdm

    source, _ = _model_fit_source(detector, data, batch_size, ood_val, id_val)
    blocks = block_ranges(source.num_batches, splits)

    def blocks_of(desc: str):
        batches = iter(tqdm(source.iter_batches(), total=source.num_batches, desc=desc, leave=False,
                            disable=None if progress else True))
        return ((b0, itertools.islice(batches, b1 - b0)) for b0, b1 in blocks)

    def fit_signals(requests=()):
        s = Signals(source=source, probe=probe, name="fit", progress=progress)
        s.require(requests)
        return s

    name = type(detector).__name__
    if name == "LowDimGradient":
        from ..detectors.lowdim import merge_in_order, subspace_block

        def run(spec):
            return merge_in_order(subspace_block(spec, probe, batches, first_batch=b0)
                                  for b0, batches in blocks_of(spec.desc))

        return detector.fit_from_passes(probe, run, fit_signals)

    def class_moments(requests, n_classes):
        return merge_moment_lists(block_class_moments(probe, requests, batches, first_batch=b0, who=detector.label,
                                                      n_classes=n_classes)
                                  for b0, batches in blocks_of("class moments"))

    return fit_layer_ensemble(detector, fit_signals(), class_moments, ood_val=ood_val, id_val=id_val)


def block_class_moments(probe: Any, requests: Sequence[Any], batches: Iterable[Any], *, first_batch: int = 0,
                        who: str = "the layer ensemble", n_classes: int | None = None) -> list[ClassMoments]:
    """Per request, the class moments of its rows over ``batches`` (``(x, y)``, labels checked per batch),
    computed with the probe's model alone: what a worker holding the model runs on its block."""
    from ..detectors._checks import check_label_values
    from ..signals import compute_requests

    taps = sorted({t for r in requests for t in r.taps})
    out: list[ClassMoments] | None = None
    for j, (x, y) in enumerate(batches):
        b = first_batch + j
        if y is None:
            raise InputError(f"{who} fits class statistics on true labels, but batch {b} of the fit data has none: "
                             "pass a tuple (inputs, labels), a Dataset or a loader yielding (x, y).")
        y = y.long().view(-1)
        check_label_values(y, who, f"batch {b} of the fit data", n_classes)
        values = compute_requests(probe, x, y, list(requests), b, taps)
        part = [ClassMoments.of(values[r.key], y) for r in requests]
        out = part if out is None else [a.merge(p) for a, p in zip(out, part)]
    if out is None:
        raise InputError("a block of the fit data has no batches.")
    return out


def merge_moment_lists(parts: Iterable[list[ClassMoments]]) -> list[ClassMoments]:
    """Merge per-block lists of class moments in block order."""
    out: list[ClassMoments] | None = None
    for p in parts:
        out = p if out is None else [a.merge(b) for a, b in zip(out, p)]
    if out is None:
        raise InputError("the fit data has no batches.")
    return out


def fit_layer_ensemble(detector: Any, fit: Signals, class_moments: Callable[..., list[ClassMoments]], *,
                       ood_val: Signals | None, id_val: Signals | None) -> Any:
    """``mahalanobis-ensemble`` with its per-layer Gaussians from merged class moments (``class_moments(taps,
    n_classes)``, labels checked against the model's class count),
    everything else as :meth:`Detector.fit`; ``fssd`` by :meth:`Detector.fit` on the lazy ``fit`` signals
    (which keep only its N x L per-layer distances). ``fit`` holds the fit data's batches and the probe."""
    from ..errors import TuningDataError

    if type(detector).__name__ == "FSSD":
        return detector.fit(fit, ood_val=ood_val, id_val=id_val)
    from ..detectors.mahalanobis import TiedGaussian, _warn_if_rank_deficient
    from ..signals import Tap

    if detector.tunes_on_ood and ood_val is None:
        raise TuningDataError(f"{detector.label} tunes on OOD validation data, so fit_from_data() needs "
                              "ood_val=<signals of an OOD validation split> (and ideally id_val=). Or "
                              f"{detector._untuned_hint()}")
    fit.warm_up()
    detector._record_shapes(fit)
    detector.layers_ = detector._resolve_layers(fit)
    moments = class_moments([Tap(layer, "mean") for layer in detector.layers_], fit.known_num_classes())
    gaussians = []
    for layer, m in zip(detector.layers_, moments):
        C = max(m.per_class) + 1
        counts = m.counts(C)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            raise InputError(f"the ID fit data has no samples of classes {missing[:10]} at layer {layer!r}: "
                             "Mahalanobis needs every class's mean. Fit on data covering all classes.")
        cov = m.tied_covariance()
        _warn_if_rank_deficient(cov, int(counts.sum()), m.constant_units(), detector.label,
                                f"{fit.name!r} at layer {layer!r}", C,
                                f"To avoid it: layers= without {layer!r}, or more fit samples.")
        gaussians.append(TiedGaussian.from_moments(m.means(C), cov))
    detector.gaussians_ = tuple(gaussians)
    detector.eps_ = float(detector.eps)
    id_v = id_val if id_val is not None else fit
    if detector.tune_eps:
        detector.eps_ = detector._select_eps(id_v, ood_val)
    detector.combiner_ = detector._fit_combiner(detector.eps_, fit, id_v, ood_val)
    detector._after_fit(fit)
    detector.fitted_ = True
    return detector


def score_streaming(detector: Any, shards: ShardedSignals) -> np.ndarray:
    """Scores of every sample in ``shards`` (float64, higher = more ID), one shard in memory at a time."""
    return np.concatenate([score_shard(detector, s) for s in shards.iter_signals()])


def score_shard(detector: Any, s: Signals) -> np.ndarray:
    if getattr(detector, "bank_shards_", None):
        return _knn_score_from_bank(detector, s)
    return detector.score(s)


def _knn_score_from_bank(detector: Any, s: Signals) -> np.ndarray:
    """``-||z - z_(k)||`` with the k nearest bank rows found shard by shard (faiss when installed)."""
    detector._check_fitted()
    q = detector._embed(s.features)
    best = None
    for path in detector.bank_shards_:
        bank = torch.from_numpy(np.load(path, mmap_mode="r", allow_pickle=False).copy())
        best = merge_smallest(best, _smallest_sqdists(q, bank, detector.k), detector.k)
    assert best is not None
    return (-best[:, detector.k - 1].clamp_min(0).double().sqrt()).numpy()


def _smallest_sqdists(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    from ..detectors.knn import _faiss_available

    k = min(k, len(bank))
    if _faiss_available():
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
        d, _ = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
        return torch.from_numpy(d).to(q.dtype)
    d = (q.pow(2).sum(1, keepdim=True) + bank.pow(2).sum(1) - 2.0 * q @ bank.T).clamp_min_(0.0)
    return torch.topk(d, k, dim=1, largest=False, sorted=True).values


def streamable() -> list[str]:
    """Registry names whose fit can run from shards (every detector without fitted state, plus FITTERS')."""
    from ..detectors import available, create

    return [n for n in available() if type(create(n)).__name__ in FITTERS or not create(n)._needs_fit()]


__all__: Sequence[str] = ["fit_streaming", "fit_from_data", "score_streaming", "streamable", "StreamFit", "FITTERS",
                          "MODEL_FITS"]
