"""Benchmark results -> tables (CSV, JSON, Markdown) and a static, offline HTML report with plots.

Interface (what the benchmark runner passes)
--------------------------------------------
``results``: a list of dicts, one per (model, id_dataset, ood_set, detector), with keys

* ``model``, ``id_dataset``, ``ood_set``, ``detector``: names (str);
* ``ood_group``: ``"near"`` or ``"far"``;
* ``tunes_on_ood``: bool, True when the detector tuned on OOD validation data (marked in every table);
* the metrics of :func:`gradood.metrics.evaluate`: ``auroc, fpr95, aupr_in, aupr_out, fpr80,
  detection_error`` as **fractions in [0, 1]** (None or NaN = not available);
* optionally ``<metric>_ci = (low, high)`` bootstrap intervals, and any extra scalar keys (e.g. timings),
  which are kept in the CSV/JSON files.

``scores`` (optional, for plots): ``{(model, id_dataset, detector): {"id": array, ood_set: array, ...}}``,
1-D ID-scores (higher = more in-distribution).

Output folder
-------------
``index.html`` (tables per model / ID dataset: detectors as rows, OOD sets as columns, AUROC and FPR95 in
%, near/far/overall averages, best per column highlighted, OOD-tuned detectors marked; one section per
detector with all metrics and its figure), ``plots/*.png``, ``results.csv``, ``results.json``,
``results.md``. Every file is written atomically (temporary file in the same folder, then
``os.replace``), so a reader never sees a half-written file, and ``index.html`` is written last, so
it never references a missing image. The page loads nothing from the network (inline CSS, no scripts,
a Content-Security-Policy that forbids remote loads); images use relative paths, so the folder can
be moved or zipped.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import re
import secrets
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..metrics import METRIC_KEYS, _as_scores

__all__ = ["write_report", "write_tables", "read_results", "REQUIRED_KEYS", "METRIC_KEYS"]

#: identity keys every result row must have (plus :data:`METRIC_KEYS`)
REQUIRED_KEYS: tuple[str, ...] = ("model", "id_dataset", "ood_set", "ood_group", "detector", "tunes_on_ood")
OOD_GROUPS: tuple[str, ...] = ("near", "far")
LOWER_IS_BETTER = frozenset({"fpr95", "fpr80", "detection_error"})
LABELS = {"auroc": "AUROC", "fpr95": "FPR95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out",
          "fpr80": "FPR80", "detection_error": "Det. err."}
TUNED_MARK = "\u2020"  # dagger
JSON_SCHEMA = "gradood-results/1"
_AVG_ATTR = ' class="avg"'
_DECIMALS = 2  # percent decimals in tables; "best" ties are judged at this precision


# ------------------------------------------------------------------------------------ file writing
def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask, unlike tempfile's 0o600: the report stays world-readable
    # like any file the user writes (it may be served by a web server).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ validation
def _metric_value(value: Any, where: str, key: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key}={value!r} is not a number; pass a fraction in [0, 1] or None") from None
    if math.isnan(v):
        return None
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{where}: {key}={v} is outside [0, 1]; metrics are fractions (divide percentages by 100)")
    return v


def _plain(value: Any) -> Any:
    """Numpy scalars/arrays and tuples as plain JSON-able Python values; NaN as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normalise(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of the result rows, metrics as float or None, CIs as (low, high) tuples."""
    rows, seen = [], set()
    for i, raw in enumerate(results):
        if not isinstance(raw, Mapping):
            raise InputError(f"results[{i}] is a {type(raw).__name__}; each result must be a dict")
        missing = [k for k in (*REQUIRED_KEYS, *METRIC_KEYS) if k not in raw]
        if missing:
            raise InputError(f"results[{i}] lacks the keys {missing}; each row needs {list(REQUIRED_KEYS)} "
                             f"and the metrics {list(METRIC_KEYS)} (use None for a missing metric)")
        row = {k: _plain(v) for k, v in raw.items()}
        for k in ("model", "id_dataset", "ood_set", "detector"):
            row[k] = str(row[k])
        where = f"results[{i}] ({row['model']}/{row['id_dataset']}/{row['ood_set']}/{row['detector']})"
        if row["ood_group"] not in OOD_GROUPS:
            raise InputError(f"{where}: ood_group={row['ood_group']!r} must be one of {OOD_GROUPS}")
        row["tunes_on_ood"] = bool(row["tunes_on_ood"])
        for k in METRIC_KEYS:
            row[k] = _metric_value(row[k], where, k)
            ci = raw.get(f"{k}_ci")
            row.pop(f"{k}_ci", None)
            if ci is not None:
                if len(ci) != 2:
                    raise InputError(f"{where}: {k}_ci={ci!r} must be a (low, high) pair")
                row[f"{k}_ci"] = (_metric_value(ci[0], where, f"{k}_ci"), _metric_value(ci[1], where, f"{k}_ci"))
        key = (row["model"], row["id_dataset"], row["ood_set"], row["detector"])
        if key in seen:
            raise InputError(f"{where} appears twice; pass one row per (model, id_dataset, ood_set, detector)")
        seen.add(key)
        rows.append(row)
    if not rows:
        raise InputError("results is empty; run at least one detector on one OOD set before writing a report")
    return rows


# ------------------------------------------------------------------------------------ grouping
class _Group:
    """One (model, id_dataset) table: its OOD sets (near first) and detectors, in order of appearance."""

    def __init__(self, model: str, id_dataset: str) -> None:
        self.model, self.id_dataset = model, id_dataset
        self.ood: dict[str, str] = {}              # ood_set -> group
        self.detectors: dict[str, bool] = {}       # detector -> tunes_on_ood
        self.rows: dict[tuple[str, str], dict] = {}  # (detector, ood_set) -> row

    def add(self, row: dict) -> None:
        prev = self.ood.setdefault(row["ood_set"], row["ood_group"])
        if prev != row["ood_group"]:
            raise InputError(f"OOD set {row['ood_set']!r} is both {prev!r} and {row['ood_group']!r} for "
                             f"{self.model}/{self.id_dataset}; give it one group")
        self.detectors[row["detector"]] = self.detectors.get(row["detector"], False) or row["tunes_on_ood"]
        self.rows[(row["detector"], row["ood_set"])] = row

    @property
    def ood_sets(self) -> list[str]:
        return [o for g in OOD_GROUPS for o, og in self.ood.items() if og == g]

    def columns(self) -> list[tuple[str, str, list[str]]]:
        """``(label, kind, ood_sets)`` per table column: one per OOD set, then the averages."""
        cols = [(o, self.ood[o], [o]) for o in self.ood_sets]
        groups = {g: [o for o in self.ood_sets if self.ood[o] == g] for g in OOD_GROUPS}
        present = [g for g in OOD_GROUPS if groups[g]]
        if len(present) > 1:
            cols += [(f"{g} avg", "avg", groups[g]) for g in present if len(groups[g]) > 1]
        if len(self.ood) > 1:
            cols.append(("avg", "avg", self.ood_sets))
        return cols

    def value(self, detector: str, ood_sets: Sequence[str], metric: str) -> float | None:
        """The metric for one OOD set, or the mean over several (None if any is missing)."""
        vals = [self.rows.get((detector, o), {}).get(metric) for o in ood_sets]
        if not vals or any(v is None for v in vals):
            return None
        return float(np.mean(vals))


def _groups(rows: list[dict]) -> list[_Group]:
    out: dict[tuple[str, str], _Group] = {}
    for row in rows:
        key = (row["model"], row["id_dataset"])
        out.setdefault(key, _Group(*key)).add(row)
    return list(out.values())


def _best(values: Mapping[str, float | None], metric: str) -> set[str]:
    """Detectors whose value ties the best at the displayed precision."""
    shown = {d: round(100 * v, _DECIMALS) for d, v in values.items() if v is not None}
    if not shown:
        return set()
    target = (min if metric in LOWER_IS_BETTER else max)(shown.values())
    return {d for d, v in shown.items() if v == target}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.{_DECIMALS}f}"


# ------------------------------------------------------------------------------------ tables
def _table_columns(rows: list[dict]) -> list[str]:
    cols = [*REQUIRED_KEYS, *METRIC_KEYS]
    for k in METRIC_KEYS:
        if any(f"{k}_ci" in r for r in rows):
            cols += [f"{k}_ci_low", f"{k}_ci_high"]
    known = set(REQUIRED_KEYS) | set(METRIC_KEYS) | {f"{k}_ci" for k in METRIC_KEYS}
    extras = sorted({k for r in rows for k in r} - known)
    return cols + extras


def _csv_text(rows: list[dict]) -> str:
    cols = _table_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        flat = dict(r)
        for k in METRIC_KEYS:
            if f"{k}_ci" in r:
                flat[f"{k}_ci_low"], flat[f"{k}_ci_high"] = r[f"{k}_ci"]
        line = []
        for c in cols:
            v = flat.get(c)
            line.append("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
        writer.writerow(line)
    return buf.getvalue()


def _json_text(rows: list[dict]) -> str:
    doc = {
        "schema": JSON_SCHEMA,
        "conventions": "scores: higher = more in-distribution; metrics: fractions in [0, 1], ID positive; "
                       "fpr95/fpr80: fraction of OOD accepted at the threshold keeping 95%/80% of ID; "
                       "null = not available",
        "results": [{k: _plain(v) for k, v in r.items()} for r in rows],
    }
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def _md_escape(text: str) -> str:
    # Markdown/table syntax, inline HTML and $ (math on GitHub) are shown literally.
    return re.sub(r"([\\|*_`\[\]<>$#])", r"\\\1", str(text))


def _md_text(rows: list[dict], title: str) -> str:
    lines = [f"# {_md_escape(title)}", "",
             "AUROC / FPR95 in % (AUROC higher is better, FPR95 lower). Scores: higher = more in-distribution; "
             "FPR95 = OOD accepted at the threshold that keeps 95 % of ID.",
             f"**Bold** = best in the column. {TUNED_MARK} = tunes on OOD validation data (not OOD-agnostic).", ""]
    for g in _groups(rows):
        cols = g.columns()
        lines += [f"## {_md_escape(g.model)} / {_md_escape(g.id_dataset)}", ""]
        head = ["Detector"] + [_md_escape(lbl if kind == "avg" else f"{lbl} ({kind})") for lbl, kind, _ in cols]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(cols)]
        best = {(lbl, m): _best({d: g.value(d, sets, m) for d in g.detectors}, m)
                for lbl, _, sets in cols for m in ("auroc", "fpr95")}
        for det, tuned in g.detectors.items():
            cells = [_md_escape(det) + (f" {TUNED_MARK}" if tuned else "")]
            for lbl, _, sets in cols:
                parts = []
                for m in ("auroc", "fpr95"):
                    s = _pct(g.value(det, sets, m))
                    parts.append(f"**{s}**" if det in best[(lbl, m)] else s)
                cells.append(" / ".join(parts))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_tables(out_dir: str | os.PathLike, results: Iterable[Mapping[str, Any]], *,
                 title: str = "gradood benchmark results") -> dict[str, Path]:
    """Write ``results.csv``, ``results.json`` and ``results.md`` into ``out_dir`` (created if needed).

    CSV: one line per result row; metrics as fractions; ``<metric>_ci_low/_high`` columns when intervals
    are present; extra keys follow, sorted. JSON: ``{"schema", "conventions", "results": [rows]}`` (read
    back with :func:`read_results`). Markdown: one AUROC / FPR95 (%) table per model and ID dataset.
    Returns the paths by format (``"csv"``, ``"json"``, ``"md"``).
    """
    rows = _normalise(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    _atomic_write(paths["csv"], _csv_text(rows))
    _atomic_write(paths["json"], _json_text(rows))
    _atomic_write(paths["md"], _md_text(rows, title))
    return paths


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Result rows from a ``results.json`` written by :func:`write_tables` (CIs back as tuples)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") != JSON_SCHEMA:
        raise InputError(f"{path} is not a gradood results file (schema {JSON_SCHEMA!r}); pass the results.json "
                         f"written by gradood bench")
    rows = doc["results"]
    for r in rows:
        for k in METRIC_KEYS:
            if isinstance(r.get(f"{k}_ci"), list):
                r[f"{k}_ci"] = tuple(r[f"{k}_ci"])
    return rows


# ------------------------------------------------------------------------------------ HTML
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _slug(*parts: str) -> str:
    """File- and anchor-safe name: readable prefix + hash of the exact parts (distinct names never collide)."""
    readable = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:48] or "x"
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def _template(name: str) -> str:
    return resources.files("gradood.bench").joinpath("templates", name).read_text(encoding="utf-8")


def _tuned(tuned: bool) -> str:
    return f' <span class="tuned" title="tunes on OOD validation data">{TUNED_MARK}</span>' if tuned else ""


def _summary_table(g: _Group, metric: str) -> str:
    """Detectors x OOD sets (+ averages) for one metric, best per column highlighted."""
    cols = g.columns()
    groups = [(kind, sum(1 for _, k, _ in cols if k == kind)) for kind in (*OOD_GROUPS, "avg")]
    head1 = '<tr><th rowspan="2">Detector</th>' + "".join(
        f'<th colspan="{n}"{_AVG_ATTR if kind == "avg" else ""}>{_e(kind if kind != "avg" else "average")}</th>'
        for kind, n in groups if n) + "</tr>"
    head2 = "<tr>" + "".join(f'<th{_AVG_ATTR if kind == "avg" else ""}>{_e(lbl)}</th>'
                             for lbl, kind, _ in cols) + "</tr>"
    body = []
    marks = {}
    for lbl, _, sets in cols:
        vals = {d: g.value(d, sets, metric) for d in g.detectors}
        best = _best(vals, metric)
        agnostic = {d: v for d, v in vals.items() if not g.detectors[d]}
        best_agn = _best(agnostic, metric) if best and not any(not g.detectors[d] for d in best) else set()
        marks[lbl] = (vals, best, best_agn)
    for det, tuned in g.detectors.items():
        cells = [f'<th class="det"><a href="#{_e("det-" + _slug(g.model, g.id_dataset, det))}">{_e(det)}</a>'
                 f"{_tuned(tuned)}</th>"]
        for lbl, kind, _ in cols:
            vals, best, best_agn = marks[lbl]
            v = vals[det]
            cls = ["num"] + (["avg"] if kind == "avg" else [])
            cls += ["best"] if det in best else ["best-agnostic"] if det in best_agn else []
            if v is None:
                cells.append('<td class="na">n/a</td>')
            else:
                cells.append(f'<td class="{" ".join(cls)}" title="{_e(f"{LABELS[metric]} {v:.6f}")}">{_pct(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    return (f'<h3>{_e(LABELS[metric])} (%), {arrow}</h3>\n<div class="scroll"><table class="summary" '
            f'data-metric="{metric}">\n<thead>{head1}{head2}</thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table></div>")


def _metric_cell(row: dict | None, metric: str) -> str:
    if row is None or row.get(metric) is None:
        return '<td class="na">n/a</td>'
    v, ci = row[metric], row.get(f"{metric}_ci")
    ci_html = ""
    if ci is not None and None not in ci:
        ci_html = f'<span class="ci">[{_pct(ci[0])}, {_pct(ci[1])}]</span>'
    return f'<td class="num">{_pct(v)}{ci_html}</td>'


def _detector_section(g: _Group, det: str, plot: tuple[str, tuple[int, int]] | None) -> str:
    anchor = "det-" + _slug(g.model, g.id_dataset, det)
    head = "<tr><th>OOD set</th><th>group</th>" + "".join(f"<th>{_e(LABELS[m])}</th>" for m in METRIC_KEYS) + "</tr>"
    body = []
    for o in g.ood_sets:
        row = g.rows.get((det, o))
        body.append(f"<tr><th class=\"det\">{_e(o)}</th><td>{_e(g.ood[o])}</td>"
                    + "".join(_metric_cell(row, m) for m in METRIC_KEYS) + "</tr>")
    if plot:
        plot, size = plot
        alt = f"ROC curves and score histograms of {det} on {g.model} / {g.id_dataset}"
        fig = f'<figure><img src="{_e(plot)}" alt="{_e(alt)}" width="{_e(size[0])}" height="{_e(size[1])}"></figure>'
    else:
        fig = '<p class="note">No scores were passed for this detector, so there are no plots.</p>'
    tuned = (f'<p class="note"><span class="tuned">{TUNED_MARK}</span> tunes on OOD validation data: not '
             f"OOD-agnostic.</p>" if g.detectors[det] else "")
    return (f'<section class="detector" id="{_e(anchor)}">\n<span class="links"><a href="#'
            f'{_e("grp-" + _slug(g.model, g.id_dataset))}">back to table</a> &middot; <a href="#top">top</a></span>\n'
            f"<h4>{_e(det)}{_tuned(g.detectors[det])} <small class=\"meta\">{_e(g.model)} / {_e(g.id_dataset)}"
            f'</small></h4>\n{tuned}<div class="scroll"><table class="metrics">\n<thead>{head}</thead>\n<tbody>\n'
            + "\n".join(body) + f"\n</tbody></table></div>\n{fig}\n</section>")


def _legend(has_ci: bool, has_plots: bool) -> str:
    ci = "<li>Detector sections: brackets are bootstrap confidence intervals.</li>" if has_ci else ""
    figs = ("<li>Figures: left, ROC curves of every OOD set (ID positive; legend: AUROC %; dashed line: "
            "TPR 95 %); then ID (grey) vs each OOD set, score densities on shared bins spanning the central "
            "99 % of the pooled scores.</li>") if has_plots else ""
    return (
        '<div class="box legend"><strong>How to read this report</strong><ul>'
        "<li>Scores: higher = more in-distribution (ID). AUROC uses ID as the positive class; "
        "FPR95 = fraction of OOD samples accepted at the threshold that keeps 95 % of ID samples. "
        "Tables show percentages; <code>results.csv</code>/<code>.json</code> hold fractions.</li>"
        f'<li><span class="tuned">{TUNED_MARK}</span> = the detector tunes on OOD validation data '
        "(not OOD-agnostic); compare it with care.</li>"
        '<li><span class="swatch best">best</span> = best value in the column (ties at the shown precision); '
        '<span class="swatch best-agnostic">best</span> = best OOD-agnostic detector, shown when the best is '
        f"OOD-tuned.</li><li>Averages are means over the OOD sets of a group (n/a if any is missing).</li>"
        f"{ci}{figs}</ul></div>")


def _plot_jobs(groups: list[_Group], scores: Mapping | None) -> dict[tuple[str, str, str], tuple[str, dict]]:
    """``(model, id, detector) -> (relative png path, {"id": array, ood: array})`` for every score entry."""
    jobs = {}
    for g in groups:
        for det in g.detectors:
            entry = (scores or {}).get((g.model, g.id_dataset, det))
            if entry is None:
                continue
            where = f"scores[{(g.model, g.id_dataset, det)!r}]"
            if "id" not in entry:
                raise InputError(f"{where} has no 'id' array; pass {{'id': id_scores, ood_set: ood_scores, ...}}")
            ood_order = [o for o in g.ood_sets if o in entry] + [o for o in entry if o != "id" and o not in g.ood]
            arrays = {"id": _as_scores(entry["id"], f"{where}['id']")}
            arrays.update({str(o): _as_scores(entry[o], f"{where}[{o!r}]") for o in ood_order})
            if len(arrays) > 1:
                jobs[(g.model, g.id_dataset, det)] = (f"plots/{_slug(g.model, g.id_dataset, det)}.png", arrays)
    return jobs


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, so the page reserves the space before images load."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def write_report(out_dir: str | os.PathLike, results: Iterable[Mapping[str, Any]],
                 scores: Mapping[tuple[str, str, str], Mapping[str, Any]] | None = None, *,
                 title: str = "gradood benchmark report", plots: bool = True) -> Path:
    """Write the report folder (``index.html``, ``plots/``, ``results.{csv,json,md}``); return index.html.

    ``results`` and ``scores`` are described in the module docstring; a result row is typically
    ``{model, id_dataset, ood_set, ood_group, detector, tunes_on_ood, **gradood.metrics.evaluate(...)}``.
    One PNG per (model, ID dataset, detector) present in both ``results`` and ``scores`` (ROC curves of
    all its OOD sets + ID-vs-OOD histograms; ~0.2 s each); ``plots=False`` skips them. Re-running
    overwrites files in place (atomically).
    """
    rows = _normalise(results)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    groups = _groups(rows)
    jobs = _plot_jobs(groups, scores) if plots else {}
    images = {}
    if jobs:
        from .plots import detector_figure  # matplotlib only when plotting

        for (model, id_dataset, det), (rel, arrays) in jobs.items():
            id_scores = arrays.pop("id")
            png = detector_figure(id_scores, arrays, title=f"{model} / {id_dataset} / {det}")
            _atomic_write(out / rel, png)
            images[(model, id_dataset, det)] = (rel, _png_size(png))
    write_tables(out, rows, title=title)
    _atomic_write(out / "index.html", _html(rows, groups, images, title))
    return out / "index.html"


def _html(rows: list[dict], groups: list[_Group], plots: Mapping[tuple[str, str, str], tuple[str, tuple[int, int]]],
          title: str) -> str:
    from .. import __version__

    has_ci = any(f"{k}_ci" in r for r in rows for k in METRIC_KEYS)
    n_det = len({r["detector"] for r in rows})
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{when} &middot; {len(rows)} results &middot; {len(groups)} model/ID-dataset pairs &middot; "
            f'{n_det} detectors &middot; tables: <a href="results.csv">CSV</a>, <a href="results.json">JSON</a>, '
            f'<a href="results.md">Markdown</a>')
    nav = "<nav class=\"box\"><strong>Contents</strong><ul>" + "".join(
        f'<li><a href="#{_e("grp-" + _slug(g.model, g.id_dataset))}">{_e(g.model)} / {_e(g.id_dataset)}</a> '
        f"({len(g.detectors)} detectors, {len(g.ood)} OOD sets)</li>" for g in groups) + "</ul></nav>"
    parts = [nav, _legend(has_ci, bool(plots))]
    for g in groups:
        parts.append(f'<section class="group" id="{_e("grp-" + _slug(g.model, g.id_dataset))}">'
                     f"<h2>{_e(g.model)} / {_e(g.id_dataset)}</h2>")
        parts.append(_summary_table(g, "auroc"))
        parts.append(_summary_table(g, "fpr95"))
        parts.append("<h3>Detectors</h3>")
        for det in g.detectors:
            parts.append(_detector_section(g, det, plots.get((g.model, g.id_dataset, det))))
        parts.append("</section>")
    return Template(_template("report.html")).substitute(
        title=_e(title), meta=meta, body="\n".join(parts), css=_template("report.css"), version=_e(__version__))
