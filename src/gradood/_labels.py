"""Class labels as gradood stores them: a 1-D int64 tensor, ``-1`` (:data:`UNLABELLED`) for samples without a
class. One conversion for every way labels arrive (``Signals.from_arrays``, a loader's ``(x, y)`` batches), so
that strings, booleans and fractional floats are refused with a message instead of a raw ``TypeError`` or a
silent truncation (``int(2.7) == 2``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import InputError

#: label of samples without a class (noise, unlabelled OOD sets); the same value as gradood.data.UNLABELLED
UNLABELLED = -1


def as_label_tensor(labels: Any, what: str = "labels") -> torch.Tensor:
    """``labels`` (numpy, torch or a list) as a flat int64 tensor. Integer values, and floats that are whole
    numbers (``3.0``), are accepted; anything else is an :class:`InputError` naming ``what``."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().to("cpu")
    else:
        a = np.asarray(labels)
        if a.dtype.kind not in "iufb":
            example = np.asarray(a.ravel()[:1]).tolist()[0] if a.size else None
            raise InputError(
                f"{what} must be integer class indices (0..C-1, or -1 for unlabelled), got {a.dtype} values such "
                f"as {example!r}. Map class names to indices first, e.g. "
                "names, labels = numpy.unique(labels, return_inverse=True)."
            )
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dtype == torch.bool:
        raise InputError(f"{what} must be integer class indices, got booleans: pass labels.astype(int) if True/False "
                         "are the classes 1/0.")
    if t.is_complex():
        raise InputError(f"{what} must be integer class indices, got complex numbers.")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(bad.any()):
            raise InputError(
                f"{what} must be integer class indices, got {int(bad.sum())} non-integer values such as "
                f"{t[bad].flatten()[:3].tolist()}: converting them would truncate them to other classes. "
                "Pass the integer labels."
            )
    return t.to(torch.int64, copy=True).flatten()  # a copy: the caller's array may change later
