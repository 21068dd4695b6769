"""Figures for the benchmark report: ROC curves and score histograms, rendered to PNG bytes.

Two kinds of figure:

* :func:`detector_figure`, one per (model, ID dataset, detector): a ROC panel with every OOD set of that
  detector, then one histogram panel per OOD set (ID vs that OOD set, shared bins);
* :func:`overview_roc_figure`, one per (model, ID dataset): one ROC panel per OOD set overlaying the
  best few detectors, by default on a log-scale FPR axis (curves above ~98 % AUROC hug the corner of a
  linear one).

Scores follow gradood's convention, higher = more in-distribution; the ROC curve has ID as the positive
class. An OOD-tuned detector has one set of ID scores per OOD set (its hyperparameters differ per OOD
set), so every function takes the ID scores either as one array or as a mapping OOD set -> array.

Legibility: figures are at most :data:`MAX_WIDTH_PX` wide, the width of the report's content column in
a 1400 px window, so the page never scales them down; no text is smaller than :data:`FONT_PT` points
at :data:`DPI`, i.e. 12.5 CSS pixels (9.4 pt) as displayed.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``: no global
figure registry to leak into, no GUI backend even if the caller's pyplot uses one. Every figure is new:
an earlier version reused one figure per layout, and the kept data limits of the previous detector
squashed the next detector's histograms flat.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import metrics

__all__ = ["detector_figure", "draw_detector_figure", "overview_roc_figure", "draw_overview_roc_figure",
           "DPI", "FONT_PT", "MAX_WIDTH_PX"]

DPI = 100
FONT_PT = 9                 # smallest font in any figure, in points at DPI (9 * 100 / 72 = 12.5 px)
MAX_WIDTH_PX = 1100         # the report's content width at a 1400 px window (report.css: main max-width)
_TITLE_PT = 10
_PANEL_IN = (2.75, 2.35)    # one detector-figure panel (width, height) in inches: 4 per row fill MAX_WIDTH_PX
_MAX_COLS = 4
_OVERVIEW_COLS = 3
_OVERVIEW_H_IN = 3.4
_ROC_POINTS = 800           # ROC curves are decimated to about this many points (invisible at this size)
_BINS = 40
_RANGE_Q = (0.005, 0.995)   # histogram range: central 99 % of pooled scores, so outliers do not squash it
_ID_COLOR = "0.45"
_TPR_TICKS = [0, 0.25, 0.5, 0.75, 0.95]


def _mpl_text(text: str) -> str:
    """Plain text for matplotlib: ``$`` would otherwise start mathtext (and fail on unbalanced ``$``)."""
    return str(text).replace("$", r"\$")


def _decimate(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ~``_ROC_POINTS`` points, keeping both ends."""
    if fpr.size <= _ROC_POINTS:
        return fpr, tpr
    idx = np.unique(np.linspace(0, fpr.size - 1, _ROC_POINTS).round().astype(int))
    return fpr[idx], tpr[idx]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _as_1d(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).ravel()


# ------------------------------------------------------------------------------------ figure scaffolding
def _new_figure(nrows: int, ncols: int, panel_in: tuple[float, float], title: str) -> tuple[Figure, np.ndarray]:
    top_in = 0.32 + (0.3 if title else 0.0)  # panel titles, then the suptitle
    bottom_in, left_in, right_in = 0.55, 0.62, 0.22
    height = panel_in[1] * nrows + top_in
    width = panel_in[0] * ncols
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.tick_params(labelsize=FONT_PT)
        ax.xaxis.label.set_size(FONT_PT)
        ax.yaxis.label.set_size(FONT_PT)
    # Fixed margins instead of tight_layout: measuring text extents for every figure is slow.
    fig.subplots_adjust(left=left_in / width, right=1 - right_in / width, bottom=bottom_in / height,
                        top=1 - top_in / height, wspace=0.32, hspace=0.62)
    if title:
        fig.suptitle(_mpl_text(title), fontsize=_TITLE_PT, y=1 - 0.08 / height, va="top")
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # Fast zlib level: these are small flat-colour images; level 6 costs a third of the time for ~10 %.
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


# ------------------------------------------------------------------------------------ ROC
def _fpr_floor(n_ood: int) -> float:
    """Left end of a log FPR axis: the smallest non-zero FPR, 1 / n_ood (at most 1 %)."""
    return min(1.0 / max(n_ood, 1), 0.01)


def _roc_axes(ax, log_fpr: bool, floor: float, title: str) -> None:
    ax.axhline(0.95, ls="--", lw=0.7, color="0.65")  # the FPR95 operating level
    if log_fpr:
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.set_xlabel("FPR, OOD accepted (log)")
    else:
        ax.plot([0, 1], [0, 1], ls=":", lw=0.8, color="0.6")
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1])
        ax.set_xlabel("FPR, OOD accepted")
    ax.set_ylim(0, 1.01)
    ax.set_yticks(_TPR_TICKS)
    ax.set_ylabel("TPR, ID accepted")
    ax.set_title(_mpl_text(title), fontsize=_TITLE_PT)


def _roc_line(ax, s_id: np.ndarray, s_ood: np.ndarray, log_fpr: bool, floor: float, **style) -> None:
    fpr, tpr, _ = metrics.roc_curve(s_id, s_ood)
    fpr, tpr = _decimate(fpr, tpr)
    if log_fpr:
        # FPR 0 has no place on a log axis: those points sit on the left edge, the smallest FPR the OOD set
        # can measure.
        fpr = np.maximum(fpr, floor)
    ax.plot(fpr, tpr, **style)


def _legend(ax) -> None:
    ax.legend(fontsize=FONT_PT, loc="lower right", frameon=True, framealpha=0.85, edgecolor="none",
              handlelength=1.4, borderaxespad=0.3, labelspacing=0.25)


# ------------------------------------------------------------------------------------ histograms
def _hist_edges(arrays: Sequence[np.ndarray]) -> np.ndarray:
    pooled = np.concatenate(list(arrays))
    lo, hi = np.quantile(pooled, _RANGE_Q)
    if not hi > lo:  # (nearly) constant scores: give the bins some width
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, _BINS + 1)


def _density(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Normalised by the full sample size: samples outside the shown range (at most 1 % of the pooled
    # scores) are left out rather than piled into the edge bins, which would draw false spikes.
    counts, _ = np.histogram(scores, bins=edges)
    return counts / (scores.size * np.diff(edges))


def _hist_panel(ax, scores_id: np.ndarray, s_ood: np.ndarray, name: str, edges: np.ndarray, color) -> None:
    peak = 0.0
    for scores, c, gid in ((scores_id, _ID_COLOR, "hist-id"), (s_ood, color, "hist-ood")):
        dens = _density(scores, edges)
        peak = max(peak, float(dens.max()))
        ys = np.append(dens, dens[-1])
        # fill_between + a steps line: same look as ax.stairs, several times cheaper to draw (no
        # per-patch Bezier limit updates). The gid lets tests find the drawn heights.
        ax.fill_between(edges, ys, step="post", alpha=0.35, color=c, lw=0)
        ax.plot(edges, ys, drawstyle="steps-post", lw=1.1, color=c, gid=gid)
    ax.set_xlim(edges[0], edges[-1])
    # The y-range comes from these two histograms only (never from the axes' accumulated data limits).
    ax.set_ylim(0, 1.18 * peak if peak > 0 else 1.0)  # headroom for the "ID" label
    ax.xaxis.set_major_locator(MaxNLocator(3))  # few tick labels: wide numbers must not collide
    # The title replaces a legend: grey = ID, colour = this OOD set.
    ax.set_title(_mpl_text(f"{name} (n={s_ood.size})"), fontsize=_TITLE_PT, color=color)
    ax.text(0.02, 0.97, f"ID (n={scores_id.size})", transform=ax.transAxes, fontsize=FONT_PT, va="top",
            color=_ID_COLOR)
    ax.set_xlabel("score (higher = more ID)")
    ax.set_yticks([])


# ------------------------------------------------------------------------------------ public figures
def draw_detector_figure(scores_id: np.ndarray | Mapping[str, np.ndarray], scores_ood: Mapping[str, np.ndarray],
                         title: str = "", *, log_fpr: bool = False) -> Figure:
    """The figure of :func:`detector_figure`, not yet rendered (tests inspect its artists)."""
    scores_ood = {str(k): _as_1d(v) for k, v in scores_ood.items()}
    if isinstance(scores_id, Mapping):
        ids = {str(k): _as_1d(v) for k, v in scores_id.items()}
        missing = [o for o in scores_ood if o not in ids]
        if missing:
            raise KeyError(f"no ID scores for the OOD sets {missing}")
    else:
        ids = {o: _as_1d(scores_id) for o in scores_ood}
    n_panels = 1 + len(scores_ood)
    ncols = min(n_panels, _MAX_COLS)
    nrows = -(-n_panels // ncols)
    fig, axes = _new_figure(nrows, ncols, _PANEL_IN, title)
    colors = _colors(len(scores_ood))
    floor = _fpr_floor(max(s.size for s in scores_ood.values()))
    _roc_axes(axes[0], log_fpr, floor, "ROC (AUROC %)")
    for (name, s_ood), color in zip(scores_ood.items(), colors):
        auc = metrics.auroc(ids[name], s_ood)
        _roc_line(axes[0], ids[name], s_ood, log_fpr, floor, lw=1.3, color=color,
                  label=_mpl_text(f"{name} ({100 * auc:.1f})"))
    _legend(axes[0])
    # Shared bins make the panels comparable; an OOD-tuned detector's scores live on a different scale per
    # OOD set (e.g. ODIN's temperature), so each of its panels gets its own bins.
    shared = None if isinstance(scores_id, Mapping) else _hist_edges([ids[next(iter(ids))], *scores_ood.values()])
    for ax, (name, s_ood), color in zip(axes[1:], scores_ood.items(), colors):
        edges = shared if shared is not None else _hist_edges([ids[name], s_ood])
        _hist_panel(ax, ids[name], s_ood, name, edges, color)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig


def detector_figure(scores_id: np.ndarray | Mapping[str, np.ndarray], scores_ood: Mapping[str, np.ndarray],
                    title: str = "", *, log_fpr: bool = False) -> bytes:
    """PNG bytes: ROC curves of all OOD sets, then one ID-vs-OOD score histogram per OOD set.

    ``scores_id`` is a 1-D array of ID scores, or a mapping OOD set -> ID scores (an OOD-tuned detector
    scores ID data once per OOD set); every value of ``scores_ood`` is a 1-D finite score array (higher =
    more ID). Panels wrap after four columns. ``log_fpr`` puts the ROC's FPR axis on a log scale.
    """
    return _png(draw_detector_figure(scores_id, scores_ood, title, log_fpr=log_fpr))


def draw_overview_roc_figure(panels: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray]]], title: str = "",
                             *, log_fpr: bool = True, dashed: Sequence[str] = ()) -> Figure:
    """The figure of :func:`overview_roc_figure`, not yet rendered."""
    labels = list(dict.fromkeys(lbl for curves in panels.values() for lbl, _, _ in curves))
    color = dict(zip(labels, _colors(len(labels))))  # one colour per detector across panels
    ncols = min(len(panels), _OVERVIEW_COLS)
    nrows = -(-len(panels) // ncols)
    fig, axes = _new_figure(nrows, ncols, (MAX_WIDTH_PX / DPI / ncols, _OVERVIEW_H_IN), title)
    for ax, (panel_title, curves) in zip(axes, panels.items()):
        n_ood = max((np.size(s_ood) for _, _, s_ood in curves), default=1)
        floor = _fpr_floor(n_ood)
        _roc_axes(ax, log_fpr, floor, panel_title)
        for lbl, s_id, s_ood in curves:
            s_id, s_ood = _as_1d(s_id), _as_1d(s_ood)
            auc = metrics.auroc(s_id, s_ood)
            _roc_line(ax, s_id, s_ood, log_fpr, floor, lw=1.5, color=color[lbl],
                      ls="--" if lbl in dashed else "-", label=_mpl_text(f"{lbl} ({100 * auc:.2f})"))
        _legend(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def overview_roc_figure(panels: Mapping[str, Sequence[tuple[str, np.ndarray, np.ndarray]]], title: str = "",
                        *, log_fpr: bool = True, dashed: Sequence[str] = ()) -> bytes:
    """PNG bytes: one ROC panel per entry of ``panels`` (title -> ``[(label, id_scores, ood_scores), ...]``).

    A label keeps its colour in every panel; labels in ``dashed`` (e.g. OOD-tuned detectors) are drawn
    dashed. The legend gives each curve's AUROC in %. ``log_fpr`` (default) puts FPR on a log axis from
    1 / n_ood (the smallest FPR the OOD set can measure) to 1; the dashed horizontal line is TPR 95 %,
    where each curve's FPR95 can be read.
    """
    return _png(draw_overview_roc_figure(panels, title, log_fpr=log_fpr, dashed=dashed))
