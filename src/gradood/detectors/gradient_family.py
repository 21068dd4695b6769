"""Gradient-family members beyond the head-only closed forms: GradNorm over every parameter (from the batched
per-sample engine, one forward + one backward per batch) and GradOrth (the ID-subspace projection of the
head's gradient, in closed form from the shared forward pass). Higher = more in-distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..grads import per_sample_grad_sqnorms
from ..signals import FEATURES, LOGITS, ProbeBatch, Request, Signals
from . import _papers
from ._papers import Citation
from . import _hyperparams as hp
from .base import Detector, register


def kl_uniform_loss(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample ``KL(u || softmax(f / T)) = -mean_c log softmax(f / T)_c - log C`` (GradNorm's loss)."""
    C = logits.shape[1]
    return -torch.log_softmax(logits / T, dim=1).mean(dim=1) - torch.log(torch.tensor(float(C), dtype=logits.dtype))


def _params_key(params: Any) -> str:
    return params if isinstance(params, str) else (str(params) if isinstance(params, int) else ",".join(params))


@dataclass(frozen=True)
class KLUniformGradSqNorm(Request):
    """``||grad_theta KL(u || softmax(f(x) / T))||_2^2`` per sample over the selected parameters (``B``), from
    the batched engine."""

    temperature: float = 1.0
    params: Any = "all"

    @property
    def key(self) -> str:
        return f"gradsq:kl_uniform:T={self.temperature:g}:{_params_key(self.params)}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe, T = batch.probe, self.temperature
        with probe.eval_mode(), probe.model_inputs(batch.x) as inputs:
            sq = per_sample_grad_sqnorms(probe.model, inputs, lambda o: kl_uniform_loss(probe.output_logits(o), T),
                                         params=self.params)
        return sq.double()


@register("gradnorm-all")
class GradNormAll(Detector):
    """GradNorm over all parameters: ``||grad_theta KL(u || softmax(f / T))||_2`` with theta = every parameter of
    the network (Huang, Geng & Li, NeurIPS 2021, https://arxiv.org/abs/2110.00218 -- the paper scores the
    last layer's gradient, gradood's ``gradnorm``; its ablation studies gradients of other layers).

    Score: the L2 norm of the full-network per-sample gradient (the engine gives exact per-sample squared L2
    norms from one forward and one backward per batch; the paper's L1 norm over all parameters would need
    every per-sample gradient materialised, so this form uses L2 -- it equals ``gradnorm`` with ``norm="l2"``,
    ``include_bias=True`` when ``params`` is the head's weight and bias). Higher = more ID. Inputs: the model.
    Fits nothing. Hyperparameters: ``temperature`` (1), ``params`` ("all"; an int k = the last k parametrised
    layers, or a list of parameter names).
    """

    paper = "Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, NeurIPS 2021"
    citation = _papers.GRADNORM
    signals = ("param-grads",)
    needs_model = True

    hyperparams = {"temperature": hp.positive(), "params": hp.PARAM_SCOPE}

    def __init__(self, temperature: float = 1.0, params: Any = "all") -> None:
        self.temperature = temperature
        self.params = tuple(params) if isinstance(params, list) else params

    def requests(self) -> list[Request]:
        return [KLUniformGradSqNorm(float(self.temperature), self.params)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.get(self.requests()[0]).double().clamp_min(0.0).sqrt()


def subspace_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest k whose top-k singular values hold at least ``threshold`` of the total energy ``sum s_i^2``."""
    energy = singular_values.double().pow(2)
    frac = energy.cumsum(0) / energy.sum()
    return int(torch.searchsorted(frac, torch.tensor([threshold], dtype=torch.float64) - 1e-12).item()) + 1


@register("gradorth")
class GradOrth(Detector):
    """GradOrth (Behpour, Doan, Li, He, Gou & Ren, NeurIPS 2023, "GradOrth: A Simple yet Efficient
    Out-of-Distribution Detection with Orthogonal Projection of Gradients", https://openreview.net/forum?id=L9nTuSbAws),
    closest faithful reading, on the classifier head, in closed form.

    Fit: the ID representation matrix of the head's input (penultimate features of the ID fit data, D x N);
    its top-k left singular vectors ``S`` (D x k), k the smallest rank holding ``threshold`` of the squared
    singular-value energy (the GPM-style rule the paper uses). Score: the norm of the head's weight gradient
    of ``KL(u || softmax(f / T))`` projected onto the ID subspace, ``||delta (S S^T h)^T||_F =
    ||p_T - u||_2 / T * ||S S^T h||_2`` (``delta = dL/df``; the weight gradient is ``delta h^T``); OOD samples
    have small projections, so higher = more ID. Not recoverable from the paper's text: whether the loss is
    the KL to uniform (GradNorm's, used here) and whether features are centred (they are not, here); the
    official code was not available to check. Inputs: logits, penultimate features. Fitted state:
    ``basis_`` (D x k), ``rank_``. Hyperparameters: ``threshold`` (0.97), ``temperature`` (1).
    """

    paper = ("Behpour et al., GradOrth: A Simple yet Efficient Out-of-Distribution Detection with Orthogonal "
             "Projection of Gradients, NeurIPS 2023")
    citation = Citation(("Behpour", "Doan", "Li", "He", "Gou", "Ren"), "GradOrth: A Simple yet Efficient "
                        "Out-of-Distribution Detection with Orthogonal Projection of Gradients", "NeurIPS", 2023,
                        "https://openreview.net/forum?id=L9nTuSbAws")
    signals = ("logits", "features")
    fits_on_id = True

    hyperparams = {"threshold": hp.real(low=0, high=1, low_open=True), "temperature": hp.positive()}

    def __init__(self, threshold: float = 0.97, temperature: float = 1.0) -> None:
        self.threshold = threshold
        self.temperature = temperature

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h = signals.features.double()
        # left singular vectors of R = H^T (D x N) = right singular vectors of H: from the D x D Gram matrix
        evals, evecs = torch.linalg.eigh(h.T @ h)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        if float(evals.sum()) == 0.0:
            raise InputError("GradOrth: every ID fit feature is zero, so there is no ID subspace: check the "
                             "model's penultimate layer and the fit data.")
        k = subspace_rank(evals.sqrt(), float(self.threshold))
        self.basis_ = evecs[:, :k].contiguous()
        self.rank_ = k

    def _score(self, signals: Signals) -> torch.Tensor:
        f, h = signals.logits.double(), signals.features.double()
        T = self.temperature
        delta = (torch.softmax(f / T, dim=1) - 1.0 / f.shape[1]) / T
        proj = (h @ self.basis_) @ self.basis_.T
        return delta.norm(dim=1) * proj.norm(dim=1)
