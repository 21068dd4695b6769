"""ReAct: rectified activations (Sun, Guo & Li, NeurIPS 2021). Higher = more in-distribution."""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..signals import FEATURES, Request, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register
from .output_feature import _percentile


@register("react")
class ReAct(Detector):
    """ReAct: clip the penultimate features at ``c``, re-apply the head, score the energy.

    ``h_bar = min(h, c)``, ``f_bar = W h_bar + b``, score ``T * LSE(f_bar / T)``; higher = more ID.
    Inputs: penultimate features and the head's weight/bias (from the probe, or ``Signals.from_arrays(
    head_weight=, head_bias=)``). Fit: ``c`` = the ``percentile``-th percentile of all ID feature values
    (flattened over units and samples; official default 90). Hyperparameters: ``percentile`` (90),
    ``clip`` (None; an absolute c that skips fitting -- RG's reproduction used c = 1; ``inf`` = no clipping,
    which equals Energy), ``temperature`` (1).
    """

    paper = "Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021"
    citation = _papers.REACT
    signals = ("features",)

    hyperparams = {"percentile": hp.real(low=0, high=100, low_open=True),
                   "clip": hp.non_negative(inf=True, none=True), "temperature": hp.positive()}

    def __init__(self, percentile: float = 90.0, clip: float | None = None, temperature: float = 1.0) -> None:
        self.percentile = percentile
        self.clip = clip
        self.temperature = temperature

    @property
    def fits_on_id(self) -> bool:  # type: ignore[override]
        return self.clip is None

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        if self.clip is None:
            self.clip_ = _percentile(signals.features, float(self.percentile))

    @property
    def threshold(self) -> float:
        return self.clip if self.clip is not None else self.clip_

    def _score(self, signals: Signals) -> torch.Tensor:
        w, b = signals.head_params()
        h = signals.features.double()
        if w.shape[1] != h.shape[1]:
            raise InputError(f"the head weight is {tuple(w.shape)} but features have {h.shape[1]} dims.")
        c = self.threshold
        hc = h if math.isinf(c) else h.clamp(max=c)
        f = hc @ w.double().T
        if b is not None:
            f = f + b.double()
        T = self.temperature
        return T * torch.logsumexp(f / T, dim=1)
