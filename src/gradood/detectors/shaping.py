"""Activation shaping of the penultimate features, then the energy of the re-applied head: ASH-P/B/S, SCALE,
DICE (weight sparsification) and BATS (feature truncation to the typical set).

All are the *penultimate* forms: they shape the head's input ``h`` (``N x D``) recorded in the shared
forward pass and re-apply the linear head ``W h + b`` in closed form, so they cost no extra forward pass.
(The papers' ResNet experiments shape the last feature map before global average pooling; OpenOOD's
ASH implementation applies it to the pooled penultimate features, as here.) Higher = more ID for all.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..signals import FEATURES, Request, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register, register_variant

ASH_MODES = ("p", "b", "s")


def _head_energy(signals: Signals, h: torch.Tensor, weight: torch.Tensor | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """``T * LSE((W h + b) / T)`` with the signals' head (or ``weight`` in place of ``W``), float64."""
    w, b = signals.head_params()
    w = (w if weight is None else weight).double()
    if w.shape[1] != h.shape[1]:
        raise InputError(f"the head weight is {tuple(w.shape)} but features have {h.shape[1]} dims.")
    f = h @ w.T
    if b is not None:
        f = f + b.double()
    return temperature * torch.logsumexp(f / temperature, dim=1)


def kept_count(d: int, percentile: float) -> int:
    """How many of ``d`` activations survive pruning at ``percentile`` (the official ASH rule
    ``d - round(d * p / 100)``)."""
    return d - int(round(d * percentile / 100.0))


def top_k_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of each row's k largest entries (ties broken by ``torch.topk``)."""
    idx = torch.topk(h, k, dim=1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx, True)


def _check_kept(d: int, percentile: float, who: str) -> int:
    k = kept_count(d, percentile)
    if k < 1:
        raise ConfigError(f"{who} percentile={percentile:g} prunes all {d} features: use a lower percentile "
                          f"(at most {100.0 * (d - 0.5) / d:.4g} for {d}-dimensional features).")
    return k


def ash(h: torch.Tensor, percentile: float, mode: str) -> torch.Tensor:
    """ASH of each row: keep the top ``d - round(d p/100)`` activations and zero the rest (``"p"``); also set
    the kept ones to ``sum(h) / k`` (``"b"``); or multiply the pruned vector by ``exp(sum(h) / sum(kept))``
    (``"s"``; rows whose kept sum is 0 are left unscaled)."""
    h = h.double()
    k = _check_kept(h.shape[1], percentile, f"ASH-{mode.upper()}")
    mask = top_k_mask(h, k)
    s1 = h.sum(dim=1, keepdim=True)
    pruned = torch.where(mask, h, torch.zeros_like(h))
    if mode == "p":
        return pruned
    if mode == "b":
        return torch.where(mask, (s1 / k).expand_as(h), torch.zeros_like(h))
    s2 = pruned.sum(dim=1, keepdim=True)
    ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))
    return pruned * torch.exp(ratio)


@register("ash-s", mode="s")
class ASH(Detector):
    """ASH: activation shaping (Djurisic, Bozanic, Ashok & Liu, ICLR 2023, https://arxiv.org/abs/2209.09858).

    Per sample, keep the ``k = D - round(D p / 100)`` largest penultimate activations and zero the rest;
    ASH-P stops there, ASH-B sets the kept ones to ``s1 / k`` (``s1`` = the unpruned sum), ASH-S multiplies
    the pruned vector by ``exp(s1 / s2)`` (``s2`` = the pruned sum). Score: the energy ``LSE(W h' + b)`` of
    the re-applied head; higher = more ID. Inputs: penultimate features and the head's weight/bias. Fits
    nothing. Hyperparameters: ``mode`` "p", "b" or "s" (registered as ``ash-p``, ``ash-b``, ``ash-s``),
    ``percentile`` p (90, the paper's ImageNet ASH-S/ASH-P setting and OpenOOD's default).
    Penultimate form (see the module docstring). Ties among the k largest (e.g. zero post-ReLU units when
    fewer than k are positive) are broken by ``torch.topk``, as in the official code; only ASH-B depends on it.
    """

    paper = "Djurisic, Bozanic, Ashok & Liu, Extremely Simple Activation Shaping for Out-of-Distribution Detection, ICLR 2023"
    citation = _papers.ASH
    signals = ("features",)

    hyperparams = {"mode": hp.choice(*ASH_MODES), "percentile": hp.real(low=0, high=100)}

    def __init__(self, mode: str = "s", percentile: float = 90.0) -> None:
        self.mode = mode
        self.percentile = percentile

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _score(self, signals: Signals) -> torch.Tensor:
        return _head_energy(signals, ash(signals.features, self.percentile, self.mode))


register_variant("ash-p", ASH, mode="p")
register_variant("ash-b", ASH, mode="b")


@register("scale")
class SCALE(Detector):
    """SCALE (Xu, Chen, Franchi & Yao, ICLR 2024, https://arxiv.org/abs/2310.00227).

    ASH-S's scale without its pruning: ``h' = h * exp(s1 / s2)`` with ``s1 = sum_j h_j`` and ``s2`` the sum of
    the ``k = D - round(D p / 100)`` largest activations. Score ``LSE(W h' + b)``; higher = more ID. Inputs:
    penultimate features, head weight/bias. Fits nothing. Hyperparameters: ``percentile`` p (85, the paper's
    ImageNet value). Rows whose top-k sum is 0 are left unscaled. Penultimate form.
    """

    paper = "Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement, ICLR 2024"
    citation = _papers.SCALE
    signals = ("features",)

    hyperparams = {"percentile": hp.real(low=0, high=100)}

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = percentile

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _score(self, signals: Signals) -> torch.Tensor:
        h = signals.features.double()
        k = _check_kept(h.shape[1], self.percentile, "SCALE")
        s1 = h.sum(dim=1, keepdim=True)
        s2 = torch.topk(h, k, dim=1).values.sum(dim=1, keepdim=True)
        ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))
        return _head_energy(signals, h * torch.exp(ratio))


@register("dice")
class DICE(Detector):
    """DICE: directed sparsification of the head (Sun & Li, ECCV 2022, https://arxiv.org/abs/2111.09805).

    Fit: the mean ID feature ``m = mean_i h_i``; contributions ``V = W * m`` (``V_cj = w_cj m_j``); the mask
    keeps the entries of ``V`` above its ``p``-th percentile (``numpy.percentile`` over all ``C x D`` entries,
    linear interpolation). Score: energy of the sparsified head ``LSE((M * W) h + b)``; higher = more ID.
    Inputs: penultimate features, head weight/bias. Fitted state: ``mean_features_``, ``mask_``.
    Hyperparameters: ``sparsity`` p in [0, 100) (90, the paper's CIFAR value; 70 for ImageNet).
    DICE has no feature-map form (there is no ``dice-fm``): the paper ranks the weight x mean-activation
    contributions of the final fully connected layer only, and a mask on a convolution's kernels by some
    contribution rule would be an invention, not the paper's method.
    """

    paper = "Sun & Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022"
    citation = _papers.DICE
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"sparsity": hp.real(low=0, high=100, high_open=True)}  # 100 would drop every weight

    def __init__(self, sparsity: float = 90.0) -> None:
        self.sparsity = sparsity

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        w, _b = signals.head_params()
        self.mean_features_ = signals.features.double().mean(dim=0)
        contrib = w.double() * self.mean_features_[None, :]
        thresh = torch.quantile(contrib.flatten(), self.sparsity / 100.0, interpolation="linear")
        self.mask_ = contrib > thresh

    def _score(self, signals: Signals) -> torch.Tensor:
        w, _b = signals.head_params()
        if w.shape != self.mask_.shape:
            raise InputError(f"DICE was fitted on a {tuple(self.mask_.shape)} head but this head is {tuple(w.shape)}: "
                             "refit on this model's ID data.")
        return _head_energy(signals, signals.features.double(), weight=w.double() * self.mask_)


STATISTICS = ("auto", "bn", "features")


def bn_feeding_head(signals: Signals) -> tuple[str, nn.Module] | None:
    """The affine BatchNorm layer whose output IS the head's input (found by data flow on one batch: its output
    equals the captured features exactly, e.g. ``BN -> head`` or ``BN -> Dropout -> head`` in eval mode), or None."""
    probe = signals.probe
    if probe is None or signals.source is None:
        return None
    bns = {n: m for n, m in probe.model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    if not bns:
        return None
    x, _ = next(iter(signals.source.iter_batches()))
    out = probe.forward(x, tuple(bns), validate=False)
    for name, module in bns.items():
        a = out.taps[name]
        if a.shape == out.features.shape and torch.equal(a, out.features):
            return name, module
    return None


@register("bats")
class BATS(Detector):
    """BATS: truncation to the typical feature set (Zhu, Chen, Xie, Gong, Yu, Hu & Liu, NeurIPS 2022,
    https://arxiv.org/abs/2211.11164), penultimate form.

    ``h' = clamp(h, mu - lam * sigma, mu + lam * sigma)`` per unit, score the energy ``LSE(W h' + b)``;
    higher = more ID. The paper reads ``mu`` and ``sigma`` from the BatchNorm layer producing the features:
    its shift beta and scale |gamma|, the mean and std of that BN's outputs. ``statistics``: "bn" takes them
    from the affine BatchNorm whose output is the head's input (found by data flow on one batch; an error if
    there is none); "features" estimates the same quantities from the ID fit features (per-unit mean and
    population std; for a head fed straight by a BN layer they converge to beta and |gamma|), for the common
    case where the head's input is not a BN output (ResNet: BN -> ReLU -> pool); "auto" (default) uses "bn"
    when such a layer exists, else "features". Fitted state: ``mean_``, ``std_``, ``statistics_`` (the
    source used: "bn:<layer>" or "features"). Hyperparameters: ``lam`` (1.0, the paper's ResNet-50 value),
    ``statistics`` ("auto"). Inputs: penultimate features, head weight/bias.
    """

    paper = "Zhu et al., Boosting Out-of-distribution Detection with Typical Features, NeurIPS 2022"
    citation = _papers.BATS
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"lam": hp.non_negative(), "statistics": hp.choice(*STATISTICS)}

    def __init__(self, lam: float = 1.0, statistics: str = "auto") -> None:
        self.lam = lam
        self.statistics = statistics

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        found = bn_feeding_head(signals) if self.statistics in ("auto", "bn") else None
        if found is None and self.statistics == "bn":
            raise InputError("bats statistics='bn' needs an affine BatchNorm layer whose output is the head's input; "
                             "this model has none: use statistics='features' (or 'auto').")
        if found is not None:
            name, bn = found
            self.mean_ = bn.bias.detach().to("cpu", torch.float64).clone()
            self.std_ = bn.weight.detach().to("cpu", torch.float64).abs()
            self.statistics_ = f"bn:{name}"
            return
        h = signals.features.double()
        self.mean_ = h.mean(dim=0)
        self.std_ = h.std(dim=0, unbiased=False)
        self.statistics_ = "features"

    def _score(self, signals: Signals) -> torch.Tensor:
        lo, hi = self.mean_ - self.lam * self.std_, self.mean_ + self.lam * self.std_
        h = torch.maximum(torch.minimum(signals.features.double(), hi), lo)
        return _head_energy(signals, h)
