"""``gradood bench``: run a benchmark spec end to end, resumably.

For each run (one model, one ID set): load and validate every dataset, extract signals once per
(model, dataset) into an on-disk cache (resumable mid-pass), then fit and score each detector. Detectors
that tune on OOD data are fitted once per OOD set on that set's held-out validation split; every detector
is tested on the same test splits. Each detector's scores and metrics are written atomically as soon as it
finishes, so an interrupted run resumes at the first unfinished detector and gives the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, GradoodError, NotApplicableError, OutputError
from ..probe import Probe
from .. import cache as _cache
from ..cache import atomic_write_bytes
from ..signals import FEATURES, LOGITS, Signals
from .spec import BenchSpec, DataRef, DetectorRef, RunSpec, load_spec

METRIC_KEYS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr80", "detection_error")


# ---------------------------------------------------------------------- models and data
@dataclass
class ModelInfo:
    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    head: str | None
    num_classes: int | None
    fingerprint: str = ""  # of the model (gradood.cache.model_fingerprint): part of the results' key
    encode: Any = None  # text models: their tokenizer (texts -> keyword tensors); None for image models


def load_model(name: str) -> ModelInfo:
    from .. import models

    model, meta = models.load(name)
    get = (lambda k, d=None: meta.get(k, d)) if isinstance(meta, dict) else (lambda k, d=None: getattr(meta, k, d))
    encode = models.tokenizer(name) if get("modality", "image") == "text" else None
    return ModelInfo(model=model.eval(), mean=tuple(get("mean")), std=tuple(get("std")),
                     input_shape=tuple(get("input_shape")), head=get("head"), num_classes=get("num_classes"),
                     fingerprint=model_fingerprint(model), encode=encode)


#: weights, buffers, classes and their source (the same fingerprint keys the cached signals)
model_fingerprint = _cache.model_fingerprint


@functools.lru_cache(maxsize=None)
def source_fingerprint(*parts: str) -> str:
    """sha256 (12 hex digits) of gradood's source files under ``parts`` (paths relative to the package; the
    whole package when empty), so that a changed gradood never reuses results the old code computed."""
    root = Path(__file__).resolve().parent.parent
    files = []
    for part in parts or ("",):
        p = root / part
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def load_data(ref: DataRef, info: ModelInfo, seed: int, where: str):
    """The ArrayDataset of a spec entry, subset/resized/re-channelled, checked against the model's input."""
    from .. import data

    options = dict(ref.options)
    if ref.dataset in ("uniform_noise", "gaussian_noise"):
        options.setdefault("shape", list(info.input_shape))
        options.setdefault("n", ref.n or 1000)
        options.setdefault("seed", seed)
    ds = data.load(ref.dataset, ref.split, root=ref.root, **options)
    if ref.start is not None or ref.stop is not None:
        ds = ds.subset(np.arange(len(ds))[ref.start:ref.stop])
    if ref.n is not None and ref.n > len(ds):
        raise ConfigError(
            f"{where}: {ref.label} asks for n = {ref.n} samples but has only {len(ds)}"
            f"{' in start/stop' if ref.start is not None or ref.stop is not None else ''}: lower n to at most "
            f"{len(ds)} or remove it to use every sample.")
    if ref.n is not None and ref.n < len(ds):
        ds = ds.sample(ref.n, seed=seed)
    if isinstance(ds, data.TextDataset):  # texts: the model's tokenizer makes its inputs (no shapes to check)
        return ds
    if ref.resize is not None:
        ds = ds.resized(ref.resize)
    if ref.channels is not None:
        ds = ds.with_channels(ref.channels)
    if tuple(ds.shape) != tuple(info.input_shape):
        raise ConfigError(
            f"{where}: {ref.label} has images of shape {tuple(ds.shape)} but the model expects "
            f"{tuple(info.input_shape)}. Add resize = {info.input_shape[-1]} and/or channels = {info.input_shape[0]} "
            "to this dataset entry."
        )
    return ds


def split_holdout(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded validation hold-out of ``n_val`` samples and of the remaining test part."""
    if not 1 <= n_val <= n // 2:
        raise ConfigError(f"cannot hold out {n_val} of {n} samples for validation: ood_val must be between 1 and "
                          f"half the OOD set ({n // 2}), so that its test part stays at least as large.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def validate_data(spec: BenchSpec) -> None:
    """Load every dataset entry of every run once (no model weights) and report every size or shape problem
    together, before any extraction starts: n larger than the data, ood_val larger than half an OOD set,
    images that do not fit the model."""
    from .. import models

    problems: list[str] = []
    for run in spec.runs:
        where = f"run {run.model}"
        meta = models.describe(run.model)
        shape_only = ModelInfo(model=None, mean=tuple(meta.mean), std=tuple(meta.std),  # type: ignore[arg-type]
                               input_shape=tuple(meta.input_shape), head=meta.head, num_classes=meta.num_classes)
        for ref in (run.id_fit, run.id_test, run.id_val, *run.oods):
            if ref is None:
                continue
            try:
                n = len(load_data(ref, shape_only, spec.seed, where))
                if ref in run.oods and not 1 <= spec.ood_val <= n // 2:
                    problems.append(f"{where}: ood_val = {spec.ood_val} but the OOD set {ref.label} has {n} samples: "
                                    f"hold out at most half ({n // 2}) or add samples, so that its test part "
                                    "is not silently shrunk.")
            except ConfigError as e:
                problems.append(str(e))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{spec.source or spec.name} has {len(problems)} problems:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------- results store
class ResultStore:
    """One JSON (metric rows) + one NPZ (scores) per (run, detector), each written atomically with a checksum
    file (``<file>.sha256``) after it; the JSON's checksum file marks "done". A file that fails its check on
    reading is named in a warning, deleted, and the detector is recomputed. The files hold no timings, so the
    same spec on the same machine writes the same bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, run_key: str, det_key: str) -> tuple[Path, Path]:
        d = self.root / "runs" / run_key
        return d / f"{det_key}.json", d / f"{det_key}.npz"

    def load(self, run_key: str, det_key: str) -> tuple[list[dict], dict[str, np.ndarray]] | None:
        js, npz = self._paths(run_key, det_key)
        if not (js.exists() or _cache.sidecar(js).exists()):
            return None
        rows = _cache.load_json(js)
        scores = _cache.load_npz(npz) if rows is not None else None
        if rows is None or scores is None or not isinstance(rows, list):
            for p in (js, npz):  # recompute both: a half-verified pair is not a result
                if p.exists() or _cache.sidecar(p).exists():
                    _cache.discard(p, "belongs to a result that failed its checksum")
            return None
        return rows, scores

    def save(self, run_key: str, det_key: str, rows: list[dict], scores: dict[str, np.ndarray]) -> None:
        js, npz = self._paths(run_key, det_key)
        _cache.write_verified(npz, _cache.npz_bytes(scores))  # scores first: the JSON marks completion
        _cache.write_verified(js, json.dumps(rows, indent=1, default=float).encode())


# ---------------------------------------------------------------------- one run
@dataclass
class Prepared:
    info: ModelInfo
    probe: Probe
    fit: Signals
    val: Signals
    test: Signals
    ood_val: dict[str, Signals]
    ood_test: dict[str, Signals]
    groups: dict[str, str]
    accuracy: float | None


def run_key(spec: BenchSpec, run: RunSpec, model_fp: str = "", data: tuple[str | None, ...] = ()) -> str:
    """Names a run's results folder: the run's data (spec entries and the sha256 of every set's batches, see
    Signals.data_digest), the model (weights, classes) and gradood's whole source (any change to one of them
    starts a fresh folder instead of mixing old and new results)."""
    ids = "|".join([run.model, run.id_fit.key(spec.seed), run.id_test.key(spec.seed),
                    run.id_val.key(spec.seed) if run.id_val else "-", str(spec.ood_val), model_fp,
                    source_fingerprint()] + [o.key(spec.seed) for o in run.oods] + [str(d) for d in data])
    return f"{run.model}__{run.id_test.dataset}__{hashlib.sha256(ids.encode()).hexdigest()[:10]}"


def signals_folder(cache: Path, model: str) -> Path:
    """Where a model's cached signals live. The folder is for people: every array in it is stored under its
    full content key (data, model, code, probe; gradood.cache), so nothing stale can be read from it."""
    return cache / "signals" / model


def prepare(spec: BenchSpec, run: RunSpec, cache: Path, progress: bool, executor: Any = None) -> Prepared:
    info = load_model(run.model)
    probe = Probe(info.model, head=info.head, input_std=info.std or None, input_mean=info.mean or None)
    where = f"run {run.model}"

    def signals(ref: DataRef, name: str, idx: np.ndarray | None = None) -> Signals:
        ds = load_data(ref, info, spec.seed, where)
        if idx is not None:
            ds = ds.subset(idx)
        x, y = ds.encode(info.encode) if info.encode is not None else ds.tensors(mean=info.mean, std=info.std)
        folder = signals_folder(cache, run.model)
        s = Signals(source=_source(x, y, spec.batch_size), probe=probe, name=name, cache_dir=folder,
                    progress=progress, checkpoint_every=spec.checkpoint_every)
        s.executor = executor  # None: this process; a RayExecutor: an actor pool (gradood bench --ray)
        return s

    fit = signals(run.id_fit, f"{run.id_fit.label} (fit)")
    test = signals(run.id_test, f"{run.id_test.label} (test)")
    val = signals(run.id_val, f"{run.id_val.label} (val)") if run.id_val is not None else fit
    ood_val, ood_test, groups = {}, {}, {}
    for i, o in enumerate(run.oods):
        ds = load_data(o, info, spec.seed, where)
        vi, ti = split_holdout(len(ds), spec.ood_val, spec.seed + 1000 + i)
        if getattr(ds, "val_rows", None) is not None:  # an official validation part (CLINC150 oos): use it
            vi = ds.val_rows
            ti = np.setdiff1d(np.arange(len(ds)), vi)
        ood_val[o.label] = signals(o, f"{o.label} (val)", vi)
        ood_test[o.label] = signals(o, f"{o.label} (test)", ti)
        groups[o.label] = o.group
    # One pass per dataset for every forward-only signal the detectors share.
    for s in [fit, test, val, *ood_test.values(), *ood_val.values()]:
        s.require([LOGITS, FEATURES])
    acc = None
    if test.labels is not None and bool((test.labels >= 0).all()):
        acc = float((test.logits.argmax(1) == test.labels).double().mean())
    return Prepared(info, probe, fit, val, test, ood_val, ood_test, groups, acc)


def _source(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    from .._batches import BatchSource

    return BatchSource((x, y), batch_size=batch_size)


def evaluate_detector(ref: DetectorRef, p: Prepared, bootstrap: int, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Fit and score one detector on one run; returns metric rows and the raw scores. Warnings the detector
    raises (e.g. RG's energy <= 0) are recorded in the rows' ``warnings`` instead of interleaving the output."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, scores = _fit_and_score(ref, p, bootstrap, seed)
    # the cache's notes are about this machine's folder, not the detector: shown, never stored in a result
    for w in caught:
        if issubclass(w.category, _cache.CacheWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    messages = sorted({str(w.message) for w in caught if not issubclass(w.category, _cache.CacheWarning)})
    for r in rows:
        r["warnings"] = messages
    return rows, scores


def _fit_and_score(ref: DetectorRef, p: Prepared, bootstrap: int, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    from .. import create
    from ..metrics import evaluate

    det = create(ref.name, **ref.params)
    rows: list[dict] = []
    scores: dict[str, np.ndarray] = {}
    if det.tunes_on_ood:
        for ood_name in p.ood_test:
            det = create(ref.name, **ref.params).fit(p.fit, ood_val=p.ood_val[ood_name], id_val=p.val)
            s_id, s_ood = det.score(p.test), det.score(p.ood_test[ood_name])
            scores[f"id::{ood_name}"], scores[ood_name] = s_id, s_ood
            rows.append(_row(ref, det, ood_name, p, evaluate(s_id, s_ood, bootstrap=bootstrap, seed=seed)))
    else:
        det.fit(p.fit)
        scores["id"] = det.score(p.test)
        for ood_name, ood in p.ood_test.items():
            scores[ood_name] = det.score(ood)
            rows.append(_row(ref, det, ood_name, p, evaluate(scores["id"], scores[ood_name], bootstrap=bootstrap,
                                                             seed=seed)))
    return rows, scores


def _row(ref: DetectorRef, det: Any, ood_name: str, p: Prepared, metrics: dict) -> dict:
    out = {"detector": ref.display, "tunes_on_ood": bool(det.tunes_on_ood), "ood_set": ood_name,
           "ood_group": p.groups[ood_name], "params": json.dumps(ref.params, sort_keys=True, default=str)}
    for k, v in metrics.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------- whole benchmark
def validate_names(spec: BenchSpec) -> None:
    """Check every model, dataset and split name before anything is downloaded or run."""
    from .. import data, models

    for run in spec.runs:
        models.describe(run.model)
        for ref in (run.id_fit, run.id_test, run.id_val, *run.oods):
            if ref is None:
                continue
            ds = data.describe(ref.dataset)
            if ref.split is not None and ref.split not in ds.splits:
                raise ConfigError(f"run {run.model}: dataset {ref.dataset!r} has no split {ref.split!r}; "
                                  f"its splits are {', '.join(ds.splits)}.")


def run_benchmark(spec: BenchSpec, out: Path, cache: Path | None = None, *, only: list[str] | None = None,
                  progress: bool = True, log=print, executor: Any = None,
                  not_applicable: list[str] | None = None) -> tuple[list[dict], dict, list[str]]:
    """Run every (run, detector); returns (rows, scores for the report, error messages). ``executor`` computes
    the signals elsewhere (:class:`gradood.distributed.RayExecutor` for ``--ray``). A detector whose method does
    not apply to a model (:class:`~gradood.errors.NotApplicableError`) is an error unless ``not_applicable`` is
    a list, which then collects its message (``gradood bench`` reports these apart from failures)."""
    from tqdm.auto import tqdm

    validate_names(spec)
    validate_data(spec)
    cache = cache or out / "cache"
    store = ResultStore(out)
    all_rows: list[dict] = []
    report_scores: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    errors: list[str] = []
    for run in spec.runs:
        refs = [r for r in run.detectors if only is None or r.display in only or r.name in only]
        if only is not None and not refs:
            continue
        t0 = time.perf_counter()
        p = prepare(spec, run, cache, progress, executor)
        key = run_key(spec, run, p.info.fingerprint, tuple(
            s.data_digest() for s in [p.fit, p.val, p.test, *p.ood_val.values(), *p.ood_test.values()]))
        log(f"[{run.model}] ID {run.id_test.label}: accuracy "
            f"{'n/a' if p.accuracy is None else f'{100 * p.accuracy:.2f}%'}, fit {len(p.fit)}, test {len(p.test)}, "
            f"OOD {', '.join(f'{k} {len(v)}' for k, v in p.ood_test.items())} ({time.perf_counter() - t0:.1f} s)")
        bar = tqdm(refs, desc=f"detectors {run.model}", unit="det", disable=not progress, leave=False)
        for ref in bar:
            bar.set_postfix_str(ref.display)
            done = store.load(key, ref.key())
            if done is None:
                t_det = time.perf_counter()
                try:
                    rows, scores = evaluate_detector(ref, p, spec.bootstrap, spec.seed)
                except NotApplicableError as e:
                    # the method does not exist for this architecture: reported, not a failed run
                    if not_applicable is None:
                        errors.append(f"{run.model} / {ref.display}: {e}")
                    else:
                        not_applicable.append(f"{run.model} / {ref.display}: {e}")
                    continue
                except GradoodError as e:
                    errors.append(f"{run.model} / {ref.display}: {e}")
                    continue
                except Exception as e:  # a detector's bug must not lose the other detectors' results
                    errors.append(f"{run.model} / {ref.display}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                    continue
                store.save(key, ref.key(), rows, scores)
                # timings are printed, never stored: result files are byte-identical across reruns
                line = f"  {ref.display}: {time.perf_counter() - t_det:.1f} s" + ("" if rows else " (no rows)")
                if progress:
                    bar.write(line, file=sys.stderr)  # above the live bar instead of through it
                else:
                    log(line)
                done = (rows, scores)
            rows, scores = done
            for r in rows:
                r.update(model=run.model, id_dataset=run.id_test.label, accuracy=p.accuracy)
            all_rows.extend(rows)
            report_scores[(run.model, run.id_test.label, ref.display)] = _report_scores(scores)
        bar.close()
    return all_rows, report_scores, errors


def _report_scores(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scores as the report takes them: ``"id"`` or, for OOD-tuned detectors, ``"id::<ood set>"`` (ID scores
    under the hyperparameters tuned for that OOD set), plus one array per OOD set."""
    return dict(scores)


def print_tables(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(140, Console().width))
    by_run: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_run.setdefault((r["model"], r["id_dataset"]), []).append(r)
    for (model, id_ds), rs in by_run.items():
        oods = list(dict.fromkeys(r["ood_set"] for r in rs))
        acc = rs[0].get("accuracy")
        t = Table(title=f"{model} | ID = {id_ds}" + (f" (accuracy {100 * acc:.2f}%)" if acc else "")
                  + " | AUROC % / FPR95 %  († = tuned on OOD validation data)", title_justify="left")
        t.add_column("detector")
        for o in oods:
            group = next(r["ood_group"] for r in rs if r["ood_set"] == o)
            t.add_column(f"{o} ({group})", justify="right")
        t.add_column("mean", justify="right")
        best = {o: max(r["auroc"] for r in rs if r["ood_set"] == o) for o in oods}
        for det in dict.fromkeys(r["detector"] for r in rs):
            cells, aucs, fprs = [], [], []
            mark = ""
            for o in oods:
                r = next((r for r in rs if r["detector"] == det and r["ood_set"] == o), None)
                if r is None:
                    cells.append("")
                    continue
                mark = " †" if r["tunes_on_ood"] else ""
                cell = f"{100 * r['auroc']:.2f} / {100 * r['fpr95']:.2f}"
                cells.append(f"[bold]{cell}[/bold]" if r["auroc"] == best[o] else cell)
                aucs.append(r["auroc"])
                fprs.append(r["fpr95"])
            mean = f"{100 * np.mean(aucs):.2f} / {100 * np.mean(fprs):.2f}" if aucs else ""
            t.add_row(det + mark, *cells, mean)
        console.print(t)


def default_out(spec: BenchSpec) -> Path:
    """``./gradood-results`` for the default spec, ``./gradood-results-<name>`` for any other."""
    if spec.name == "default":
        return Path("gradood-results")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name).strip(".") or "spec"
    return Path(f"gradood-results-{safe}")


def check_writable(folder: Path, option: str) -> None:
    """Fail before any work when ``folder`` cannot hold results: a file in the way, no permission, full disk."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder: pass a folder path (it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / ".gradood-write-test", b"ok")
        (folder / ".gradood-write-test").unlink()
    except OSError as e:
        raise OutputError(f"{option} {folder} cannot be written ({e.strerror or e}): choose a writable folder "
                          "with free space.") from e


@contextlib.contextmanager
def clear_write_errors(out: Path):
    """Turn an OSError while writing results (disk full mid-run, folder removed) into an error naming the
    folder and the fix; results finished before it stay on disk and a rerun resumes after them."""
    try:
        yield
    except OSError as e:
        if isinstance(e, GradoodError):
            raise
        where = e.filename or out
        raise OutputError(f"could not write {where} ({e.strerror or e}): free disk space or pass --out/--cache "
                          "elsewhere, then rerun the same command to resume.") from e


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..grads import tune_allocator

    # A benchmark process re-allocates the same large tensors every batch: keep freed memory for reuse
    # instead of page-faulting it in again each time (docs/design.md, "Performance").
    tune_allocator()

    if getattr(args, "example_spec", False) or getattr(args, "spec_reference", False):
        from .spec import example_spec, spec_reference_markdown

        print(example_spec() if args.example_spec else spec_reference_markdown(), end="")
        return 0
    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else default_out(spec)
    cache = Path(args.cache) if args.cache else None
    only = [d.strip() for d in args.detectors.split(",")] if args.detectors else None
    console = Console(stderr=True)
    check_writable(out, "--out")
    if cache is not None:
        check_writable(cache, "--cache")
    t0 = time.perf_counter()
    executor = None
    if getattr(args, "ray", None) is not None:
        from .. import distributed

        distributed.init(None if args.ray == "local" else args.ray)
        executor = distributed.RayExecutor(workers=args.ray_workers, gpus_per_worker=args.ray_gpus)
    with clear_write_errors(out):
        not_applicable: list[str] = []
        rows, scores, errors = run_benchmark(spec, out, cache, only=only, progress=not args.quiet,
                                             log=lambda m: console.print(m), executor=executor,
                                             not_applicable=not_applicable)
    elapsed = time.perf_counter() - t0
    if not rows:
        for e in errors:
            console.print(f"[red]error[/red] {e}")
        raise GradoodError(f"no results: every detector failed ({len(errors)} errors, shown above)."
                           if errors else "no results: no detector ran (check --detectors against the spec).")
    print_tables(rows)
    from .report import write_report, write_tables

    with clear_write_errors(out):
        write_tables(out, rows, not_applicable=not_applicable)
        if not args.no_report:
            write_report(out, rows, scores, not_applicable=not_applicable)
    print(f"\n{len(rows)} results in {elapsed:.1f} s; tables: {out}/results.csv, .json, .md"
          + ("" if args.no_report else f"; report: {out}/index.html"))
    noted = {}
    for r in rows:
        for w in r.get("warnings") or []:
            noted.setdefault((r["model"], r["detector"]), w)
    for (model, det), w in noted.items():
        console.print(f"[yellow]note[/yellow] {model} / {det}: {w}")
    for e in not_applicable:
        console.print(f"[blue]not applicable[/blue] {e}")
    for e in errors:
        console.print(f"[red]error[/red] {e}")
    return 1 if errors else 0
