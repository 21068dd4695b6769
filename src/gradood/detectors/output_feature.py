"""Gradient scores of the last layer and the output-term x feature-term family, all from ONE forward pass.

A last-layer gradient norm is exactly ``||delta||`` (output space) times ``||h||`` (feature space), see
:mod:`gradood.grads.head`. This module holds GradNorm, ExGrad, RG (multiplicative and additive), RG's
eq. 5, and the general family ``U(f) x V(h)`` with the output and feature terms chosen by name.
Inputs for all: logits and penultimate features ``h``. Higher = more in-distribution for every score.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..grads.head import (NORMS, expected_logprob_grad_output_term, feature_norm, gini_impurity,
                          head_grad_norm, loss_delta)
from ..signals import FEATURES, LOGITS, Request, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register, register_variant


class _LogitsFeatures(Detector):
    signals = ("logits", "features")

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _bias(self, signals: Signals) -> bool:
        """``include_bias`` counts the head's bias only if the head has one (unknown head: as asked)."""
        has = signals.has_head_bias()
        return bool(getattr(self, "include_bias", False)) and has is not False


def _real(t: torch.Tensor) -> torch.Tensor:
    """Scores are computed in the signals' own precision (float32 like autograd would; float64 stays float64);
    half precision is promoted so that sums over features do not overflow."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _clipped_sum(h: torch.Tensor, k: float) -> torch.Tensor:
    """RG's feature term ``sum_j min(h_j, k)`` (k = inf gives ``sum_j h_j``, i.e. ||h||_1 for post-ReLU h)."""
    return (h if math.isinf(k) else h.clamp(max=k)).sum(dim=1)


def _warn_nonpositive(u: torch.Tensor, what: str) -> None:
    frac = float((u <= 0).double().mean())
    if frac > 0:
        warnings.warn(
            f"{what} is <= 0 for {frac:.1%} of samples: the product U x V then ranks samples with larger "
            "feature terms as MORE OOD. This happens when all logits are negative; consider the additive "
            "form (rg-additive) or check the model's head.",
            RuntimeWarning,
            stacklevel=4,
        )


@register("gradnorm")
class GradNorm(_LogitsFeatures):
    """GradNorm (Huang et al., NeurIPS 2021), in closed form: no backward pass.

    ``||d KL(u || softmax(f/T)) / dW||`` over the head's weight ``W`` (bias excluded by default), which equals
    ``(1/T) sum_j |p_T,j - 1/C| * ||h||_1`` exactly for the L1 norm. Higher = more ID.

    Hyperparameters: ``temperature`` T (1); ``norm`` "l1" (paper), "l2" (Frobenius) or "l2sq";
    ``include_bias`` (False, as in the paper); ``loss`` "kl_uniform" (paper) or "ones" (the official code's
    targets-of-ones loss: C times the former, same ranking). Fits nothing.
    """

    paper = "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, NeurIPS 2021"
    citation = _papers.GRADNORM

    hyperparams = {"temperature": hp.positive(), "norm": hp.choice(*NORMS), "loss": hp.choice("kl_uniform", "ones")}

    def __init__(self, temperature: float = 1.0, norm: str = "l1", include_bias: bool = False,
                 loss: str = "kl_uniform") -> None:
        self.temperature = temperature
        self.norm = norm
        self.include_bias = include_bias
        self.loss = loss

    def _score(self, signals: Signals) -> torch.Tensor:
        f, h = _real(signals.logits), _real(signals.features)
        delta = loss_delta(self.loss, f, self.temperature)
        return head_grad_norm(delta, h, self.norm, self._bias(signals))


@register("exgrad")
class ExGrad(_LogitsFeatures):
    """ExGrad (Igoe et al., 2022; RG eq. 4), in closed form.

    ``E_{y ~ p_T(x)} || d log p_T,y(x) / dW ||`` over the head's weight, which is
    ``(2/T) (1 - sum_k p_T,k^2) ||h||_1`` for L1 (``(1 - sum p^2) ||h||_2^2 / T^2`` for "l2sq"; "l2" also exact).

    Sign (docs/methods.md 2.4, unresolved in the sources): by default the raw ExGrad is treated as an OOD-ness
    (``higher_is_id=False``: score = -ExGrad), following "gradients of a well-fit loss are small on ID";
    ``higher_is_id=True`` returns +ExGrad. Higher score = more ID in both cases by construction of the flag.
    Hyperparameters: ``temperature`` (1), ``norm`` ("l1"), ``include_bias`` (False), ``higher_is_id`` (False).
    """

    paper = "Igoe, Mehta & Xu, How Useful are Gradients for OOD Detection Really?, arXiv 2205.10439"
    citation = _papers.IGOE

    hyperparams = {"temperature": hp.positive(), "norm": hp.choice(*NORMS)}

    def __init__(self, temperature: float = 1.0, norm: str = "l1", include_bias: bool = False,
                 higher_is_id: bool = False) -> None:
        self.temperature = temperature
        self.norm = norm
        self.include_bias = include_bias
        self.higher_is_id = higher_is_id

    def raw(self, signals: Signals) -> torch.Tensor:
        """The expected gradient norm itself (no sign flip)."""
        signals.require(self.requests())
        f, h = _real(signals.logits), _real(signals.features)
        u = expected_logprob_grad_output_term(f, self.temperature, self.norm)
        return u * feature_norm(h, self.norm, self._bias(signals))

    def _score(self, signals: Signals) -> torch.Tensor:
        r = self.raw(signals)
        return r if self.higher_is_id else -r


register_variant("exgrad-id", ExGrad, higher_is_id=True)


@register("rg")
class RG(_LogitsFeatures):
    """RG, Reactivate GradNorm, multiplicative form (RG paper eq. 8).

    ``RG(x) = T * LSE(f/T) * sum_j min(h_j, k)``: energy of the *unclipped* logits times the clipped L1 norm
    of the features. Higher = more ID. Inputs: logits, features.

    Hyperparameters: ``k`` (1.0, absolute clip value; inf = no clipping, giving Energy x sum(h)),
    ``temperature`` T (1.0), ``k_percentile`` (None; if set, k is instead the given percentile of all ID
    feature values at fit time -- an extension for models whose activation scale differs from BiT's).
    Fits nothing unless ``k_percentile`` is set. A warning is raised when the energy is <= 0 for some samples
    (the product then reverses the ranking, docs/methods.md 2.1).
    """

    paper = "RG: Out-of-distribution detection with Reactivate GradNorm (energy x clipped feature norm)"
    citation = _papers.RG

    hyperparams = {"k": hp.positive(inf=True), "temperature": hp.positive(),
                   "k_percentile": hp.real(low=0, high=100, low_open=True, none=True)}

    def __init__(self, k: float = 1.0, temperature: float = 1.0, k_percentile: float | None = None) -> None:
        self.k = k
        self.temperature = temperature
        self.k_percentile = k_percentile

    @property
    def fits_on_id(self) -> bool:  # type: ignore[override]
        return self.k_percentile is not None

    def _fit(self, signals: Signals, **_: object) -> None:
        if self.k_percentile is not None:
            self.k_ = _percentile(signals.features, float(self.k_percentile))

    def _clip(self) -> float:
        return getattr(self, "k_", self.k) if self.k_percentile is not None else self.k

    def output_term(self, signals: Signals) -> torch.Tensor:
        T = self.temperature
        return T * torch.logsumexp(_real(signals.logits) / T, dim=1)

    def _score(self, signals: Signals) -> torch.Tensor:
        u = self.output_term(signals)
        _warn_nonpositive(u, "RG's energy term")
        return u * _clipped_sum(_real(signals.features), self._clip())


@register("rg-additive")
class RGAdditive(_LogitsFeatures):
    """RG, additive form (RG paper eq. 12): ``LSE(f) + alpha * sum_j min(h_j, k)``. Higher = more ID.

    Fit: ``alpha = m * std[LSE(f)] / std[sum_j min(h_j, k)]`` over ``n_fit`` random ID samples (paper: 1 000
    training samples; "make the standard deviations of the two terms close").
    Hyperparameters: ``k`` (1.0), ``m`` (0.6, the paper's best average), ``n_fit`` (1000), ``seed`` (0).
    """

    paper = "RG: Out-of-distribution detection with Reactivate GradNorm, eq. 11/12"
    citation = _papers.RG
    fits_on_id = True

    hyperparams = {"k": hp.positive(inf=True), "m": hp.non_negative(), "n_fit": hp.integer(minimum=2),
                   "seed": hp.SEED}

    def __init__(self, k: float = 1.0, m: float = 0.6, n_fit: int = 1000, seed: int = 0) -> None:
        self.k = k
        self.m = m
        self.n_fit = n_fit
        self.seed = seed

    def _fit(self, signals: Signals, **_: object) -> None:
        n = len(signals)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[: min(self.n_fit, n)]
        energy = torch.logsumexp(signals.logits[idx].double(), dim=1)
        clipped = _clipped_sum(signals.features[idx].double(), self.k)
        sd_c = float(clipped.std())
        if not sd_c > 0:
            raise InputError(
                "the clipped feature sum is constant on the fit samples (all features >= k or all zero), so alpha "
                "is undefined: lower k or check the features."
            )
        self.alpha_s_ = float(energy.std()) / sd_c
        self.alpha_ = self.m * self.alpha_s_

    def _score(self, signals: Signals) -> torch.Tensor:
        energy = torch.logsumexp(_real(signals.logits), dim=1)
        return energy + self.alpha_ * _clipped_sum(_real(signals.features), self.k)


@register("rg-eq5")
class SumExpGrad(_LogitsFeatures):
    """RG eq. 5 (corrected, docs/methods.md 2.3): ``|| d sum_i exp(f_i) / dW ||_1 = exp(LSE(f)) * ||h||_1``.

    Returned in log form, ``LSE(f) + log(||h||_1 (+1 with bias))``, which ranks identically and does not
    overflow for logits above ~88 in float32. Higher = more ID. Hyperparameters: ``include_bias`` (False).
    """

    paper = "RG: Out-of-distribution detection with Reactivate GradNorm, eq. 5 (with the output term corrected)"
    citation = _papers.RG

    def __init__(self, include_bias: bool = False) -> None:
        self.include_bias = include_bias

    def _score(self, signals: Signals) -> torch.Tensor:
        f, h = _real(signals.logits), _real(signals.features)
        return torch.logsumexp(f, dim=1) + torch.log(feature_norm(h, "l1", self._bias(signals)))


# ---------------------------------------------------------------------- the U x V family
def _output_term(name: str, f: torch.Tensor, T: float) -> torch.Tensor:
    p = torch.softmax(f / T, dim=1)
    if name == "msp":
        return p.amax(dim=1)
    if name == "gradnorm":
        return (p - 1.0 / f.shape[1]).abs().sum(dim=1)
    if name == "energy":
        return T * torch.logsumexp(f / T, dim=1)
    if name == "maxlogit":
        return f.amax(dim=1)
    if name == "exgrad":
        return gini_impurity(p)
    if name == "sumsq":
        return 1.0 - gini_impurity(p)
    if name == "one":
        return torch.ones(f.shape[0], dtype=f.dtype)
    raise ConfigError(f"unknown output_term {name!r}; choose one of {OUTPUT_TERMS}.")


def _feature_term(name: str, h: torch.Tensor, k: float) -> torch.Tensor:
    if name == "l1":
        return h.abs().sum(dim=1)
    if name == "l2":
        return h.norm(dim=1)
    if name == "clipped_l1":
        return _clipped_sum(h, k)
    if name == "one":
        return torch.ones(h.shape[0], dtype=h.dtype)
    raise ConfigError(f"unknown feature_term {name!r}; choose one of {FEATURE_TERMS}.")


OUTPUT_TERMS = ("msp", "gradnorm", "energy", "maxlogit", "exgrad", "sumsq", "one")
FEATURE_TERMS = ("l1", "l2", "clipped_l1", "one")
#: output terms whose natural direction is "higher = more uncertain / OOD"
UNCERTAINTY_TERMS = ("exgrad",)


@register("output-feature")
class OutputFeature(_LogitsFeatures):
    """The output-term x feature-term family of Igoe et al. and RG (sections 3.1-3.2): ``U(f) * V(h)``.

    Output terms (``output_term``): "msp" ``max p``; "gradnorm" ``sum |p - 1/C|``; "energy" ``T LSE(f/T)``;
    "maxlogit"; "exgrad" ``sum p (1 - p)`` (uncertainty-type: higher = more OOD); "sumsq" ``sum p^2``
    (ExGrad's ID-oriented counterpart); "one". Feature terms (``feature_term``): "l1" ``||h||_1``, "l2",
    "clipped_l1" ``sum min(h_j, k)`` (RG), "one".

    ``higher_is_id``: None (default) flips the sign exactly when the output term is uncertainty-type, so the
    score is always higher = more ID; True/False force it. Other hyperparameters: ``temperature`` (1),
    ``k`` (1, only for clipped_l1). Naming note: RG calls the output factor U and the feature factor V,
    Igoe et al. the reverse; the parameters are named by meaning to avoid the clash. Fits nothing.
    Known instances: gradnorm x l1 = GradNorm; energy x l1 = RG's "Conor Igoe" baseline; energy x
    clipped_l1 = RG; energy x one = Energy.
    """

    paper = "Igoe et al., arXiv 2205.10439; RG sections 3.1-3.2"
    citation = _papers.IGOE

    hyperparams = {"output_term": hp.choice(*OUTPUT_TERMS), "feature_term": hp.choice(*FEATURE_TERMS),
                   "temperature": hp.positive(), "k": hp.positive(inf=True)}

    def __init__(self, output_term: str = "energy", feature_term: str = "l1", temperature: float = 1.0,
                 k: float = 1.0, higher_is_id: bool | None = None) -> None:
        self.output_term = output_term
        self.feature_term = feature_term
        self.temperature = temperature
        self.k = k
        self.higher_is_id = higher_is_id

    def _score(self, signals: Signals) -> torch.Tensor:
        u = _output_term(self.output_term, _real(signals.logits), self.temperature)
        v = _feature_term(self.feature_term, _real(signals.features), self.k)
        if self.output_term in ("energy", "maxlogit") and self.feature_term != "one":
            _warn_nonpositive(u, f"the output term {self.output_term!r}")
        higher_is_id = self.higher_is_id
        if higher_is_id is None:
            higher_is_id = self.output_term not in UNCERTAINTY_TERMS
        s = u * v
        return s if higher_is_id else -s


register_variant("energy-x-l1", OutputFeature, output_term="energy", feature_term="l1")
register_variant("gradnorm-x-clipped", OutputFeature, output_term="gradnorm", feature_term="clipped_l1")


def _percentile(x: torch.Tensor, q: float) -> float:
    """The q-th percentile of all values of x (numpy's linear interpolation; torch.quantile caps input size)."""
    return float(np.percentile(x.detach().cpu().double().numpy().ravel(), q))
