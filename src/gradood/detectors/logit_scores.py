"""Logit-only baselines: MSP, MaxLogit, Energy, KL-matching. Higher = more in-distribution.

All read the logits of one forward pass (docs/methods.md 3.1-3.3, 3.9).
"""

from __future__ import annotations

import torch

from ..signals import LOGITS, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register


@register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    Score ``max_k softmax(f / T)_k``; higher = more ID. Inputs: logits. Fits nothing.
    Hyperparameters: ``temperature`` T (default 1; ODIN without perturbation when T > 1).
    """

    paper = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"
    citation = _papers.MSP

    hyperparams = {"temperature": hp.positive()}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, signals: Signals) -> torch.Tensor:
        return torch.softmax(signals.logits.float() / self.temperature, dim=1).amax(dim=1)


@register("maxlogit")
class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., ICML 2022, "Scaling OOD detection").

    Score ``max_k f_k``; higher = more ID. Inputs: logits. Fits nothing. No hyperparameters.
    """

    paper = "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"
    citation = _papers.SCALING_OOD

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.logits.amax(dim=1)


@register("energy")
class Energy(Detector):
    """Negative free energy (Liu et al., NeurIPS 2020).

    Score ``T * logsumexp(f / T)``; higher = more ID. Inputs: logits. Fits nothing.
    Hyperparameters: ``temperature`` T (default 1, as in all five source papers).
    """

    paper = "Liu et al., Energy-based Out-of-distribution Detection, NeurIPS 2020"
    citation = _papers.ENERGY

    hyperparams = {"temperature": hp.positive()}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, signals: Signals) -> torch.Tensor:
        T = self.temperature
        return T * torch.logsumexp(signals.logits / T, dim=1)


@register("klmatching", )
class KLMatching(Detector):
    """KL-matching (Hendrycks et al., "Scaling OOD detection", 2019/2022).

    Fit: class templates ``d_k`` = mean softmax over the fit samples whose *predicted* class is k (classes
    nobody is predicted as get the one-hot template, as in OpenOOD). Score ``-min_k KL(p(x) || d_k)``;
    higher = more ID. Inputs: logits. Hyperparameters: ``smoothing`` (default 1e-8): templates are mixed
    with the uniform distribution by this weight so that ``log d_k`` stays finite.
    """

    paper = "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"
    citation = _papers.SCALING_OOD
    fits_on_id = True

    hyperparams = {"smoothing": hp.real(low=0, high=1, low_open=True)}

    def __init__(self, smoothing: float = 1e-8) -> None:
        self.smoothing = smoothing

    def _fit(self, signals: Signals, **_: object) -> None:
        p = torch.softmax(signals.logits.double(), dim=1)
        C = p.shape[1]
        pred = p.argmax(dim=1)
        sums = torch.zeros(C, C, dtype=torch.float64).index_add_(0, pred, p)
        counts = torch.bincount(pred, minlength=C).double()
        self.templates_, self.class_counts_ = kl_templates(sums, counts, self.smoothing)

    def _score(self, signals: Signals) -> torch.Tensor:
        p = torch.softmax(signals.logits.double(), dim=1)
        # KL(p || d_k) = sum p log p - sum p log d_k, for every k at once
        neg_entropy = torch.special.xlogy(p, p).sum(dim=1, keepdim=True)
        kl = neg_entropy - p @ self.templates_.log().T
        return -kl.amin(dim=1)


def kl_templates(sums: torch.Tensor, counts: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-matching's templates from per-predicted-class softmax sums (``C x C``) and counts (``C``): the mean
    softmax of each class, one-hot for classes nobody is predicted as, mixed with uniform by ``smoothing``.
    Shared by the in-memory fit and the fit from shards (:mod:`gradood.stream`)."""
    C = sums.shape[0]
    templates = torch.eye(C, dtype=torch.float64)
    seen = counts > 0
    templates[seen] = sums[seen] / counts[seen, None]
    return (1 - smoothing) * templates + smoothing / C, counts.long()


__all__ = ["MSP", "MaxLogit", "Energy", "KLMatching", "LOGITS"]
