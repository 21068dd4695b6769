"""Softmax and logit scores beyond MSP/Energy: Entropy, GEN, temperature scaling, weighted energy.

All read the logits of the shared forward pass only. Higher = more in-distribution for every score.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import ConfigError, InputError
from ..signals import LOGITS, Signals
from . import _papers
from . import _hyperparams as hp
from ._checks import class_labels
from .base import Detector, register


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=1)


@register("entropy")
class Entropy(Detector):
    """Predictive entropy (the baseline used throughout the OOD literature, e.g. OpenOOD / pytorch-ood's
    ``Entropy``; uncertainty by Shannon entropy goes back to Shannon, 1948).

    Score ``-H(p) = sum_k p_k log p_k`` with ``p = softmax(f)``; higher = more ID (a confident, peaked
    prediction). Inputs: logits. Fits nothing. No hyperparameters. Range ``[-log C, 0]``.
    """

    paper = ("Shannon entropy of the softmax as used by OpenOOD (Yang et al., NeurIPS 2022 D&B, "
             "https://arxiv.org/abs/2210.07242) and pytorch-ood")
    citation = _papers.OPENOOD

    def _score(self, signals: Signals) -> torch.Tensor:
        p = _probs(signals.logits)
        return torch.special.xlogy(p, p).sum(dim=1)


@register("gen")
class GEN(Detector):
    """GEN: generalised entropy (Liu, Lochman & Zach, CVPR 2023, https://arxiv.org/abs/2303.09094).

    ``G_gamma(p) = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` over the M largest softmax probabilities;
    score ``-G_gamma(p)``; higher = more ID. Inputs: logits. Fits nothing.
    Hyperparameters: ``gamma`` (0.1, the paper's value), ``m`` (100: the top-M classes; ``min(M, C)`` is used,
    so every class counts when C <= 100). With ``gamma=1`` and every class, ``G = 1 - sum p^2`` (Gini).
    """

    paper = "Liu, Lochman & Zach, GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection, CVPR 2023"
    citation = _papers.GEN

    hyperparams = {"gamma": hp.positive(), "m": hp.integer(minimum=1)}

    def __init__(self, gamma: float = 0.1, m: int = 100) -> None:
        self.gamma = gamma
        self.m = m

    def _score(self, signals: Signals) -> torch.Tensor:
        p = _probs(signals.logits)
        top = torch.topk(p, min(int(self.m), p.shape[1]), dim=1).values
        g = self.gamma
        return -(top.pow(g) * (1.0 - top).clamp_min(0.0).pow(g)).sum(dim=1)


def _nll(beta: float, f: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of labels ``y`` under ``softmax(beta * f)`` (beta = 1 / T)."""
    z = beta * f
    return float((torch.logsumexp(z, dim=1) - z.gather(1, y[:, None])[:, 0]).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, bounds: tuple[float, float] = (1e-3, 1e3)
                    ) -> float:
    """The temperature T minimising the NLL of ``labels`` under ``softmax(logits / T)``.

    The NLL is convex in ``beta = 1/T`` (log-sum-exp of a linear function minus a linear function), hence
    unimodal in ``log beta``: a bounded scalar search on ``log beta`` finds the global minimum in ``bounds``.
    """
    from scipy.optimize import minimize_scalar

    f = logits.double()
    y = labels.long().to(f.device)
    lo, hi = math.log(1.0 / bounds[1]), math.log(1.0 / bounds[0])
    res = minimize_scalar(lambda lb: _nll(math.exp(lb), f, y), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-9})
    return 1.0 / math.exp(float(res.x))


@register("temperature-scaling")
class TemperatureScaling(Detector):
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, ICML 2017, https://arxiv.org/abs/1706.04599).

    Fit: one temperature ``T`` minimising the negative log-likelihood of the TRUE labels of ID data under
    ``softmax(f / T)`` (the ID validation split when ``fit`` gets ``id_val=``, else the ID fit data). Score:
    the calibrated maximum softmax probability ``max_k softmax(f / T)_k``; higher = more ID. Inputs: logits
    (+ labels at fit time). Fitted state: ``temperature_``. Hyperparameters: ``min_temperature`` (1e-3) and
    ``max_temperature`` (1e3), the search interval. Not OOD-tuned.
    """

    paper = "Guo, Pleiss, Sun & Weinberger, On Calibration of Modern Neural Networks, ICML 2017"
    citation = _papers.TEMPERATURE_SCALING
    fits_on_id = True

    hyperparams = {"min_temperature": hp.positive(), "max_temperature": hp.positive()}

    def __init__(self, min_temperature: float = 1e-3, max_temperature: float = 1e3) -> None:
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        if max_temperature <= min_temperature:
            raise ConfigError(f"max_temperature ({max_temperature!r}) must be above min_temperature "
                              f"({min_temperature!r}).")

    def _fit(self, signals: Signals, *, id_val: Signals | None = None, **_: object) -> None:
        data = id_val if id_val is not None else signals
        f = data.logits
        y = class_labels(data, "temperature-scaling", n_classes=f.shape[1])
        self.temperature_ = fit_temperature(f, y, bounds=(float(self.min_temperature), float(self.max_temperature)))

    def _score(self, signals: Signals) -> torch.Tensor:
        return torch.softmax(signals.logits.double() / self.temperature_, dim=1).amax(dim=1)


@register("weighted-energy")
class WeightedEnergy(Detector):
    """Weighted energy, as pytorch-ood's ``WeightedEBO`` defines it after VOS (Du, Wang, Cai & Li, ICLR 2022,
    https://arxiv.org/abs/2202.01197).

    Score ``log sum_k relu(w_k) exp(f_k)`` (minus the weighted free energy); higher = more ID. The class
    weights ``w`` come from VOS training (its ``Linear(C, 1)`` weight-energy layer) and are given, not fitted;
    negative weights are clipped to 0, as pytorch-ood does. Inputs: logits. Fits nothing.
    Hyperparameters: ``weights`` (None = every class weight 1, which is exactly Energy at T = 1; otherwise
    one non-negative-after-ReLU number per class, at least one positive).
    """

    paper = "Du, Wang, Cai & Li, VOS: Learning What You Don't Know by Virtual Outlier Synthesis, ICLR 2022"
    citation = _papers.VOS

    hyperparams = {"weights": hp.reals(none=True)}

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is not None:
            weights = tuple(weights)
            if not any(w > 0 for w in weights):
                raise ConfigError(f"weights must have at least one positive entry (negative ones are clipped to 0, "
                                  f"so every class would drop out), got {list(weights)!r}.")
        self.weights = weights

    def _score(self, signals: Signals) -> torch.Tensor:
        f = signals.logits.double()
        if self.weights is None:
            return torch.logsumexp(f, dim=1)
        w = torch.tensor(self.weights, dtype=torch.float64).relu()
        if w.numel() != f.shape[1]:
            raise InputError(f"weighted-energy has {w.numel()} class weights but the model has {f.shape[1]} classes.")
        # log sum_k w_k e^{f_k} = logsumexp(f + log w), with log 0 = -inf dropping a class
        return torch.logsumexp(f + w.log(), dim=1)


__all__: list[Any] = ["Entropy", "GEN", "TemperatureScaling", "WeightedEnergy", "fit_temperature", "LOGITS"]
