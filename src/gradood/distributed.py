"""gradood on a Ray cluster: signal extraction on a pool of model-holding actors, fits reduced from shards,
scoring on the cluster. Optional: ``pip install gradood[ray]``; nothing else in gradood imports Ray.

::

    from gradood import distributed
    distributed.init("auto")                                  # or None: a local cluster on this machine
    fit = distributed.extract_to_shards(probe, (x, y), det.fit_requests(), "shards/fit", workers=4,
                                        gpus_per_worker=1)    # Ray Data map_batches over an actor pool
    distributed.fit(det, fit)                                 # per-shard statistics as Ray tasks, merged in order
    distributed.fit_from_data(lowdim, probe, (x, y), workers=4) # lowdim: each pass's partial sums on the actors
    scores = distributed.score(det, distributed.extract_to_shards(probe, x_test, det.requests(), "shards/test"))

Extraction runs ``map_batches`` over the batch indices with one actor per worker; each actor holds the model
(on a GPU when ``gpus_per_worker > 0``) and computes every requested signal of its batches exactly as one
process would -- logits, features, taps, per-sample gradients (GRODIN, low-dimensional gradients) and
perturbed-input signals (ODIN, Mahalanobis/FSSD preprocessing). Results stream back in batch order
(``preserve_order``), so the shards, the fitted statistics (merged in shard order) and the scores do not
depend on the number of workers. A killed actor is restarted and its batch retried (Ray Data's actor pools
restart actors and retry their tasks by default): no sample is lost or repeated (tested by killing one).

Where the data lives: in-memory arrays / tensors (or a ``(inputs, labels)`` tuple) are put in Ray's object
store once and sliced by the actors; a map-style ``Dataset`` is sent to the actors and indexed there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import ConfigError, InputError
from .signals import Request

#: Retries of a per-shard fit or score task whose worker died.
RETRIES = 3


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError("the Ray backend needs Ray: pip install 'gradood[ray]' (ray[data]).") from e
    return ray


def init(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address``: ``"auto"``, ``"ray://host:10001"``, ...), or start a local one
    (``address=None``) with ``num_cpus``. Does nothing when Ray is already initialised."""
    ray = _ray()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        # workers import gradood from the same place as this process (an editable checkout or site-packages)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}}
    else:
        kwargs["address"] = address
    ray.init(**kwargs)


# ---------------------------------------------------------------------- the actor
class SignalActor:
    """Holds the model and a probe; turns a batch of batch indices into the requested signals' rows."""

    def __init__(self, model: torch.nn.Module, probe_kwargs: dict[str, Any], data_ref: Any, batch_size: int,
                 requests: Sequence[Request]) -> None:
        import ray

        from .probe import Probe

        torch.set_num_threads(1)  # one core per actor: the pool is the parallelism
        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.probe = Probe(model.to(device).eval(), **probe_kwargs)
        self.data = ray.get(data_ref) if isinstance(data_ref, ray.ObjectRef) else data_ref
        self.batch_size = batch_size
        self.requests = list(requests)
        self.taps = sorted({t for r in self.requests for t in r.taps})

    def _batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        lo = b * self.batch_size
        x, y = self.data
        if isinstance(x, np.ndarray):
            hi = min(lo + self.batch_size, len(x))
            xs = torch.from_numpy(np.array(x[lo:hi]))
            ys = None if y is None else torch.from_numpy(np.array(y[lo:hi]))
        else:  # a map-style Dataset yielding x or (x, y)
            hi = min(lo + self.batch_size, len(x))
            items = [x[i] for i in range(lo, hi)]
            pairs = [it if isinstance(it, (tuple, list)) else (it, None) for it in items]
            xs = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            ys = None if pairs[0][1] is None else torch.as_tensor([int(p[1]) for p in pairs])
        return xs, ys, np.arange(lo, hi)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .signals import compute_requests

        cols: dict[str, list[np.ndarray]] = {"index": [], "labels": []}
        for b in batch["data"].tolist():
            x, y, index = self._batch(int(b))
            values = compute_requests(self.probe, x, y, self.requests, int(b), self.taps)
            cols["index"].append(index)
            cols["labels"].append(np.full(len(index), -2) if y is None else y.long().numpy())
            for i, r in enumerate(self.requests):
                cols.setdefault(f"s{i}", []).append(values[r.key].numpy())
        return {k: np.concatenate(v) for k, v in cols.items()}


def _data_ref(data: Any) -> tuple[Any, int]:
    """What the actors read the inputs from, and the number of samples."""
    from torch.utils.data import DataLoader, Dataset

    ray = _ray()
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (int, float)):
        x, y = data
    else:
        x, y = data, None
    if isinstance(x, Dataset) and not isinstance(x, DataLoader):
        return (x, None), len(x)  # type: ignore[arg-type]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(f"the Ray backend reads in-memory arrays, a (inputs, labels) tuple of them, or a map-style "
                         f"Dataset; got {type(x).__name__}. A DataLoader cannot be split among workers: pass its "
                         "dataset.")
    if y is not None and len(y) != len(x):
        raise InputError(f"inputs have {len(x)} samples but labels have {len(y)}; pass matching arrays.")
    return ray.put((x, y)), len(x)


def _probe_kwargs(probe: Any) -> dict[str, Any]:
    return {"head": probe.head_name or getattr(probe, "requested_head", None), "input_std": probe.input_std,
            "input_mean": probe.input_mean}


def iter_signal_batches(probe: Any, data: Any, requests: Sequence[Request], *, workers: int = 2,
                        gpus_per_worker: float = 0, batch_size: int = 256):
    """Yield ``(index, labels, {request key: rows})`` in sample order, computed on a pool of ``workers``
    actors by Ray Data ``map_batches``."""
    ray = _ray()
    init(None) if not ray.is_initialized() else None
    import ray.data

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
    ref, n = _data_ref(data)
    if probe.head_name is None:  # find the head here too: shards record its weights (ReAct, ViM read them)
        from ._batches import BatchSource

        for x, _ in BatchSource(data, batch_size=min(batch_size, 8)).iter_batches():
            probe.forward(x, batch_index=0)
            break
    if n == 0:
        raise InputError("the dataset is empty: there are no samples to extract.")
    n_batches = (n + batch_size - 1) // batch_size
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    requests = list(dict.fromkeys(requests))
    model = probe.model
    # batch indices as in-memory blocks: no read task competes with the actors for the cluster's CPUs
    blocks = np.array_split(np.arange(n_batches), min(n_batches, 4 * workers))
    ds = ray.data.from_numpy([b for b in blocks if len(b)]).map_batches(
        SignalActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker or None, num_cpus=1,
        fn_constructor_kwargs={"model": model, "probe_kwargs": _probe_kwargs(probe), "data_ref": ref,
                               "batch_size": batch_size, "requests": requests})
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        labels = out["labels"]
        yield out["index"], (None if len(labels) and labels[0] == -2 else labels), {
            r.key: out[f"s{i}"] for i, r in enumerate(requests)}


def extract(probe: Any, data: Any, requests: Sequence[Request], *, workers: int = 2, gpus_per_worker: float = 0,
            batch_size: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every request's signal for ``data`` (in memory, sample order) and the labels, computed on Ray."""
    chunks: dict[str, list[np.ndarray]] = {r.key: [] for r in requests}
    index, labels = [], []
    for idx, lab, values in iter_signal_batches(probe, data, requests, workers=workers,
                                                gpus_per_worker=gpus_per_worker, batch_size=batch_size):
        index.append(idx)
        labels.append(lab)
        for k, v in values.items():
            chunks[k].append(v)
    order = np.concatenate(index)
    if not np.array_equal(order, np.arange(len(order))):
        raise RuntimeError("Ray returned the samples out of order or incomplete; refusing to use them.")
    y = None if any(lab is None for lab in labels) else torch.from_numpy(np.concatenate(labels))
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in chunks.items()}, y


def extract_to_shards(probe: Any, data: Any, requests: Sequence[Request], folder: str | Path, *, workers: int = 2,
                      gpus_per_worker: float = 0, batch_size: int = 256, shard_rows: int = 16384,
                      name: str | None = None):
    """:func:`gradood.stream.extract_to_shards` with the forward passes on a Ray actor pool; the driver writes
    the shards in order as the batches stream back, so its memory is one shard."""
    from .stream.shards import ShardWriter, extraction_key, finish_extraction

    folder = Path(folder)
    requests = list(dict.fromkeys(requests))
    key = extraction_key(probe, requests)
    writer = ShardWriter(folder, [r.key for r in requests], key, shard_rows, name or folder.name)
    seen = 0
    for idx, lab, values in iter_signal_batches(probe, data, requests, workers=workers,
                                                gpus_per_worker=gpus_per_worker, batch_size=batch_size):
        if not np.array_equal(idx, np.arange(seen, seen + len(idx))):
            raise RuntimeError("Ray returned the samples out of order or incomplete; refusing to write them.")
        seen += len(idx)
        writer.append(values, lab, seen, "")  # no resume on the cluster path: a rerun re-extracts
    writer.flush(seen, "")
    return finish_extraction(writer, probe, {**key, "data": data_digest(data, batch_size)})


def data_digest(data: Any, batch_size: int) -> str:
    """The same data key a single-process extraction records (hash of the input batches)."""
    from . import cache as _cache
    from ._batches import BatchSource

    hasher = _cache.DataHasher()
    for x, y in BatchSource(data, batch_size=batch_size).iter_batches():
        hasher.update(x, y)
    return hasher.digest()


# ---------------------------------------------------------------------- fit and score
def _remote_map(fitter: Any, p: int, i: int) -> Any:
    return fitter.map(p, i)


def ray_map_shards(fitter: Any, p: int):
    """One pass of a streamed fit as Ray tasks, one per shard, all submitted at once; the results are fetched
    one by one in shard order, so the driver holds one shard's statistic besides the running total."""
    ray = _ray()
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_remote_map)
    ref = ray.put(fitter)
    for result in [task.remote(ref, p, i) for i in range(len(fitter.offsets))]:
        yield ray.get(result)


def fit(detector: Any, shards: Any) -> Any:
    """Fit ``detector`` from ID shards with per-shard statistics computed as Ray tasks (merged in shard order,
    so the result equals :func:`gradood.stream.fit_streaming`'s)."""
    from .stream.fit import fit_streaming

    _ray()
    init(None)
    return fit_streaming(detector, shards, map_shards=ray_map_shards)


def _remote_score(detector: Any, folder: str, i: int) -> np.ndarray:
    from .stream.fit import score_shard
    from .stream.shards import ShardedSignals

    return score_shard(detector, ShardedSignals(folder, verify=False).shard_signals(i))


def score(detector: Any, shards: Any) -> np.ndarray:
    """Scores of every sample in ``shards`` as Ray tasks, one per shard, concatenated in order."""
    ray = _ray()
    init(None)
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_remote_score)
    ref = ray.put(detector)
    return np.concatenate(ray.get([task.remote(ref, str(shards.folder), i) for i in range(len(shards.shards))]))


# ---------------------------------------------------------------------- fits that run the model on every pass
class ModelActor:
    """Holds the model and the fit data; computes one pass's partial sums over a block of consecutive batches
    (:func:`gradood.detectors.lowdim.subspace_block`), or the rows of some requests for a block."""

    def __init__(self, model: torch.nn.Module, probe_kwargs: dict[str, Any], data_ref: Any, batch_size: int) -> None:
        import ray

        from .probe import Probe

        torch.set_num_threads(1)  # one core per actor: the pool is the parallelism
        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.probe = Probe(model.to(device).eval(), **probe_kwargs)
        self.data = ray.get(data_ref) if isinstance(data_ref, ray.ObjectRef) else data_ref
        self.batch_size = batch_size

    def _source(self, b0: int, b1: int):
        from torch.utils.data import Subset

        from ._batches import BatchSource

        x, y = self.data
        lo, hi = b0 * self.batch_size, min(b1 * self.batch_size, len(x))
        if isinstance(x, np.ndarray):
            part = (torch.from_numpy(np.array(x[lo:hi])), None if y is None else torch.from_numpy(np.array(y[lo:hi])))
        else:  # a map-style Dataset
            part = Subset(x, range(lo, hi))
        return BatchSource(part, batch_size=self.batch_size)

    def block(self, spec: Any, b0: int, b1: int) -> Any:
        from .detectors.lowdim import subspace_block

        return subspace_block(spec, self.probe, self._source(b0, b1).iter_batches(), first_batch=b0)

    def class_moments(self, requests: Sequence[Request], b0: int, b1: int, who: str, n_classes: int | None) -> Any:
        from .stream.fit import block_class_moments

        return block_class_moments(self.probe, requests, self._source(b0, b1).iter_batches(), first_batch=b0,
                                   who=who, n_classes=n_classes)

    def rows(self, requests: Sequence[Request], b0: int, b1: int) -> tuple[dict[str, torch.Tensor], Any]:
        from .signals import compute_requests

        taps = sorted({t for r in requests for t in r.taps})
        out: dict[str, list[torch.Tensor]] = {r.key: [] for r in requests}
        labels: list[Any] = []
        for j, (x, y) in enumerate(self._source(b0, b1).iter_batches()):
            values = compute_requests(self.probe, x, y, requests, b0 + j, taps)
            labels.append(y)
            for k, v in values.items():
                out[k].append(v)
        y = None if any(v is None for v in labels) else torch.cat([v.long().view(-1) for v in labels])
        return {k: torch.cat(v) for k, v in out.items()}, y


def _take(data: Any, idx: np.ndarray | None) -> Any:
    """``data`` restricted to the sample indices ``idx`` (arrays are sliced, a Dataset wrapped in a Subset)."""
    from torch.utils.data import Dataset, Subset

    if idx is None:
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (int, float)):
        return tuple(None if d is None else _take(d, idx) for d in data)
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return data[torch.as_tensor(idx) if isinstance(data, torch.Tensor) else idx]
    raise InputError(f"the Ray backend reads in-memory arrays, a (inputs, labels) tuple of them, or a map-style "
                     f"Dataset; got {type(data).__name__}.")


def fit_from_data(detector: Any, probe: Any, data: Any, *, workers: int = 2, gpus_per_worker: float = 0,
                  batch_size: int = 256, splits: int | None = None, ood_val: Any = None, id_val: Any = None) -> Any:
    """:func:`gradood.stream.fit_from_data` on a pool of ``workers`` Ray actors that each hold the model (and
    a GPU when ``gpus_per_worker > 0``): every pass of the low-dimensional gradients' subspace fit (or the
    per-layer class moments of ``mahalanobis-ensemble``) is computed as partial sums over consecutive blocks of
    batches (``splits``; default one per 16 batches, not a function of ``workers``), one block per actor task;
    the driver merges them in data order and does the QR between passes. Equal to the single-process streamed
    fit with the same ``splits`` (the same partials, merged in the same order), and to the in-memory fit to
    float64 round-off. The lowdim head's projections come from the same pool; the ensembles' per-layer scores
    (and ``fssd``'s whole fit) from the Ray signal extraction (:class:`RayExecutor`). Returns the detector."""
    from ray.util import ActorPool

    from .detectors.lowdim import merge_in_order
    from .signals import Signals
    from .stream.fit import _model_fit_source, block_ranges, fit_layer_ensemble, merge_moment_lists

    ray = _ray()
    init(None) if not ray.is_initialized() else None
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.")
    source, idx = _model_fit_source(detector, data, batch_size, ood_val, id_val)
    blocks = block_ranges(source.num_batches, splits)
    if type(detector).__name__ != "LowDimGradient":
        fit = Signals(source=source, probe=probe, name="fit", progress=False)
        fit.executor = RayExecutor(workers, gpus_per_worker)
        if type(detector).__name__ == "FSSD":  # no class statistics: no pool of our own
            return fit_layer_ensemble(detector, fit, lambda *a: [], ood_val=ood_val, id_val=id_val)
    ref, _ = _data_ref(_take(data, idx))
    actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker or 0, max_restarts=RETRIES,
                       max_task_retries=RETRIES)(ModelActor)
    actors = [actor.remote(probe.model, _probe_kwargs(probe), ref, batch_size)
              for _ in range(min(workers, len(blocks)))]
    pool = ActorPool(actors)

    def run(spec):
        spec_ref = ray.put(spec)  # the P x K directions go to the object store once per pass
        return merge_in_order(pool.map(lambda a, blk: a.block.remote(spec_ref, *blk), blocks))

    def kill_pool() -> None:
        for a in actors:
            ray.kill(a)

    if type(detector).__name__ != "LowDimGradient":
        def class_moments(requests, n_classes):
            try:
                return merge_moment_lists(pool.map(lambda a, blk: a.class_moments.remote(
                    requests, *blk, detector.label, n_classes), blocks))
            finally:  # free the CPUs before the per-layer scores are extracted on Ray Data's own actors
                kill_pool()

        try:
            return fit_layer_ensemble(detector, fit, class_moments, ood_val=ood_val, id_val=id_val)
        finally:
            kill_pool()

    def fit_signals(requests):
        if probe.head_name is None:  # the head, for the class count and the model contract
            for x, _ in source.iter_batches():
                probe.forward(x, batch_index=0)
                break
        parts = list(pool.map(lambda a, blk: a.rows.remote(requests, *blk), blocks))
        labels = None if any(y is None for _, y in parts) else torch.cat([y for _, y in parts])
        tensors = {r.key: torch.cat([p[r.key] for p, _ in parts]) for r in requests}
        return Signals(tensors=tensors, labels=labels, probe=probe, name="lowdim fit", progress=False)

    try:
        return detector.fit_from_passes(probe, run, fit_signals)
    finally:
        kill_pool()


class RayExecutor:
    """Plugged into :class:`gradood.Signals` (``signals.executor``) so that every lazy extraction -- including
    the perturbation and gradient signals detectors ask for while fitting -- runs on the actor pool."""

    def __init__(self, workers: int = 2, gpus_per_worker: float = 0) -> None:
        self.workers, self.gpus_per_worker = workers, gpus_per_worker

    def extract(self, source: Any, probe: Any, requests: Sequence[Request]) -> tuple[dict[str, torch.Tensor],
                                                                                     torch.Tensor | None]:
        arrays = getattr(source, "_arrays", None)
        data = arrays if arrays is not None else getattr(getattr(source, "data", None), "dataset", None)
        if data is None:
            raise InputError("the Ray backend needs in-memory arrays or a map-style Dataset to split among workers.")
        return extract(probe, data, requests, workers=self.workers, gpus_per_worker=self.gpus_per_worker,
                       batch_size=source.batch_size)
