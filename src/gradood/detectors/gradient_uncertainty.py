"""GradUncertainty: the norm of the full-network gradient of a loss against a label the model supplies itself
(Oberdiek et al.: the predicted label; Lee & AlRegib: the all-ones "confounding" label). Per-sample squared
norms over every parameter come from gradood's batched engine: one forward and one backward per batch.
Higher = more in-distribution: the negated norm for the predicted label (training drives the gradients of ID
samples towards zero), the norm itself for the confounding label (see :class:`GradUncertainty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..grads import per_sample_grad_sqnorms
from ..signals import ProbeBatch, Request, Signals
from . import _hyperparams as hp
from ._papers import Citation
from ._perturb import pred_ce
from .base import Detector, register, register_variant
from .grodin import GrodinStats

LABELS = ("predicted", "confounding")

OBERDIEK = Citation(("Oberdiek", "Rottmann", "Gottschalk"), "Classification Uncertainty of Deep Neural Networks "
                    "Based on Gradient Information", "ANNPR", 2018, "https://arxiv.org/abs/1805.08440")
LEE_ALREGIB = Citation(("Lee", "AlRegib"), "Gradients as a Measure of Uncertainty in Neural Networks", "ICIP", 2020,
                       "https://arxiv.org/abs/2008.08030")


def predicted_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log softmax(f)_c_hat`` with ``c_hat = argmax f`` (Oberdiek et al.'s loss)."""
    return pred_ce(logits, 1.0)


def confounding_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample binary cross-entropy of ``sigmoid(f)`` against the all-ones label, ``-sum_c log sigmoid(f_c)``
    (Lee & AlRegib's confounding label: every class at once, a label no training sample had)."""
    return -torch.nn.functional.logsigmoid(logits).sum(dim=1)


LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "predicted": predicted_label_loss, "confounding": confounding_label_loss}


def _params_key(params: Any) -> str:
    return params if isinstance(params, str) else (str(params) if isinstance(params, int) else ",".join(params))


@dataclass(frozen=True)
class LabelGradSqNorm(Request):
    """``||grad_theta loss(f(x), label)||_2^2`` per sample (``B``) over the selected parameters, from the engine."""

    label: str = "predicted"
    params: Any = "all"

    @property
    def key(self) -> str:
        return f"gradsq:{self.label}-label:{_params_key(self.params)}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe, loss = batch.probe, LOSSES[self.label]
        # the model may return a tuple/dict/ModelOutput: the loss reads its logits
        with probe.eval_mode(), probe.model_inputs(batch.x) as inputs:
            sq = per_sample_grad_sqnorms(probe.model, inputs, lambda o: loss(probe.output_logits(o)),
                                         params=self.params)
        return sq.double()


@register("gradunc")
class GradUncertainty(Detector):
    """GradUncertainty: the L2 norm of ``grad_theta L(f(x), y*)`` over every parameter theta, y* a label the
    model supplies itself. Higher = more ID.

    ``target="predicted"`` (default): Oberdiek, Rottmann & Gottschalk, "Classification Uncertainty of Deep
    Neural Networks Based on Gradient Information", ANNPR 2018, https://arxiv.org/abs/1805.08440 --
    ``L = -log softmax(f)_c_hat`` with the predicted class ``c_hat``. The paper computes several statistics
    (L1/L2 norm, min, max, mean, std) of the gradient of chosen layers and feeds them to a meta-classifier;
    this OOD-agnostic score is its L2 norm over the whole network, negated (the closest faithful single score:
    a large gradient = an uncertain prediction).
    It ranks samples exactly as ``create("grodin", part="SG")`` (= ``-gradunc**2``).

    ``target="confounding"`` (``gradunc-confounding``): Lee & AlRegib, "Gradients as a Measure of Uncertainty
    in Neural Networks", ICIP 2020, https://arxiv.org/abs/2008.08030 -- the binary cross-entropy of
    ``sigmoid(f)`` against the all-ones confounding label, ``L = -sum_c log sigmoid(f_c)``; the paper reads
    per-layer squared L2 norms of this gradient, summed here into the full-network norm (closest faithful
    reading: how the paper combines layers into one score is not fixed by its text). Sign: this target scores
    ``+||grad||``. The all-ones label asks every non-predicted sigmoid to move to 1, so a confident prediction
    has the LARGEST gradient (as with GradNorm's uniform label); measured on the default bench's
    mnist-cnn-digitrec, the negated norm gave a mean AUROC of 2.1 % (i.e. 97.9 % with this sign).

    Inputs: the model (per-sample full-network gradients: one forward + one backward per batch from the
    batched engine). Fits nothing. Hyperparameters: ``target`` (the label: "predicted"), ``params`` ("all"; an int k =
    the last k parametrised layers, or a list of parameter names).
    """

    paper = ("Oberdiek, Rottmann & Gottschalk, Classification Uncertainty of Deep Neural Networks Based on "
             "Gradient Information, ANNPR 2018")
    citation = OBERDIEK
    signals = ("param-grads",)
    needs_model = True

    hyperparams = {"target": hp.choice(*LABELS), "params": hp.PARAM_SCOPE}

    def __init__(self, target: str = "predicted", params: Any = "all") -> None:
        self.target = target
        self.params = tuple(params) if isinstance(params, list) else params

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing: no gradient pass over the fit data

    def requests(self) -> list[Request]:
        if self.target == "predicted":
            # GRODIN's statistics at T = 1, eps = 0 hold this very norm: one shared signal (and cache entry)
            # for gradunc and grodin-sg instead of two backward passes over the same data
            return [GrodinStats((1.0,), (0.0,), self.params)]
        return [LabelGradSqNorm(self.target, self.params)]

    def _score(self, signals: Signals) -> torch.Tensor:
        stats = signals.get(self.requests()[0]).double()
        sq = stats[:, 1] if self.target == "predicted" else stats
        norm = sq.clamp_min(0.0).sqrt()
        return norm if self.target == "confounding" else -norm


register_variant("gradunc-confounding", GradUncertainty, target="confounding")
