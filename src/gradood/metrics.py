"""OOD-detection metrics for ID-scores (higher = more in-distribution).

Conventions
-----------
* Inputs are two 1-D sets of scores, ``scores_id`` (in-distribution test samples) and ``scores_ood``
  (out-of-distribution samples), as NumPy array-likes or torch tensors. **Higher = more ID**, the
  direction every gradood detector returns. Decision rule: a sample is accepted as ID iff
  ``score >= threshold``.
* ID is the **positive** class: TPR = fraction of ID samples accepted, FPR = fraction of OOD samples
  accepted.
* Every value is a **fraction in [0, 1]** (not a percentage): multiply by 100 to compare with paper tables.

Metrics (keys of :func:`evaluate`)
----------------------------------
``auroc``
    Area under the ROC curve, ID positive; ties count one half (Mann-Whitney U / n_id n_ood). Equal to
    ``sklearn.metrics.roc_auc_score(is_id, score)``, and to the AUROC with OOD positive and the negated score.
``fpr95`` / ``fpr80``
    :func:`fpr_at_tpr` at TPR 0.95 / 0.80: the fraction of OOD samples with ``score >= t``, where ``t`` is
    the **largest** observed score value such that at least ``tpr`` of the ID samples have ``score >= t``
    (the conservative "first operating point with TPR >= tpr" of ``sklearn.metrics.roc_curve``, walking
    the curve from the strictest threshold, without interpolation). Ties: all samples sharing a score
    value are accepted or rejected together, so the achieved TPR can exceed ``tpr``; the comparison is
    ``n_accepted_id / n_id >= tpr`` in float64, exactly as
    ``fpr[np.argmax(tpr_curve >= tpr)]`` on ``roc_curve(..., drop_intermediate=False)``.
``aupr_in``
    Average precision (``sklearn.metrics.average_precision_score``: the step-wise sum
    ``sum_k (R_k - R_{k-1}) P_k``, not a trapezoid) with ID positive and the score as is.
``aupr_out``
    Average precision with OOD positive and the negated score.
``detection_error``
    ``min_t 0.5 (1 - TPR(t)) + 0.5 FPR(t)``: the misclassification rate at the best threshold with equal
    ID/OOD priors (ODIN, Liang et al. 2018). The minimum runs over every observed score value plus the
    "reject everything" threshold, so it is at most 0.5. ODIN's code instead scans a fixed grid of
    thresholds (and uses strict ``<``/``>`` on both sides); on continuous scores the exact minimum here
    is the limit of a fine grid.

How this maps to other codebases
--------------------------------
* **GradNorm / KNN / RG / ReAct** (``fpr_and_fdr_at_recall(labels, scores, 0.95)`` with ID labelled 1,
  i.e. ID positive, same score direction): same AUROC and AUPR. Their FPR95 picks the operating point
  whose recall is **nearest** to 0.95 (``argmin |recall - 0.95|``), which may sit *below* 95 % TPR;
  ours picks the first point at or above it. Their ties go to the *last* point in threshold order: when
  several thresholds give the same TPR (OOD samples between two consecutive ID scores), they take the
  loosest (most OOD accepted), ours the strictest. So even when TPR = 0.95 is hit exactly (``n_id`` a
  multiple of 20), their value exceeds ours by the OOD samples scored between the ID samples ranked
  ``0.95 n_id`` and ``0.95 n_id + 1``; in general the two differ by about one ROC step.
  ``fpr_at_tpr(..., rule="nearest")`` reproduces theirs exactly.
* **OpenOOD v1.5** (``openood/evaluators/metrics.py::auc_and_fpr_recall``): same ID-score direction
  ("conf", higher = ID) and the same AUROC. Its FPR@95 treats **OOD as positive**: the fraction of ID
  samples rejected when 95 % of OOD samples are rejected (``roc_curve(ood_indicator, -conf)``, first
  TPR >= 0.95). That is ``fpr_at_tpr(-scores_ood, -scores_id, 0.95)`` here (roles swapped, scores
  negated), a different number from our ``fpr95``. Its AUPR-in/out are trapezoids
  (``sklearn.metrics.auc(recall, precision)``), which differ slightly from average precision. (OpenOOD
  v1.0's ``fpr_recall`` used ID positive, a quantile threshold and a strict ``>``.)
* **pytorch-ood** (``OODMetrics``): detectors return *outlier* scores = the negation of ours, and OOD is
  the positive class. Its AUROC (OOD positive, outlier score) equals our ``auroc``; its AUPR-IN/AUPR-OUT
  are trapezoids of the same curves as our ``aupr_in``/``aupr_out``; its ``FPR95TPR`` is, like OpenOOD
  v1.5, ID rejected at 95 % OOD detected, i.e. ``fpr_at_tpr(-scores_ood, -scores_id, 0.95)``.

Implementation: one O(n log n) sort (``np.unique`` over the pooled scores) produces per-value counts
of ID and OOD samples; every metric is a vectorised function of their cumulative sums. The same kernels
serve the bootstrap, where resampling only changes the counts, so :func:`bootstrap_ci` evaluates all
resamples at once in a few array operations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from .errors import InputError

__all__ = [
    "auroc", "fpr_at_tpr", "fpr95", "fpr80", "aupr_in", "aupr_out", "detection_error", "roc_curve",
    "bootstrap_ci", "evaluate", "METRIC_KEYS", "OODMetrics",
]

#: keys of :func:`evaluate`, in table order
METRIC_KEYS: tuple[str, ...] = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr80", "detection_error")

_FPR_RULES = ("at_least", "nearest")
# Bootstrap chunk size: resamples x distinct values per chunk, to keep memory around 100 MB.
_BOOT_CELLS = 2_000_000


# ----------------------------------------------------------------------------------------------- input
def _as_scores(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 1-D array, or :class:`InputError` naming the problem and the fix."""
    if hasattr(x, "detach"):  # torch tensor, converted without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name} could not be converted to an array ({exc}); pass a 1-D array of "
                         f"scores") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}; scores must be real numbers (pass a float array)")
    if arr.ndim != 1:
        raise InputError(f"{name} has shape {arr.shape}; scores must be 1-D, one value per sample "
                         f"(use .reshape(-1) if it is (N, 1))")
    if arr.size == 0:
        raise InputError(f"{name} is empty; metrics need at least one ID and one OOD score "
                         f"(check that the dataset/loader yielded samples)")
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{name} contains {n_nan} NaN and {n_inf} infinite values (first at index "
                         f"{first}); scores must be finite: fix the detector (e.g. log of 0, overflow) "
                         f"or drop those samples explicitly")
    return arr


def _pair(scores_id: Any, scores_ood: Any) -> tuple[np.ndarray, np.ndarray]:
    return _as_scores(scores_id, "scores_id"), _as_scores(scores_ood, "scores_ood")


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise InputError(f"{name}={value} must be a fraction in (0, 1], e.g. 0.95 (not 95)")
    return value


def _tally(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct pooled score values in **descending** order, the ID and OOD count at each, and the
    position of every pooled sample (ID first) in that order."""
    values, inverse = np.unique(np.concatenate([s_id, s_ood]), return_inverse=True)
    u = values.size
    pos = (u - 1) - inverse.reshape(-1)  # descending: strictest threshold first
    c_id = np.bincount(pos[: s_id.size], minlength=u)
    c_ood = np.bincount(pos[s_id.size:], minlength=u)
    return values[::-1], c_id, c_ood, pos


# ------------------------------------------------------------------ kernels on counts (shape (..., U))
class _Curve:
    """Per-value counts in descending score order along the last axis, and their cumulative sums.

    ``tps[..., j]`` = ID samples with score >= value j (accepted), ``fps`` the same for OOD. Built once
    and shared by every kernel. Counts that are zero at some value (bootstrap resamples) add a repeated
    ROC point, which changes no metric.
    """

    def __init__(self, c_id: np.ndarray, c_ood: np.ndarray) -> None:
        self.c_id, self.c_ood = c_id, c_ood
        self.tps = np.cumsum(c_id, axis=-1)
        self.fps = np.cumsum(c_ood, axis=-1)
        self.n_id = self.tps[..., -1:]
        self.n_ood = self.fps[..., -1:]


# Each kernel maps a _Curve to one value per leading index.
def _k_auroc(c: _Curve) -> np.ndarray:
    # Trapezoid over the ROC steps = for each OOD sample, #ID strictly above + half #ID tied.
    # Integer arithmetic until the final division keeps it exact.
    twice_area = np.sum(c.c_ood * (2 * c.tps - c.c_id), axis=-1)
    return twice_area / (2.0 * c.n_id[..., 0] * c.n_ood[..., 0])


def _k_fpr_at_tpr(c: _Curve, tpr: float = 0.95, rule: str = "at_least") -> np.ndarray:
    rate = c.tps / c.n_id  # float64, as sklearn's roc_curve computes TPR
    if rule == "at_least":
        idx = np.argmax(rate >= tpr, axis=-1)  # exists: the last point has rate 1 >= tpr
    else:  # "nearest": GradNorm's argmin |recall - level| over points up to full recall, ties -> later
        dist = np.abs(rate - tpr)
        u = dist.shape[-1]
        full = np.argmax(c.tps == c.n_id, axis=-1)
        dist = np.where(np.arange(u) > full[..., None], np.inf, dist)
        idx = (u - 1) - np.argmin(dist[..., ::-1], axis=-1)
    chosen = np.take_along_axis(c.fps, np.asarray(idx)[..., None], axis=-1)[..., 0]
    return chosen / c.n_ood[..., 0]


def _average_precision(c_pos: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """``sum_k (R_k - R_{k-1}) P_k``: recall only moves where positives sit (``c_pos``), in any order."""
    # Where nothing is predicted positive, tp = 0 too: max(., 1) makes that 0/1 = 0 without a masked divide.
    precision = tp / np.maximum(tp + fp, 1)
    return np.einsum("...j,...j->...", c_pos, precision) / n_pos[..., 0]


def _k_aupr_in(c: _Curve) -> np.ndarray:
    return _average_precision(c.c_id, c.tps, c.fps, c.n_id)


def _k_aupr_out(c: _Curve) -> np.ndarray:
    # OOD positive, negated score: at value j the accepted-as-OOD set is score <= value j, whose counts
    # follow from the descending cumulative sums without re-sorting.
    ood_le = c.n_ood - c.fps + c.c_ood
    id_le = c.n_id - c.tps + c.c_id
    return _average_precision(c.c_ood, ood_le, id_le, c.n_ood)


def _k_detection_error(c: _Curve) -> np.ndarray:
    # 0.5 (1 - TPR) + 0.5 FPR = (n_ood (n_id - tps) + n_id fps) / (2 n_id n_ood): minimised in integers.
    num = c.n_ood * (c.n_id - c.tps) + c.n_id * c.fps
    best = num.min(axis=-1) / (2.0 * c.n_id[..., 0] * c.n_ood[..., 0])
    return np.minimum(best, 0.5)  # 0.5: threshold above every score (reject all)


# ---------------------------------------------------------------------------------------- public API
def _point(kernel: Callable[..., np.ndarray], scores_id: Any, scores_ood: Any, **kw: Any) -> float:
    _, c_id, c_ood, _ = _tally(*_pair(scores_id, scores_ood))
    return float(kernel(_Curve(c_id, c_ood), **kw))


def auroc(scores_id: Any, scores_ood: Any) -> float:
    """Area under the ROC curve with ID positive (ties count 1/2); 0.5 = chance, 1 = perfect."""
    return _point(_k_auroc, scores_id, scores_ood)


def fpr_at_tpr(scores_id: Any, scores_ood: Any, tpr: float = 0.95, *, rule: str = "at_least") -> float:
    """Fraction of OOD samples accepted (``score >= t``) at the threshold that keeps ``tpr`` of ID.

    ``rule="at_least"`` (default): ``t`` is the largest observed score with ``#{ID >= t} / n_id >= tpr``,
    i.e. the first operating point of ``sklearn.metrics.roc_curve`` with TPR >= ``tpr`` (no interpolation;
    tied samples move together). ``rule="nearest"``: the operating point whose TPR is nearest to ``tpr``,
    ties to the loosest threshold, which reproduces GradNorm/ODIN's ``fpr_and_fdr_at_recall`` exactly
    (see the module docstring for how the two differ).
    Lower is better. For the OOD-positive variant of OpenOOD v1.5 and pytorch-ood, call
    ``fpr_at_tpr(-scores_ood, -scores_id, tpr)``.
    """
    tpr = _check_rate(tpr, "tpr")
    if rule not in _FPR_RULES:
        raise InputError(f"rule={rule!r} is not one of {_FPR_RULES}")
    return _point(_k_fpr_at_tpr, scores_id, scores_ood, tpr=tpr, rule=rule)


def fpr95(scores_id: Any, scores_ood: Any) -> float:
    """:func:`fpr_at_tpr` at 95 % ID TPR (lower is better)."""
    return fpr_at_tpr(scores_id, scores_ood, 0.95)


def fpr80(scores_id: Any, scores_ood: Any) -> float:
    """:func:`fpr_at_tpr` at 80 % ID TPR (FSSD's FPR80; lower is better)."""
    return fpr_at_tpr(scores_id, scores_ood, 0.80)


def aupr_in(scores_id: Any, scores_ood: Any) -> float:
    """Average precision with ID positive (``average_precision_score(is_id, score)``)."""
    return _point(_k_aupr_in, scores_id, scores_ood)


def aupr_out(scores_id: Any, scores_ood: Any) -> float:
    """Average precision with OOD positive and negated scores (``average_precision_score(is_ood, -score)``)."""
    return _point(_k_aupr_out, scores_id, scores_ood)


def detection_error(scores_id: Any, scores_ood: Any) -> float:
    """``min_t 0.5 (1 - TPR) + 0.5 FPR`` over all thresholds (equal priors, as in ODIN); at most 0.5."""
    return _point(_k_detection_error, scores_id, scores_ood)


def roc_curve(scores_id: Any, scores_ood: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, strictest first, starting at ``(0, 0, +inf)``.

    Same as ``sklearn.metrics.roc_curve(is_id, score, drop_intermediate=False)``; for plots.
    """
    values, c_id, c_ood, _ = _tally(*_pair(scores_id, scores_ood))
    tpr = np.concatenate([[0.0], np.cumsum(c_id) / c_id.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(c_ood) / c_ood.sum()])
    return fpr, tpr, np.concatenate([[np.inf], values])


# Kernels for the functions above, so that bootstrap_ci can evaluate all resamples at once.
_KERNELS: dict[Callable[..., float], tuple[Callable[..., np.ndarray], dict[str, Any]]] = {
    auroc: (_k_auroc, {}),
    fpr95: (_k_fpr_at_tpr, {"tpr": 0.95}),
    fpr80: (_k_fpr_at_tpr, {"tpr": 0.80}),
    aupr_in: (_k_aupr_in, {}),
    aupr_out: (_k_aupr_out, {}),
    detection_error: (_k_detection_error, {}),
}
_EVALUATE: dict[str, Callable[..., float]] = {
    "auroc": auroc, "fpr95": fpr95, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr80": fpr80,
    "detection_error": detection_error,
}


def _kernel_for(metric_fn: Callable[..., float]) -> tuple[Callable[..., np.ndarray], dict[str, Any]] | None:
    """The vectorised kernel of a gradood metric (also through ``functools.partial``), else None."""
    if metric_fn in _KERNELS:
        return _KERNELS[metric_fn]
    if isinstance(metric_fn, functools.partial) and metric_fn.func is fpr_at_tpr and not metric_fn.args:
        kw = dict(metric_fn.keywords)
        if set(kw) <= {"tpr", "rule"}:
            tpr = _check_rate(kw.get("tpr", 0.95), "tpr")
            rule = kw.get("rule", "at_least")
            if rule not in _FPR_RULES:
                raise InputError(f"rule={rule!r} is not one of {_FPR_RULES}")
            return _k_fpr_at_tpr, {"tpr": tpr, "rule": rule}
    return None


def _check_boot(n_boot: int, level: float) -> tuple[int, float]:
    if int(n_boot) != n_boot or n_boot < 1:
        raise InputError(f"n_boot={n_boot!r} must be a positive integer (e.g. 1000)")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise InputError(f"level={level} must be in (0, 1), e.g. 0.95 for a 95 % interval")
    return int(n_boot), level


def _resampled_counts(pos: np.ndarray, n_id: int, u: int, n_boot: int, seed: int):
    """Yield ``(c_id, c_ood)`` count matrices, one row per stratified bootstrap resample.

    ID and OOD samples are resampled separately with replacement (each side keeps its size), so every
    resample has both classes. Resampling a sample = adding one to the count at its score's position.
    """
    rngs = _side_rngs(seed)
    sides = (pos[:n_id], pos[n_id:])
    chunk = max(1, min(n_boot, _BOOT_CELLS // max(u, pos.size)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        offsets = (np.arange(b) * u)[:, None]
        counts = []
        for side, rng in zip(sides, rngs):
            draw = side[rng.integers(0, side.size, size=(b, side.size))]
            counts.append(np.bincount((draw + offsets).ravel(), minlength=b * u).reshape(b, u))
        yield counts[0], counts[1]


def _side_rngs(seed: int) -> list[np.random.Generator]:
    # One stream per class, so resample i is the same whatever the chunking (and in the fallback loop).
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(metric_fn: Callable[..., float], scores_id: Any, scores_ood: Any, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of ``metric_fn(scores_id, scores_ood)``.

    Stratified: ID and OOD scores are resampled separately with replacement, each keeping its size.
    For the metrics of this module (and ``functools.partial(fpr_at_tpr, tpr=...)``) all ``n_boot``
    resamples are evaluated at once on count matrices (1000 resamples of 10k + 10k scores: about a
    second); any other callable is called once per resample. Deterministic for a given ``seed``.
    """
    n_boot, level = _check_boot(n_boot, level)
    s_id, s_ood = _pair(scores_id, scores_ood)
    found = _kernel_for(metric_fn)
    if found is None:
        return _interval(_bootstrap_loop(metric_fn, s_id, s_ood, n_boot, seed), level)
    kernel, kw = found
    _, _, _, pos = _tally(s_id, s_ood)
    u = int(pos.max()) + 1
    stats = np.concatenate([kernel(_Curve(a, b), **kw) for a, b in _resampled_counts(pos, s_id.size, u, n_boot, seed)])
    return _interval(stats, level)


def _bootstrap_loop(metric_fn: Callable[..., float], s_id: np.ndarray, s_ood: np.ndarray, n_boot: int,
                    seed: int) -> np.ndarray:
    """Fallback for arbitrary callables: the same stratified resamples, one call each."""
    rng_id, rng_ood = _side_rngs(seed)
    out = np.empty(n_boot)
    for i in range(n_boot):
        out[i] = metric_fn(s_id[rng_id.integers(0, s_id.size, s_id.size)],
                           s_ood[rng_ood.integers(0, s_ood.size, s_ood.size)])
    return out


def evaluate(scores_id: Any, scores_ood: Any, *, bootstrap: int = 0, seed: int = 0,
             level: float = 0.95) -> dict[str, Any]:
    """All metrics as a dict of floats in [0, 1]: ``auroc, fpr95, aupr_in, aupr_out, fpr80,
    detection_error`` (higher is better for AUROC/AUPR, lower for the FPRs and the detection error).

    With ``bootstrap=B > 0``, also ``<key>_ci = (low, high)`` for every key: a ``level`` percentile
    interval from ``B`` stratified resamples shared by all metrics (see :func:`bootstrap_ci`).
    """
    s_id, s_ood = _pair(scores_id, scores_ood)
    _, c_id, c_ood, pos = _tally(s_id, s_ood)
    kernels = {key: _KERNELS[fn] for key, fn in _EVALUATE.items()}
    curve = _Curve(c_id, c_ood)
    out: dict[str, Any] = {key: float(k(curve, **kw)) for key, (k, kw) in kernels.items()}
    if bootstrap:
        n_boot, level = _check_boot(bootstrap, level)
        stats: dict[str, list[np.ndarray]] = {key: [] for key in kernels}
        for a, b in _resampled_counts(pos, s_id.size, c_id.size, n_boot, seed):
            curve = _Curve(a, b)  # cumulative sums shared by all six metrics
            for key, (k, kw) in kernels.items():
                stats[key].append(k(curve, **kw))
        for key in kernels:
            out[f"{key}_ci"] = _interval(np.concatenate(stats[key]), level)
    return out


# ------------------------------------------------------------------------------------ streaming metrics
class OODMetrics:
    """Metrics accumulated batch by batch: ``update(scores, is_id)`` any number of times, then ``compute()``,
    which returns exactly :func:`evaluate`'s numbers on all ID and all OOD scores seen (without bootstrap).

    Memory is O(number of distinct score values): the scores are folded into per-value ID/OOD counts (the
    only thing every metric depends on, see the module docstring) every ``compact_every`` samples, so tied
    or quantised scores cost nothing and continuous ones cost one float64 and two counts each. Scores follow
    gradood's convention (higher = more ID)::

        m = OODMetrics()
        for x, is_id in loader:
            m.update(detector.score(probe.signals(x)), is_id)
        m.compute()   # {'auroc': ..., 'fpr95': ..., ...}
    """

    def __init__(self, compact_every: int = 1_000_000) -> None:
        if isinstance(compact_every, bool) or not isinstance(compact_every, (int, np.integer)) or compact_every < 1:
            raise InputError(f"compact_every must be a positive integer, got {compact_every!r}")
        self.compact_every = int(compact_every)
        self.reset()

    def reset(self) -> "OODMetrics":
        """Forget every score seen."""
        self._values = np.empty(0, dtype=np.float64)  # distinct values, ascending
        self._c_id = np.empty(0, dtype=np.int64)
        self._c_ood = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        return self

    def update(self, scores: Any, is_id: Any) -> "OODMetrics":
        """Add a batch: ``scores`` 1-D (higher = more ID); ``is_id`` one bool per score, or a single bool for the
        whole batch (True = in-distribution)."""
        s = _as_scores(scores, "scores")
        flags = np.asarray(is_id.detach().cpu().numpy() if hasattr(is_id, "detach") else is_id)
        if flags.ndim == 0:
            flags = np.full(s.size, flags)
        if flags.shape != s.shape:
            raise InputError(f"is_id has shape {flags.shape} but scores have {s.shape}: pass one flag per score "
                             "(True = in-distribution) or a single bool for the whole batch")
        if flags.dtype != np.bool_:
            if flags.dtype.kind not in "iu" or not np.isin(flags, (0, 1)).all():
                raise InputError(f"is_id must be booleans (or 0/1), got dtype {flags.dtype} with values "
                                 f"{np.unique(flags)[:5]}")
            flags = flags.astype(bool)
        self._pending.append((s, flags))
        self._n_pending += s.size
        if self._n_pending >= self.compact_every:
            self._compact()
        return self

    def _compact(self) -> None:
        if not self._pending:
            return
        s = np.concatenate([self._values] + [p[0] for p in self._pending])
        w_id = np.concatenate([self._c_id] + [p[1].astype(np.int64) for p in self._pending])
        w_ood = np.concatenate([self._c_ood] + [(~p[1]).astype(np.int64) for p in self._pending])
        values, inverse = np.unique(s, return_inverse=True)
        inverse = inverse.reshape(-1)
        self._values = values
        self._c_id = np.bincount(inverse, weights=w_id, minlength=values.size).astype(np.int64)
        self._c_ood = np.bincount(inverse, weights=w_ood, minlength=values.size).astype(np.int64)
        self._pending, self._n_pending = [], 0

    @property
    def counts(self) -> tuple[int, int]:
        """``(n_id, n_ood)`` seen so far."""
        self._compact()
        return int(self._c_id.sum()), int(self._c_ood.sum())

    def compute(self) -> dict[str, float]:
        """:func:`evaluate`'s metrics (fractions in [0, 1]) over everything passed to :meth:`update`."""
        n_id, n_ood = self.counts
        if n_id == 0 or n_ood == 0:
            raise InputError(f"OODMetrics has seen {n_id} ID and {n_ood} OOD scores; metrics need at least one of "
                             "each (pass is_id=True for in-distribution batches, False for OOD ones)")
        curve = _Curve(self._c_id[::-1], self._c_ood[::-1])  # descending, as _tally orders them
        return {key: float(_KERNELS[fn][0](curve, **_KERNELS[fn][1])) for key, fn in _EVALUATE.items()}
