"""Deployment methods of every detector: save, calibrate (conformal threshold), predict, p-values.

:class:`DeployMixin` is a base of :class:`gradood.detectors.Detector`; it needs from the detector only
``score``, ``_check_fitted``, ``label`` and the fitted attributes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import NotFittedError
from .conformal import check_tpr, conformal_p_values, conformal_threshold
from .contract import check_contract, model_contract

if TYPE_CHECKING:
    from ..signals import Signals

M = TypeVar("M", bound="DeployMixin")

#: attributes set by :meth:`DeployMixin.calibrate`; a refit drops them (the threshold belongs to the old fit)
CALIBRATION_ATTRS = ("threshold_", "tpr_", "calibration_scores_", "calibration_rank_")


class DeployMixin:
    """Persistence and calibrated decisions (see :mod:`gradood.deploy`)."""

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False,
             metadata: dict[str, Any] | None = None) -> Path:
        """Save the fitted (and possibly calibrated) detector to the folder ``path``: tensors in safetensors,
        everything else in JSON, no pickle. Load it with :func:`gradood.load_detector`. ``overwrite`` replaces
        an existing detector folder; ``metadata`` is a JSON-able dict stored alongside."""
        from .persist import save_detector

        return save_detector(self, path, overwrite=overwrite, metadata=metadata)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ calibration
    def calibrate(self: M, id_val_signals: "Signals", tpr: float = 0.95) -> M:
        """Set ``threshold_`` from held-out ID data so that at most ``1 - tpr`` of new ID samples are rejected.

        With ``n`` calibration scores, ``threshold_`` is the ``k``-th smallest, ``k = floor((n + 1)(1 - tpr))``
        (split conformal); :meth:`predict` accepts a sample iff its score ``>= threshold_``.

        **Guarantee**: if the calibration samples and a new ID sample are exchangeable (e.g. i.i.d. draws from
        the ID distribution, none of them used to fit the detector), then
        ``P(the new ID sample is rejected) <= 1 - tpr`` at every finite ``n`` (over the draw of both), and for
        continuous scores it equals ``k / (n + 1)``, within ``1 / (n + 1)`` of ``1 - tpr``. Calibrating on the
        fit data breaks exchangeability (fit samples score as more ID) and the guarantee with it. Nothing is
        promised about OOD samples.

        Refused (:class:`~gradood.errors.NotFittedError`) for a detector that needs fitting and is not fitted,
        and (:class:`~gradood.errors.InputError`) for fewer than ``ceil(1 / (1 - tpr)) - 1`` samples (19 at
        tpr 0.95). Returns ``self``.
        """
        if self._needs_fit() and not self.is_fitted:  # type: ignore[attr-defined]
            raise NotFittedError(f"{self.label} is not fitted: call .fit(<ID training signals>) before "  # type: ignore[attr-defined]
                                 ".calibrate(<held-out ID signals>).")
        frac = check_tpr(tpr)
        scores = self.score(id_val_signals)  # type: ignore[attr-defined]
        threshold, k = conformal_threshold(scores, frac)
        self.threshold_ = threshold
        self.tpr_ = float(frac)
        self.calibration_scores_ = np.sort(scores)
        self.calibration_rank_ = k
        return self

    @property
    def is_calibrated(self) -> bool:
        return getattr(self, "threshold_", None) is not None

    def _check_calibrated(self) -> None:
        if not self.is_calibrated:
            raise NotFittedError(f"{self.label} has no threshold: call .calibrate(<held-out ID signals>, "  # type: ignore[attr-defined]
                                 "tpr=0.95) before .predict() / .p_values().")

    def decide(self, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(accepted, p_values)`` for precomputed scores of this detector (NaN scores are rejected)."""
        self._check_calibrated()
        s = np.asarray(scores, dtype=np.float64)
        return s >= self.threshold_, conformal_p_values(self.calibration_scores_, s)

    def predict(self, signals: "Signals") -> np.ndarray:
        """Boolean array, True = accepted as in-distribution (``score >= threshold_``)."""
        return self.decide(self.score(signals))[0]  # type: ignore[attr-defined]

    def p_values(self, signals: "Signals") -> np.ndarray:
        """Conformal p-values ``(1 + #{calibration scores <= s}) / (n + 1)``: small = unlike the ID calibration
        data. For a new ID sample ``P(p <= u) <= u``; ``p > 1 - tpr`` iff the sample is accepted."""
        return self.decide(self.score(signals))[1]  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ hooks called by Detector
    def _after_fit(self, signals: "Signals") -> None:
        """Record the model contract; drop the calibration of any previous fit."""
        for a in CALIBRATION_ATTRS:
            self.__dict__.pop(a, None)
        self.model_contract_ = model_contract(self, signals)  # type: ignore[arg-type]

    def _check_contract(self, signals: "Signals") -> None:
        """A loaded detector refuses signals from another model (naming the mismatch)."""
        contract = getattr(self, "model_contract_", None)
        if contract is not None and getattr(self, "_deployed_from", None) is not None:
            check_contract(contract, signals, f"the detector loaded from {self._deployed_from}",  # type: ignore[attr-defined]
                           perturbs="input-grads" in self.signals)  # type: ignore[attr-defined]
