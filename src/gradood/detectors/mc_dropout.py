"""MC dropout: the predictive mean of several forward passes with the model's dropout layers active (Gal &
Ghahramani, ICML 2016). gradood's only non-deterministic detector by nature: its passes draw dropout masks,
from a seeded generator state, so that a score is reproducible for a given seed, data order and batch size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import NotApplicableError
from ..probe import Probe, call_model
from ..signals import ProbeBatch, Request, Signals
from . import _hyperparams as hp
from ._papers import Citation
from .base import Detector, register

GAL_GHAHRAMANI = Citation(("Gal", "Ghahramani"), "Dropout as a Bayesian Approximation: Representing Model "
                          "Uncertainty in Deep Learning", "ICML", 2016, "https://arxiv.org/abs/1506.02142")

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules that drop something (``p > 0``)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]


def batch_seed(seed: int, batch_index: int) -> int:
    """A distinct generator seed per (seed, batch): batches draw independent masks, reruns the same ones."""
    return (int(seed) * 1_000_003 + int(batch_index)) % (2**63)


@contextlib.contextmanager
def active_dropout(probe: Probe) -> Iterator[None]:
    """The model in eval mode except its dropout layers (BatchNorm keeps its running statistics); every flag
    restored afterwards. A model without dropout is an error: MC dropout would repeat one deterministic pass."""
    layers = dropout_layers(probe.model)
    if not layers:
        raise NotApplicableError(
            "mc-dropout needs a model with dropout layers (nn.Dropout & co. with p > 0); this model has none, so "
            "every pass would give the same output. Use a model trained with dropout, or another detector "
            "(e.g. msp, the deterministic score MC dropout averages)."
        )
    with probe.eval_mode():
        for m in layers:
            m.train()
        try:
            yield
        finally:
            for m in layers:
                m.eval()


@dataclass(frozen=True)
class MCDropoutProbs(Request):
    """``B x C``: the mean softmax over ``n_samples`` forward passes with dropout active, masks drawn from
    ``torch.manual_seed(batch_seed(seed, batch index))`` inside a forked RNG (the global RNG is untouched)."""

    n_samples: int = 30
    seed: int = 0

    @property
    def key(self) -> str:
        return f"mcdropout:n={self.n_samples}:seed={self.seed}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        device = probe.device
        devices = [device.index or 0] if device.type == "cuda" else []
        total = None
        with active_dropout(probe), torch.no_grad(), torch.random.fork_rng(devices=devices), \
                probe.model_inputs(batch.x) as inputs:
            torch.manual_seed(batch_seed(self.seed, batch.index))
            for _ in range(self.n_samples):
                p = torch.softmax(probe.output_logits(call_model(probe.model, inputs)).double(), dim=1)
                total = p if total is None else total + p
        assert total is not None
        return total / self.n_samples


@register("mc-dropout")
class MCDropout(Detector):
    """MC dropout (Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in
    Deep Learning", ICML 2016, https://arxiv.org/abs/1506.02142), scored as pytorch-ood's MCD does: the
    maximum of the predictive mean ``max_c (1/n) sum_s softmax(f_s(x))_c`` over ``n_samples`` forward passes
    with the dropout layers active (every other layer in eval mode). Higher = more ID.

    The only non-deterministic detector in gradood: dropout masks are random. They are drawn from a seeded
    generator state per batch (``seed``, then the batch index), inside a forked RNG, so scores are reproducible
    for the same seed, data order and batch size -- and change with the batch size (a sample's masks depend
    on its position in the batch). A model without dropout layers (``p > 0``) is an error.

    Inputs: the model (``n_samples`` forward passes per batch, no backward). Fits nothing. Hyperparameters:
    ``n_samples`` (30), ``seed`` (0).
    """

    paper = ("Gal & Ghahramani, Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep "
             "Learning, ICML 2016")
    citation = GAL_GHAHRAMANI
    signals = ("logits",)
    needs_model = True
    #: not part of ``detectors = ["all"]`` in benchmark specs: it applies only to models with dropout
    in_all = False

    hyperparams = {"n_samples": hp.integer(minimum=1), "seed": hp.SEED}

    def __init__(self, n_samples: int = 30, seed: int = 0) -> None:
        self.n_samples = n_samples
        self.seed = seed

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing: no gradient pass over the fit data

    def requests(self) -> list[Request]:
        return [MCDropoutProbs(self.n_samples, self.seed)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.get(self.requests()[0]).double().amax(dim=1)
