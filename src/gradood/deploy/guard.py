"""``Guard``: a classifier and a calibrated detector as one ``nn.Module`` that returns logits with decisions.

``out = Guard(model, detector)(x)`` gives ``out.logits`` (the head's output, gradood's logits), ``out.scores``
(higher = more ID), ``out.accepted`` (``score >= threshold``) and ``out.p_values`` (conformal), on the model's
device, with the model in eval mode. It runs the fewest passes the detector needs: a single-pass detector
(MSP, energy, KNN, Mahalanobis, ...) reads the same forward that produces the logits; perturbation detectors
add one forward at the perturbed input (their input gradient comes from the first forward's graph, see
:mod:`gradood._passes`); gradient detectors add their batched backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError, ModelError, NotFittedError
from ..probe import Probe
from ..signals import LOGITS


@dataclass
class GuardOutput:
    """One batch's result. ``accepted`` is True for samples accepted as in-distribution."""

    logits: torch.Tensor
    scores: torch.Tensor
    accepted: torch.Tensor
    p_values: torch.Tensor | None = None


def _rows(x: Any) -> int:
    """Samples in a batch: a tensor's first dimension, or that of a dict's (tokenizer output's) entries."""
    from .._batches import num_rows

    try:
        return max(1, num_rows(dict(x) if isinstance(x, Mapping) else x))
    except (AttributeError, TypeError, StopIteration, IndexError):
        raise InputError(f"Guard takes one batch: a tensor/array of inputs or a dict of tensors (a tokenizer's "
                         f"output), got {type(x).__name__}; for a DataLoader use guard.stream(loader).") from None


class Guard(nn.Module):
    """Wrap ``model`` and a fitted, calibrated ``detector`` (e.g. from :func:`gradood.load_detector`).

    Parameters
    ----------
    model:
        The classifier the detector was fitted on (a loaded detector checks its weights' fingerprint).
    detector:
        A fitted detector. Its ``threshold_`` (from :meth:`~gradood.Detector.calibrate`) decides acceptance;
        pass ``threshold=`` to use another one (then ``p_values`` is None unless the detector is calibrated).
    head, input_std, input_mean:
        As for :class:`gradood.Probe`; default: what the detector recorded when it was fitted.
    """

    def __init__(self, model: nn.Module, detector: Any, *, threshold: float | None = None, head: str | None = None,
                 input_std: float | Sequence[float] | None = None,
                 input_mean: float | Sequence[float] | None = None) -> None:
        super().__init__()
        from ..detectors.base import Detector

        if not isinstance(model, nn.Module):
            raise ModelError(f"Guard needs the classifier as a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(detector, Detector):
            raise ConfigError(f"Guard needs a gradood detector, got {type(detector).__name__}.")
        detector._check_fitted()
        if threshold is None and not detector.is_calibrated:
            raise NotFittedError(f"{detector.label} has no threshold: call detector.calibrate(<held-out ID "
                                 "signals>, tpr=0.95) first, or pass Guard(..., threshold=<score>).")
        if threshold is not None and not np.isfinite(float(threshold)):
            raise ConfigError(f"threshold must be a finite number, got {threshold!r}.")
        self.model = model
        self.detector = detector
        self.threshold = float(detector.threshold_ if threshold is None else threshold)
        contract = getattr(detector, "model_contract_", None) or {}
        self.probe = Probe(model, head=head if head is not None else contract.get("head"),
                           input_std=input_std if input_std is not None else contract.get("input_std"),
                           input_mean=input_mean if input_mean is not None else contract.get("input_mean"))
        shape = contract.get("input_shape")
        self._input_shape = tuple(shape) if shape is not None else None

    def extra_repr(self) -> str:
        return f"detector={self.detector.label}, threshold={self.threshold:.6g}"

    @property
    def device(self) -> torch.device:
        return self.probe.device

    def forward(self, x: torch.Tensor) -> GuardOutput:
        """Logits, scores and decisions for one batch of inputs (as the model takes them; numpy arrays too)."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor) and self._input_shape is not None and tuple(x.shape[1:]) != self._input_shape:
            raise InputError(f"inputs have per-sample shape {tuple(x.shape[1:])}, but the detector was fitted on "
                             f"{self._input_shape}: resize them as the model was fed when the detector was fitted.")
        signals = self.probe.signals(x, batch_size=_rows(x), name="guard", progress=False)  # one batch
        # every signal the detector reads, and the logits, in one pass over this batch
        signals.require([*self.detector.requests(), LOGITS])
        scores = self.detector.score(signals)
        device = self.probe.device
        logits = signals.logits.to(device)
        s = torch.from_numpy(scores).to(device)
        accepted = s >= self.threshold
        p = None
        if self.detector.is_calibrated:
            p = torch.from_numpy(self.detector.decide(scores)[1]).to(device)
        return GuardOutput(logits=logits, scores=s, accepted=accepted, p_values=p)

    def stream(self, data: Any, batch_size: int = 128) -> Iterator[GuardOutput]:
        """:meth:`forward` over every batch of ``data`` (a DataLoader, Dataset, tensor or ``(inputs, labels)``)."""
        from .._batches import BatchSource

        for x, _y in BatchSource(data, batch_size=batch_size).iter_batches():
            yield self(x)
