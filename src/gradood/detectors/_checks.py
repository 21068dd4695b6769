"""Checks shared by detectors: class labels for class-conditional fits, degenerate fits, costly tuning runs.

* :func:`class_labels` -- the one gate for every detector that fits per-class statistics on TRUE labels
  (Mahalanobis and its ensemble, the low-dimensional-gradient heads): no labels, unlabelled samples
  (``-1``, :data:`gradood.data.UNLABELLED`), negative labels and labels beyond the model's classes are
  :class:`~gradood.errors.InputError` naming the data, the count and the fix -- never a ``bincount`` or
  indexing traceback. (Non-integer labels never get this far: :func:`gradood._labels.as_label_tensor` refuses
  them when the signals are built.)
* :func:`covariance_rank` and :class:`DegenerateFitWarning` -- fits that run but whose result is decided by
  round-off (a covariance of lower rank than the dimensions it is inverted or split in).
* :func:`warn_if_costly` and :class:`CostWarning` -- a tuning grid about to run the model more than
  :data:`SAMPLE_PASS_WARNING` times (one sample through one forward or backward pass = one sample-pass).
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from .._labels import UNLABELLED
from ..errors import InputError
from ..signals import Request, Signals

#: above this many sample-passes a tuning run warns with its estimated time before it starts
SAMPLE_PASS_WARNING = 200_000


class DegenerateFitWarning(UserWarning):
    """A fit that ran but is ill-determined (rank-deficient covariance, fewer samples than dimensions)."""


class CostWarning(UserWarning):
    """A run is about to evaluate far more sample-passes than the defaults do."""


# ---------------------------------------------------------------------- labels
def class_labels(signals: Signals, who: str, *, n_classes: int | None = None) -> torch.Tensor:
    """The true labels of ``signals`` for a class-conditional fit by ``who``, checked (int64, ``N``)."""
    y = signals.labels
    if y is None:
        raise InputError(
            f"{who} fits class statistics on true labels, but {signals.name!r} has none: pass a loader yielding "
            "(x, y), a tuple (inputs, labels), or Signals.from_arrays(..., labels=...)."
        )
    C = n_classes if n_classes is not None else signals.known_num_classes()
    check_label_values(y, who, signals.name, C)
    return y


def check_label_values(y: torch.Tensor, who: str, data: str, n_classes: int | None) -> None:
    """Every label a class index in ``[0, n_classes)`` (upper bound unchecked when unknown)."""
    n = len(y)
    if n == 0:
        raise InputError(f"{who}: {data!r} has no labelled samples to fit class statistics on.")
    unlabelled = int((y == UNLABELLED).sum())
    if unlabelled:
        raise InputError(
            f"{who} fits class statistics on true labels, but {unlabelled} of {n} samples of {data!r} are "
            f"unlabelled (label {UNLABELLED}, gradood.data.UNLABELLED): fit on labelled ID training data "
            "(not noise or an unlabelled OOD set), or drop those samples first "
            "(signals.subset(numpy.flatnonzero(labels >= 0)))."
        )
    low = int(y.min())
    if low < 0:
        raise InputError(f"{who}: {data!r} has negative labels (down to {low}); labels must be class indices "
                         "0..C-1 (or -1 for unlabelled samples, which cannot be fitted on).")
    high = int(y.max())
    if n_classes is not None and high >= n_classes:
        raise InputError(
            f"{who}: {data!r} has labels up to {high}, but the model has {n_classes} classes (0..{n_classes - 1}): "
            "the labels do not belong to this model's classes -- check the dataset/model pairing or the label "
            "mapping."
        )


# ---------------------------------------------------------------------- degenerate fits
def covariance_rank(cov: torch.Tensor) -> int:
    """Numerical rank of a symmetric PSD matrix (numpy's rule: eigenvalues above max * D * eps(float64))."""
    evals = torch.linalg.eigvalsh(cov.double())
    top = float(evals.abs().max()) if evals.numel() else 0.0
    tol = top * cov.shape[0] * torch.finfo(torch.float64).eps
    return int((evals > tol).sum())


def constant_units(feats: torch.Tensor) -> int:
    """How many feature dimensions take a single value on every sample (dead ReLU units, constant taps)."""
    f = feats.double()
    return int(((f.amax(dim=0) - f.amin(dim=0)) == 0).sum())


def warn_degenerate(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, DegenerateFitWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------- cost of tuning runs
def pending_samples(splits: Sequence[Signals | None], request: Request) -> int:
    """Samples of the distinct splits that do not hold ``request`` yet (what the next pass will compute)."""
    seen: set[int] = set()
    total = 0
    for s in splits:
        if s is None or id(s) in seen or s.has(request):
            continue
        seen.add(id(s))
        total += len(s)
    return total


def seconds_per_sample_pass(signals: Signals, max_samples: int = 32) -> float | None:
    """One forward + backward of up to ``max_samples`` samples of the first batch, timed, per sample-pass
    (None when the signals have no model or data to time)."""
    probe, source = signals.probe, signals.source
    if probe is None or source is None:
        return None
    from ._perturb import input_grad

    for x, _ in source.iter_batches():
        x = probe.prepare(x, batch_index=0)[:max_samples]
        t0 = time.perf_counter()
        input_grad(probe, x, lambda f, _t: torch.logsumexp(f.double(), dim=1))
        return (time.perf_counter() - t0) / (2 * x.shape[0])
    return None


def warn_if_costly(who: str, what: str, n_samples: int, passes_per_sample: int, fix: str,
                   timing_from: Signals | None = None) -> int:
    """Warn (with the estimated time, measured on one small batch of ``timing_from``) when ``n_samples x
    passes_per_sample`` exceeds :data:`SAMPLE_PASS_WARNING`; returns the number of sample-passes."""
    total = int(n_samples) * int(passes_per_sample)
    if total <= SAMPLE_PASS_WARNING:
        return total
    per = seconds_per_sample_pass(timing_from) if timing_from is not None else None
    eta = f", estimated {_duration(total * per)} on this machine" if per is not None else ""
    warnings.warn(
        f"{who}: {what} evaluates {passes_per_sample} forward/backward passes per sample on {n_samples} samples = "
        f"{total:,} sample-passes{eta} (more than {SAMPLE_PASS_WARNING:,}). {fix}",
        CostWarning, stacklevel=4,
    )
    return total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
