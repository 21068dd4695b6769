"""Exceptions raised by gradood.

Every error names the problem and what to do about it. All derive from :class:`GradoodError`, and each
also derives from the built-in exception a Python user would expect (``ValueError`` for bad values,
``KeyError``-like lookups stay ``ValueError`` so messages are not quoted), so ``except ValueError`` keeps
working in user code.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class GradoodError(Exception):
    """Base class of every error gradood raises on purpose."""


class InputError(GradoodError, ValueError):
    """Bad data: NaN/Inf, wrong shape, empty dataset, mismatched dimensions."""


class ConfigError(GradoodError, ValueError):
    """Unknown detector/dataset/model name, unknown or invalid hyperparameter, bad benchmark spec."""


class ModelError(GradoodError, ValueError):
    """The model cannot be probed as asked: no linear head, model in train mode, unsupported layer."""


class NotApplicableError(ModelError):
    """The detector's method does not apply to this model's architecture or inputs (no convolutional feature
    map for a feature-map method, no BatchNorm, no dropout, token inputs for a method defined on images). The
    benchmark reports such a detector as not applicable instead of failing the run."""


class NotFittedError(GradoodError, _SklearnNotFittedError):
    """A detector that needs fitting was used before ``fit``."""


class ChecksumError(GradoodError, OSError):
    """A downloaded or cached file does not have the expected sha256; it was not used and was removed."""


class OutputError(GradoodError, OSError):
    """A results or cache folder cannot be written: it is a file, not writable, or the disk is full."""


class TuningDataError(GradoodError, ValueError):
    """A detector whose tuning needs an OOD validation split was fitted without one."""
