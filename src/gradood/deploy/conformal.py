"""Split-conformal thresholds and p-values for ID-scores (higher = more in-distribution).

Given ``n`` held-out ID calibration scores and a target true-positive rate ``tpr`` (share of ID samples to
accept), let ``alpha = 1 - tpr`` and ``k = floor((n + 1) * alpha)``. The threshold is the ``k``-th smallest
calibration score ``s_(k)``; a sample is accepted as ID iff ``score >= s_(k)``, rejected iff below.

Guarantee (exchangeability): if the calibration scores and the score of a new ID sample are exchangeable (e.g.
the samples are i.i.d. from the same distribution and the detector was not fitted on the calibration samples),
the new sample's rank among the ``n + 1`` scores is uniform, so it falls strictly below ``s_(k)`` with
probability at most ``k / (n + 1) <= alpha``:

    P(a new ID sample is rejected) <= 1 - tpr,    at every finite n,

with equality ``k / (n + 1)`` for continuous scores (so the rejection rate is also close to ``alpha``: within
``1 / (n + 1)``). The probability is over the draw of the calibration set and the new sample together; a single
fixed calibration set achieves it on average. It says nothing about OOD samples.

``k >= 1`` needs ``n >= ceil(1 / alpha) - 1`` calibration samples (19 for tpr = 0.95, 99 for tpr = 0.99):
with fewer, no calibration score is low enough and calibration is refused.

The conformal p-value of a score ``s`` is ``(1 + #{calibration scores <= s}) / (n + 1)``: for a new ID sample,
``P(p <= u) <= u`` for every ``u``; a sample is accepted iff its p-value exceeds ``1 - tpr`` (the same decision
as the threshold).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import ConfigError, InputError


def check_tpr(tpr: object) -> Fraction:
    """``tpr`` as an exact fraction in (0, 1) (``0.95`` is read as 19/20, not as its binary approximation,
    so that ``(n + 1)(1 - tpr)`` at an integer is not floored one too low)."""
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.integer, np.floating, Fraction)):
        raise ConfigError(f"tpr must be a number in (0, 1), e.g. 0.95, got {tpr!r}.")
    value = tpr if isinstance(tpr, Fraction) else Fraction(repr(float(tpr)))
    if not 0 < value < 1:
        raise ConfigError(f"tpr must be in (0, 1) (the share of ID samples to accept, e.g. 0.95, not 95), got {tpr!r}.")
    return value


def rank_for(n: int, tpr: object) -> int:
    """``k = floor((n + 1)(1 - tpr))``: the threshold is the k-th smallest of n calibration scores."""
    return math.floor((n + 1) * (1 - check_tpr(tpr)))


def min_calibration_size(tpr: object) -> int:
    """The smallest n with ``k >= 1``: ``ceil(1 / (1 - tpr)) - 1``."""
    return math.ceil(1 / (1 - check_tpr(tpr))) - 1


def conformal_threshold(scores: np.ndarray, tpr: object) -> tuple[float, int]:
    """``(threshold, k)`` from calibration ID-scores; :class:`InputError` when there are too few of them."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise InputError(f"calibration scores must be 1-D, got shape {s.shape}.")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise InputError(f"{bad} calibration scores are NaN or infinite: the detector failed on some calibration "
                         "samples; fix or drop them before calibrating.")
    n = s.size
    k = rank_for(n, tpr)
    if k < 1:
        need = min_calibration_size(tpr)
        raise InputError(
            f"calibrating at tpr={float(check_tpr(tpr))} needs at least {need} held-out ID samples (the threshold "
            f"is the floor((n+1)(1-tpr))-th smallest score, which must exist); got {n}. Pass more calibration "
            "data or a lower tpr.")
    return float(np.partition(s, k - 1)[k - 1]), k


def conformal_p_values(sorted_calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{cal <= s}) / (n + 1)`` for each score (``sorted_calibration`` ascending)."""
    n = sorted_calibration.size
    counts = np.searchsorted(sorted_calibration, np.asarray(scores, dtype=np.float64), side="right")
    return (1.0 + counts) / (n + 1.0)
