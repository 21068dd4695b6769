"""Figures for the benchmark report: ROC curves and score histograms, rendered to PNG bytes.

One figure per (model, ID dataset, detector): a ROC panel with every OOD set of that detector on one
axes, then one histogram panel per OOD set (ID vs that OOD set, shared bins). Scores follow gradood's
convention, higher = more in-distribution; the ROC curve has ID as the positive class.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``: no global
figure registry to leak into (nothing to close), no GUI backend even if the caller's pyplot uses one.
One figure per layout is kept per thread and reused (see ``_figure``). Figures are small (dpi 80): a
full benchmark's ~75 figures take about 15 s of CPU.
"""

from __future__ import annotations

import io
import threading
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import metrics

__all__ = ["detector_figure", "DPI"]

DPI = 80
_PANEL_IN = (2.7, 2.4)      # width, height of one panel in inches
_MAX_COLS = 5
_ROC_POINTS = 800           # ROC curves are decimated to about this many points (invisible at this size)
_BINS = 40
_RANGE_Q = (0.005, 0.995)   # histogram range: central 99 % of pooled scores, so outliers do not squash it
_ID_COLOR = "0.45"
_local = threading.local()  # per-thread figure cache, see _figure


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


def _roc_panel(ax, scores_id: np.ndarray, scores_ood: Mapping[str, np.ndarray], colors: list) -> None:
    ax.plot([0, 1], [0, 1], ls=":", lw=0.8, color="0.6")
    ax.axhline(0.95, ls="--", lw=0.6, color="0.7")  # the FPR95 operating level
    for (name, s_ood), color in zip(scores_ood.items(), colors):
        fpr, tpr, _ = metrics.roc_curve(scores_id, s_ood)
        fpr, tpr = _decimate(fpr, tpr)
        auc = metrics.auroc(scores_id, s_ood)
        ax.plot(fpr, tpr, lw=1.2, color=color, label=_mpl_text(f"{name} ({100 * auc:.1f})"))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)",
           xticks=[0, 0.5, 1], yticks=[0, 0.5, 0.95])
    ax.set_title("ROC (AUROC %)", fontsize=8)
    ax.legend(fontsize=6, loc="lower right", frameon=False, handlelength=1.2)


def _hist_edges(scores_id: np.ndarray, scores_ood: Mapping[str, np.ndarray]) -> np.ndarray:
    pooled = np.concatenate([scores_id, *scores_ood.values()])
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
    for scores, c in ((scores_id, _ID_COLOR), (s_ood, color)):
        dens = _density(scores, edges)
        ys = np.append(dens, dens[-1])
        # fill_between + a steps line: same look as ax.stairs, several times cheaper to draw (no
        # per-patch Bezier limit updates).
        ax.fill_between(edges, ys, step="post", alpha=0.35, color=c, lw=0)
        ax.plot(edges, ys, drawstyle="steps-post", lw=1.0, color=c)
    ax.set_xlim(edges[0], edges[-1])
    top = ax.dataLim.y1 if np.isfinite(ax.dataLim.y1) and ax.dataLim.y1 > 0 else 1.0
    ax.set_ylim(0, 1.15 * top)  # headroom for the "ID" label
    # The title replaces a legend (legends are slow to lay out): grey = ID, colour = this OOD set.
    ax.set_title(_mpl_text(f"{name} (n={s_ood.size})"), fontsize=8, color=color)
    ax.text(0.02, 0.97, f"ID (n={scores_id.size})", transform=ax.transAxes, fontsize=6, va="top",
            color=_ID_COLOR)
    ax.set_xlabel("score (higher = more ID)")
    ax.set_yticks([])


def _new_figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(_PANEL_IN[0] * ncols, _PANEL_IN[1] * nrows + 0.3), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(3))  # few tick labels: text is most of the drawing time
        ax.tick_params(labelsize=6)
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(7)
    # Fixed margins instead of tight_layout: measuring text extents for every figure is slow.
    fig.subplots_adjust(left=0.06 if ncols > 2 else 0.12, right=0.98, bottom=0.17 / nrows + 0.02,
                        top=1.0 - 0.45 / (_PANEL_IN[1] * nrows + 0.3), wspace=0.3, hspace=0.55)
    return fig, axes


def _figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    """A figure of this layout with its data artists removed, reused across calls (per thread).

    Creating axes and their tick objects is half of the rendering time of these small figures; a
    benchmark draws dozens with the same layout, so each layout is built once and only its data
    artists (lines, fills, texts, legends) are replaced. Every limit and title is set on each call.
    """
    cache = _local.__dict__.setdefault("figures", {})
    if (nrows, ncols) not in cache:
        cache[(nrows, ncols)] = _new_figure(nrows, ncols)
    fig, axes = cache[(nrows, ncols)]
    for ax in axes:
        for artist in [*ax.lines, *ax.collections, *ax.texts]:
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        ax.set_title("")
        ax.set_visible(True)
    return fig, axes


def detector_figure(scores_id: np.ndarray, scores_ood: Mapping[str, np.ndarray], title: str = "") -> bytes:
    """PNG bytes: ROC curves of all OOD sets, then one ID-vs-OOD score histogram per OOD set.

    ``scores_id`` and every value of ``scores_ood`` are 1-D finite score arrays (higher = more ID).
    Panels wrap after five columns.
    """
    scores_id = np.asarray(scores_id, dtype=np.float64)
    scores_ood = {str(k): np.asarray(v, dtype=np.float64) for k, v in scores_ood.items()}
    n_panels = 1 + len(scores_ood)
    ncols = min(n_panels, _MAX_COLS)
    nrows = -(-n_panels // ncols)
    fig, axes = _figure(nrows, ncols)
    colors = _colors(len(scores_ood))
    _roc_panel(axes[0], scores_id, scores_ood, colors)
    edges = _hist_edges(scores_id, scores_ood)
    for ax, (name, s_ood), color in zip(axes[1:], scores_ood.items(), colors):
        _hist_panel(ax, scores_id, s_ood, name, edges, color)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(_mpl_text(title), fontsize=9)
    buf = io.BytesIO()
    # Fast zlib level: these are small flat-colour images; level 6 costs a third of the time for ~10 %.
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()
