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
1-D ID-scores (higher = more in-distribution). An OOD-tuned detector scores the ID data once per OOD set
(its hyperparameters differ per set): pass those as ``"id::<ood_set>"`` instead of (or besides) ``"id"``.

Output folder
-------------
``index.html``: first, per model / ID dataset, the answer to "which detector?" -- the best OOD-agnostic
detector (highest mean AUROC over the OOD sets) named in words, a heatmap table of AUROC and FPR95 in %
(detectors sorted by mean AUROC x OOD sets grouped near/far, with near/far/all means; cells coloured by
the log of the error; best per column boxed; OOD-tuned detectors marked), and one ROC figure overlaying
the best detectors of each OOD set (log FPR axis by default); then one collapsed section per detector
with all metrics and its figure (ROC curves + ID-vs-OOD score histograms). The heatmap is an HTML table,
not an image: its numbers stay selectable, searchable and legible at any zoom, and tests read them from
the page (each cell carries ``data-metric``, ``data-value`` and ``data-ood`` or ``data-mean``).
Also ``plots/*.png``, ``results.csv``, ``results.json``, ``results.md``. Every file is written
atomically (temporary file in the same folder, then ``os.replace``), so a reader never sees a
half-written file, and ``index.html`` is written last, so it never references a missing image. The
page loads nothing from the network (inline CSS, no scripts, a Content-Security-Policy that forbids
remote loads); images use relative paths, so the folder can be moved or zipped.
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
from dataclasses import dataclass
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


def _json_text(rows: list[dict], not_applicable: Sequence[str] = ()) -> str:
    doc = {
        "schema": JSON_SCHEMA,
        "conventions": "scores: higher = more in-distribution; metrics: fractions in [0, 1], ID positive; "
                       "fpr95/fpr80: fraction of OOD accepted at the threshold keeping 95%/80% of ID; "
                       "null = not available",
        "results": [{k: _plain(v) for k, v in r.items()} for r in rows],
    }
    if not_applicable:
        doc["not_applicable"] = list(not_applicable)
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def _md_escape(text: str) -> str:
    # Markdown/table syntax, inline HTML and $ (math on GitHub) are shown literally.
    return re.sub(r"([\\|*_`\[\]<>$#])", r"\\\1", str(text))


def _md_text(rows: list[dict], title: str, not_applicable: Sequence[str] = ()) -> str:
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
    if not_applicable:
        lines += ["## Not applicable", "",
                  "Detectors whose method the model lacks (`model / detector: reason`):", ""]
        lines += [f"* {_md_escape(' '.join(msg.split()))}" for msg in not_applicable]
        lines.append("")
    return "\n".join(lines)


def write_tables(out_dir: str | os.PathLike, results: Iterable[Mapping[str, Any]], *,
                 title: str = "gradood benchmark results", not_applicable: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json`` and ``results.md`` into ``out_dir`` (created if needed).

    CSV: one line per result row; metrics as fractions; ``<metric>_ci_low/_high`` columns when intervals
    are present; extra keys follow, sorted. JSON: ``{"schema", "conventions", "results": [rows]}`` (read
    back with :func:`read_results`), plus ``"not_applicable"`` (``"model / detector: reason"`` lines) when
    given. Markdown: one AUROC / FPR95 (%) table per model and ID dataset, then the not-applicable list.
    Returns the paths by format (``"csv"``, ``"json"``, ``"md"``).
    """
    rows = _normalise(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    _atomic_write(paths["csv"], _csv_text(rows))
    _atomic_write(paths["json"], _json_text(rows, not_applicable))
    _atomic_write(paths["md"], _md_text(rows, title, not_applicable))
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


def _det_anchor(g: _Group, det: str) -> str:
    return "det-" + _slug(g.model, g.id_dataset, det)


def _grp_anchor(g: _Group) -> str:
    return "grp-" + _slug(g.model, g.id_dataset)


# ------------------------------------------------------------------------------------ overview: ranking
def _ranked(g: _Group) -> list[str]:
    """Detectors by mean AUROC over all OOD sets, best first; ties by mean FPR95, then name; n/a last."""
    def key(det: str) -> tuple:
        auroc, fpr = g.value(det, g.ood_sets, "auroc"), g.value(det, g.ood_sets, "fpr95")
        return (auroc is None, -(auroc or 0.0), 2.0 if fpr is None else fpr, det)

    return sorted(g.detectors, key=key)


def _pick(g: _Group, ranked: list[str]) -> str | None:
    """The best OOD-agnostic detector: highest mean AUROC over all OOD sets (see :func:`_ranked`)."""
    return next((d for d in ranked if not g.detectors[d] and g.value(d, g.ood_sets, "auroc") is not None), None)


def _group_means(g: _Group, det: str, metric: str) -> str:
    """``"near 95.03, far 99.30"`` (only groups with OOD sets)."""
    parts = []
    for grp in OOD_GROUPS:
        sets = [o for o in g.ood_sets if g.ood[o] == grp]
        if sets:
            parts.append(f"{grp} {_pct(g.value(det, sets, metric))}")
    return ", ".join(parts)


def _verdict(g: _Group, ranked: list[str]) -> str:
    """The answer to "which detector?" in words: the best OOD-agnostic choice, runners-up, caveats."""
    pick = _pick(g, ranked)
    if pick is None:
        return ('<p class="verdict">No OOD-agnostic detector has an AUROC on every OOD set here, so none is '
                "named; see the table.</p>")
    n = len(g.ood_sets)
    auroc, fpr = g.value(pick, g.ood_sets, "auroc"), g.value(pick, g.ood_sets, "fpr95")
    if n == 1:
        what = f"AUROC {_pct(auroc)} % and FPR95 {_pct(fpr)} % on {_e(g.ood_sets[0])}"
    else:
        what = (f"mean AUROC {_pct(auroc)} % over the {n} OOD sets ({_e(_group_means(g, pick, 'auroc'))}), "
                f"mean FPR95 {_pct(fpr)} %")
    out = [f'Best OOD-agnostic choice: <strong class="pick">{_e(pick)}</strong> &mdash; {what}.']
    agnostic = [d for d in ranked if not g.detectors[d] and g.value(d, g.ood_sets, "auroc") is not None]
    runners = agnostic[1:3]
    if runners:
        out.append("Next: " + ", ".join(f"{_e(d)} ({_pct(g.value(d, g.ood_sets, 'auroc'))} %)" for d in runners)
                   + ".")
    fprs = {d: g.value(d, g.ood_sets, "fpr95") for d in agnostic}
    low_fpr = min((d for d in agnostic if fprs[d] is not None), key=lambda d: (fprs[d], d), default=None)
    if low_fpr not in (None, pick) and fpr is not None and fprs[low_fpr] < fpr:
        out.append(f"Lowest FPR95 among OOD-agnostic detectors: {_e(low_fpr)} ({_pct(fprs[low_fpr])} %).")
    better = [d for d in ranked if g.detectors[d] and (g.value(d, g.ood_sets, "auroc") or 0.0) > auroc]
    if better:
        best_tuned = better[0]
        out.append(f"The OOD-tuned {_e(best_tuned)}{_tuned(True)} scores higher "
                   f"({_pct(g.value(best_tuned, g.ood_sets, 'auroc'))} %) but tunes on held-out samples of each "
                   "test OOD set, which a deployment does not have.")
    return '<p class="verdict">' + " ".join(out) + "</p>"


# ------------------------------------------------------------------------------------ overview: heatmap
# ColorBrewer RdBu (colour-blind safe), light end stops only: black text keeps >= 4.5:1 contrast on every cell.
_HEAT_STOPS = ("#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3")
_HEAT_WORST_Q = 0.90   # the colour scale's red end: this quantile of a table's errors (outliers do not wash it out)
_HEAT_ERR_FLOOR = 1e-3  # errors below 0.1 % share the bluest colour


def _heat_color(t: float) -> str:
    """Colour for ``t`` in [0, 1] (1 = best), interpolated between :data:`_HEAT_STOPS`."""
    x = min(max(t, 0.0), 1.0) * (len(_HEAT_STOPS) - 1)
    i = min(int(x), len(_HEAT_STOPS) - 2)
    f = x - i
    a, b = (tuple(int(s[k:k + 2], 16) for k in (1, 3, 5)) for s in _HEAT_STOPS[i:i + 2])
    return "#" + "".join(f"{round(ca + f * (cb - ca)):02x}" for ca, cb in zip(a, b))


def _log_error(v: float, metric: str) -> float:
    """log10 of the error a value stands for: 1 - AUROC, or FPR95 itself (floored at 0.1 %).

    Colours follow the log error because the detectors worth comparing sit at 97-100 % AUROC, where
    a linear scale paints 99.9 and 98 the same blue although one makes 20 times fewer mistakes.
    """
    err = v if metric in LOWER_IS_BETTER else 1.0 - v
    return math.log10(max(err, _HEAT_ERR_FLOOR))


def _heat_scale(values: Iterable[float | None], metric: str) -> tuple[float, float]:
    """``(worst, best)`` log errors at the red and blue ends of a metric's colour scale for one table."""
    errs = np.array([_log_error(v, metric) for v in values if v is not None])
    if not errs.size:
        return 0.0, -3.0
    return float(np.quantile(errs, _HEAT_WORST_Q)), float(errs.min())


def _heat_t(v: float, metric: str, scale: tuple[float, float]) -> float:
    worst, best = scale
    return 1.0 if best >= worst else (worst - _log_error(v, metric)) / (worst - best)


_AVG_NAMES = {"avg": "all"} | {f"{g} avg": g for g in OOD_GROUPS}


_HEAT_METRICS = ("auroc", "fpr95")
_Column = tuple[str, str, list[str]]  # (label, kind: near / far / avg, OOD sets), as _Group.columns()


def _heat_columns(g: _Group) -> list[tuple[str, list[_Column]]]:
    """The table's columns under their group header: near OOD sets, far OOD sets, then the means."""
    cols = g.columns()
    kinds = [(kind, [c for c in cols if c[1] == kind]) for kind in (*OOD_GROUPS, "avg")]
    return [(kind, cs) for kind, cs in kinds if cs]


def _heat_head(kinds: list[tuple[str, list[_Column]]]) -> str:
    """Three header rows: metric blocks, near / far / mean groups, OOD sets (a thick line starts each block)."""
    n_cols = sum(len(cs) for _, cs in kinds)
    head1 = ['<th rowspan="3" class="det-head">Detector<br><small>sorted by mean AUROC</small></th>']
    head2, head3 = [], []
    for m in _HEAT_METRICS:
        arrow = "lower is better" if m in LOWER_IS_BETTER else "higher is better"
        head1.append(f'<th colspan="{n_cols}" class="block">{_e(LABELS[m])} % <small>({arrow})</small></th>')
        for i, (kind, cs) in enumerate(kinds):
            block = ' class="block"' if i == 0 else ""
            head2.append(f'<th colspan="{len(cs)}"{block}>{_e("mean" if kind == "avg" else kind)}</th>')
        ordered = [(kind, lbl) for kind, cs in kinds for lbl, _, _ in cs]
        for j, (kind, lbl) in enumerate(ordered):
            cls = (["block"] if j == 0 else []) + (["avg"] if kind == "avg" else [])
            attr = f' class="{" ".join(cls)}"' if cls else ""
            head3.append(f"<th{attr}>{_e(_AVG_NAMES[lbl] if kind == 'avg' else lbl)}</th>")
    return "".join(f"<tr>{''.join(h)}</tr>\n" for h in (head1, head2, head3))


def _heat_marks(g: _Group, ordered: list[_Column]) -> dict[tuple[str, str], tuple[dict, set, set]]:
    """``(metric, column label) -> (values by detector, best detectors, best OOD-agnostic if the best is tuned)``."""
    marks = {}
    for m in _HEAT_METRICS:
        for lbl, _, sets in ordered:
            vals = {d: g.value(d, sets, m) for d in g.detectors}
            best = _best(vals, m)
            agnostic = {d: v for d, v in vals.items() if not g.detectors[d]}
            best_agn = _best(agnostic, m) if best and all(g.detectors[d] for d in best) else set()
            marks[(m, lbl)] = (vals, best, best_agn)
    return marks


def _heat_cell(det: str, m: str, column: _Column, first: bool, mark: tuple[dict, set, set],
               scale: tuple[float, float]) -> str:
    lbl, kind, sets = column
    vals, best, best_agn = mark
    v = vals[det]
    cls = ["num"] + (["block"] if first else []) + (["avg"] if kind == "avg" else [])
    where = f'data-mean="{_e(_AVG_NAMES[lbl])}"' if kind == "avg" else f'data-ood="{_e(sets[0])}"'
    if v is None:
        return f'<td class="{" ".join(cls + ["na"])}" data-metric="{m}" {where}>n/a</td>'
    cls += ["best"] if det in best else ["best-agnostic"] if det in best_agn else []
    what = f"{det} on {lbl}" if kind != "avg" else f"{det}, mean over {_AVG_NAMES[lbl]}"
    return (f'<td class="{" ".join(cls)}" style="background:{_heat_color(_heat_t(v, m, scale))}" data-metric="{m}" '
            f'{where} data-value="{v!r}" title="{_e(f"{what}: {LABELS[m]} {100 * v:.4f} %")}">{_pct(v)}</td>')


def _heatmap(g: _Group, ranked: list[str]) -> str:
    """Detectors (sorted) x OOD sets + means, AUROC block then FPR95 block, cells coloured by value.

    Every numeric cell carries ``data-metric``, ``data-value`` (the exact fraction) and either
    ``data-ood`` (one OOD set) or ``data-mean`` (``near``/``far``/``all``), so tests and scripts can
    read the numbers from the page.
    """
    kinds = _heat_columns(g)
    ordered = [c for _, cs in kinds for c in cs]
    marks = _heat_marks(g, ordered)
    scales = {m: _heat_scale([v for c in ordered for v in marks[(m, c[0])][0].values()], m) for m in _HEAT_METRICS}
    body = []
    for det in ranked:
        tuned = g.detectors[det]
        cells = [f'<th class="det" scope="row"><a href="#{_e(_det_anchor(g, det))}">{_e(det)}</a>{_tuned(tuned)}</th>']
        cells += [_heat_cell(det, m, c, j == 0, marks[(m, c[0])], scales[m])
                  for m in _HEAT_METRICS for j, c in enumerate(ordered)]
        body.append(("<tr class=\"tuned-row\">" if tuned else "<tr>") + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="heatmap" data-model="{_e(g.model)}" data-id-dataset='
            f'"{_e(g.id_dataset)}">\n<thead>{_heat_head(kinds)}</thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table></div>\n" + _heat_legend(scales))


def _heat_legend(scales: Mapping[str, tuple[float, float]]) -> str:
    ramp = ", ".join(_HEAT_STOPS)

    def shown(metric: str, log_err: float) -> str:
        err = 10 ** log_err
        return _pct(err if metric in LOWER_IS_BETTER else 1.0 - err)

    red = ", ".join(f"{LABELS[m]} {shown(m, w)}" for m, (w, _) in scales.items())
    blue = ", ".join(f"{LABELS[m]} {shown(m, b)}" for m, (_, b) in scales.items())
    return (f'<p class="heat-legend"><span class="ramp" style="background:linear-gradient(to right, {ramp})">'
            f"</span> Cell colour: the error (100 &minus; AUROC, or FPR95) on a log scale, from red at this "
            f"table's 90th-percentile error ({red}) to blue at its smallest ({blue}). <strong>Bold, boxed</strong>"
            f' = best in the column; <span class="u">underlined</span> = best OOD-agnostic when the best is '
            f"OOD-tuned ({TUNED_MARK}).</p>")


# ------------------------------------------------------------------------------------ per-detector sections
def _metric_cell(row: dict | None, metric: str) -> str:
    if row is None or row.get(metric) is None:
        return '<td class="na">n/a</td>'
    v, ci = row[metric], row.get(f"{metric}_ci")
    ci_html = ""
    if ci is not None and None not in ci:
        ci_html = f'<span class="ci">[{_pct(ci[0])}, {_pct(ci[1])}]</span>'
    return f'<td class="num">{_pct(v)}{ci_html}</td>'


def _img(src: str, size: tuple[int, int], alt: str) -> str:
    return (f'<img src="{_e(src)}" alt="{_e(alt)}" width="{_e(size[0])}" height="{_e(size[1])}">')


def _detector_section(g: _Group, det: str, plot: tuple[str, tuple[int, int]] | None) -> str:
    head = "<tr><th>OOD set</th><th>group</th>" + "".join(f"<th>{_e(LABELS[m])}</th>" for m in METRIC_KEYS) + "</tr>"
    body = []
    for o in g.ood_sets:
        row = g.rows.get((det, o))
        body.append(f"<tr><th class=\"det\">{_e(o)}</th><td>{_e(g.ood[o])}</td>"
                    + "".join(_metric_cell(row, m) for m in METRIC_KEYS) + "</tr>")
    if plot:
        alt = f"ROC curves and score histograms of {det} on {g.model} / {g.id_dataset}"
        fig = f"<figure>{_img(plot[0], plot[1], alt)}</figure>"
    else:
        fig = '<p class="note">No scores were passed for this detector, so there are no plots.</p>'
    tuned = (f'<p class="note"><span class="tuned">{TUNED_MARK}</span> tunes on OOD validation data: not '
             f"OOD-agnostic.</p>" if g.detectors[det] else "")
    auroc, fpr = g.value(det, g.ood_sets, "auroc"), g.value(det, g.ood_sets, "fpr95")
    # The anchor sits inside the collapsed content: following a link to it makes the browser open the section.
    return (f'<details class="detector">\n<summary><span class="name">{_e(det)}'
            f'</span>{_tuned(g.detectors[det])} <span class="meta">mean AUROC {_pct(auroc)} &middot; mean FPR95 '
            f'{_pct(fpr)}</span></summary>\n<span class="anchor" id="{_e(_det_anchor(g, det))}"></span>'
            f'<span class="links"><a href="#{_e(_grp_anchor(g))}">back to the overview</a> &middot; '
            f'<a href="#top">top</a></span>\n{tuned}<div class="scroll"><table class="metrics">\n'
            f"<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + f"\n</tbody></table></div>\n{fig}\n</details>")


def _legend(has_ci: bool, has_plots: bool) -> str:
    ci = "<li>Detector sections: brackets are bootstrap confidence intervals.</li>" if has_ci else ""
    figs = ("<li>ROC figure of each model: per OOD set, the detectors with the highest AUROC on it (and the "
            "best OOD-agnostic choice), FPR on a log axis by default; the dashed line is TPR 95 %, where a "
            "curve's FPR95 can be read; OOD-tuned detectors are dashed. Detector figures: left, ROC curves "
            "of every OOD set (legend: AUROC %); then ID (grey) vs each OOD set, score densities on shared "
            "bins spanning the central 99 % of the pooled scores (per-panel bins for OOD-tuned detectors, whose "
            "scores have a different scale per OOD set).</li>") if has_plots else ""
    return (
        '<details class="box legend"><summary>How to read this report</summary><ul>'
        "<li>Scores: higher = more in-distribution (ID). AUROC uses ID as the positive class; "
        "FPR95 = fraction of OOD samples accepted at the threshold that keeps 95 % of ID samples. "
        "Tables show percentages; <code>results.csv</code>/<code>.json</code> hold fractions.</li>"
        "<li>The recommended detector is the OOD-agnostic one with the highest mean AUROC over all OOD sets "
        "of the model (ties: lower mean FPR95). Near OOD sets resemble the ID data; far ones do not.</li>"
        f'<li><span class="tuned">{TUNED_MARK}</span> = the detector tunes on OOD validation data '
        "(held-out samples of each test OOD set, not OOD-agnostic); compare it with care.</li>"
        "<li>Means are over the OOD sets of a group (n/a if any is missing).</li>"
        f"{ci}{figs}</ul></details>")


# ------------------------------------------------------------------------------------ plots
@dataclass
class _Scores:
    """One detector's validated score arrays: ID scores per OOD set (one array shared by all, or one per
    set for an OOD-tuned detector) and the OOD scores."""

    ids: dict[str, np.ndarray]
    oods: dict[str, np.ndarray]
    shared_id: bool


def _plot_scores(groups: list[_Group], scores: Mapping | None) -> dict[tuple[str, str, str], _Scores]:
    """``(model, id, detector) -> _Scores`` for every score entry with at least one OOD set.

    An entry holds ``"id"`` (ID scores shared by all OOD sets) and/or ``"id::<ood set>"`` (ID scores of an
    OOD-tuned detector, tuned for that OOD set), and one array per OOD set.
    """
    out = {}
    for g in groups:
        for det in g.detectors:
            entry = (scores or {}).get((g.model, g.id_dataset, det))
            if entry is None:
                continue
            where = f"scores[{(g.model, g.id_dataset, det)!r}]"
            names = [str(k) for k in entry if not str(k).startswith("id::") and k != "id"]
            ood_order = [o for o in g.ood_sets if o in names] + [o for o in names if o not in g.ood]
            ids, oods = {}, {}
            for o in ood_order:
                key = f"id::{o}" if f"id::{o}" in entry else "id"
                if key not in entry:
                    raise InputError(f"{where} has no 'id' array; pass {{'id': id_scores, ood_set: ood_scores, ...}} "
                                     f"(or 'id::{o}' for ID scores specific to the OOD set {o!r})")
                ids[o] = _as_scores(entry[key], f"{where}[{key!r}]")
                oods[o] = _as_scores(entry[o], f"{where}[{o!r}]")
            if oods:
                out[(g.model, g.id_dataset, det)] = _Scores(ids, oods, all(f"id::{o}" not in entry for o in oods))
    return out


def _overview_panels(g: _Group, arrays: Mapping[tuple[str, str, str], _Scores], ranked: list[str],
                     top: int) -> tuple[dict[str, list], list[str]]:
    """Per OOD set: the ``top`` detectors by its AUROC (plus the recommended one), as ROC curve inputs."""
    pick = _pick(g, ranked)
    panels, dashed = {}, []
    for o in g.ood_sets:
        have = [d for d in g.detectors if (g.model, g.id_dataset, d) in arrays
                and o in arrays[(g.model, g.id_dataset, d)].oods and g.rows.get((d, o), {}).get("auroc") is not None]
        chosen = sorted(have, key=lambda d: (-g.rows[(d, o)]["auroc"], d))[:top]
        if pick in have and pick not in chosen:
            chosen.append(pick)
        curves = []
        for d in chosen:
            s = arrays[(g.model, g.id_dataset, d)]
            label = d + (f" {TUNED_MARK}" if g.detectors[d] else "")
            if g.detectors[d]:
                dashed.append(label)
            curves.append((label, s.ids[o], s.oods[o]))
        if curves:
            panels[f"{o} ({g.ood[o]})"] = curves
    return panels, dashed


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, so the page reserves the space before images load."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def write_report(out_dir: str | os.PathLike, results: Iterable[Mapping[str, Any]],
                 scores: Mapping[tuple[str, str, str], Mapping[str, Any]] | None = None, *,
                 title: str = "gradood benchmark report", plots: bool = True, log_fpr: bool | None = None,
                 top: int = 5, not_applicable: Sequence[str] = ()) -> Path:
    """Write the report folder (``index.html``, ``plots/``, ``results.{csv,json,md}``); return index.html.

    ``results`` and ``scores`` are described in the module docstring; a result row is typically
    ``{model, id_dataset, ood_set, ood_group, detector, tunes_on_ood, **gradood.metrics.evaluate(...)}``.
    Per model / ID dataset the page opens with the recommended OOD-agnostic detector in words, a heatmap
    table of AUROC and FPR95 (detectors sorted by mean AUROC) and one ROC figure overlaying the ``top``
    detectors of each OOD set; per-detector sections (all metrics, ROC + histograms) follow, collapsed.
    ``log_fpr``: None (default) = log FPR axis in the overview ROC figure, linear in detector figures;
    True / False = log / linear everywhere. ``plots=False`` skips all figures (~0.15 s each).
    Re-running overwrites files in place (atomically).
    """
    if log_fpr not in (None, True, False):
        raise InputError(f"log_fpr={log_fpr!r} must be None (log in the overview only), True or False")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise InputError(f"top={top!r} must be a positive int (the number of detectors per overview ROC panel)")
    rows = _normalise(results)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    groups = _groups(rows)
    arrays = _plot_scores(groups, scores) if plots else {}
    images: dict[tuple[str, ...], tuple[str, tuple[int, int]]] = {}
    if arrays:
        from .plots import detector_figure, overview_roc_figure  # matplotlib only when plotting

        for g in groups:
            panels, dashed = _overview_panels(g, arrays, _ranked(g), top)
            if panels:
                rel = f"plots/overview-{_slug(g.model, g.id_dataset)}.png"
                png = overview_roc_figure(panels, log_fpr=log_fpr is not False, dashed=dashed)
                _atomic_write(out / rel, png)
                images[(g.model, g.id_dataset)] = (rel, _png_size(png))
        for (model, id_dataset, det), s in arrays.items():
            rel = f"plots/{_slug(model, id_dataset, det)}.png"
            png = detector_figure(next(iter(s.ids.values())) if s.shared_id else s.ids, s.oods,
                                  title=f"{model} / {id_dataset} / {det}", log_fpr=bool(log_fpr))
            _atomic_write(out / rel, png)
            images[(model, id_dataset, det)] = (rel, _png_size(png))
    write_tables(out, rows, title=title, not_applicable=not_applicable)
    _atomic_write(out / "index.html", _html(rows, groups, images, title))
    return out / "index.html"


def _glance(groups: list[_Group]) -> str:
    """One line per model: the recommended detector, linked to its overview."""
    items = []
    for g in groups:
        pick = _pick(g, _ranked(g))
        what = ("no OOD-agnostic detector has results on every OOD set" if pick is None else
                f'<strong>{_e(pick)}</strong> (mean AUROC {_pct(g.value(pick, g.ood_sets, "auroc"))} %, '
                f'FPR95 {_pct(g.value(pick, g.ood_sets, "fpr95"))} %)')
        items.append(f'<li><a href="#{_e(_grp_anchor(g))}">{_e(g.model)} / {_e(g.id_dataset)}</a>: {what}; '
                     f"{len(g.detectors)} detectors, {len(g.ood)} OOD sets</li>")
    return ('<nav class="box glance"><strong>Which detector?</strong> The best OOD-agnostic detector per model '
            "(highest mean AUROC over its OOD sets):<ul>" + "".join(items) + "</ul></nav>")


def _html(rows: list[dict], groups: list[_Group], plots: Mapping[tuple[str, ...], tuple[str, tuple[int, int]]],
          title: str) -> str:
    from .. import __version__

    has_ci = any(f"{k}_ci" in r for r in rows for k in METRIC_KEYS)
    n_det = len({r["detector"] for r in rows})
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{when} &middot; {len(rows)} results &middot; {len(groups)} model/ID-dataset pairs &middot; "
            f'{n_det} detectors &middot; tables: <a href="results.csv">CSV</a>, <a href="results.json">JSON</a>, '
            f'<a href="results.md">Markdown</a>')
    parts = [_glance(groups), _legend(has_ci, bool(plots))]
    for g in groups:
        ranked = _ranked(g)
        acc = g.rows[next(iter(g.rows))].get("accuracy")
        acc_txt = f' <small class="meta">ID test accuracy {100 * acc:.2f} %</small>' if isinstance(acc, float) else ""
        parts.append(f'<section class="group" id="{_e(_grp_anchor(g))}">'
                     f"<h2>{_e(g.model)} / {_e(g.id_dataset)}{acc_txt}</h2>")
        parts.append(_verdict(g, ranked))
        parts.append(_heatmap(g, ranked))
        overview = plots.get((g.model, g.id_dataset))
        if overview:
            alt = f"ROC curves of the best detectors per OOD set, {g.model} / {g.id_dataset}"
            parts.append(f'<figure class="overview">{_img(overview[0], overview[1], alt)}<figcaption>ROC curves of '
                         f"the detectors with the highest AUROC on each OOD set (legend: AUROC %); dashed "
                         f"horizontal line: TPR 95 %.</figcaption></figure>")
        parts.append('<h3>Detectors <small class="meta">(in table order; click to expand)</small></h3>')
        for det in ranked:
            parts.append(_detector_section(g, det, plots.get((g.model, g.id_dataset, det))))
        parts.append("</section>")
    return Template(_template("report.html")).substitute(
        title=_e(title), meta=meta, body="\n".join(parts), css=_template("report.css"), version=_e(__version__))
