"""GAIA-A: channel-wise average abnormality of attribution gradients (Chen et al., NeurIPS 2023).

The attribution gradient of a layer is the gradient of the model's confidence in its prediction w.r.t. that
layer's output (the quantity Grad-CAM averages per channel). Per sample and per tapped layer gradood takes
the channel-wise spatial average of that gradient, its L2 norm over channels, and sums the norms over the
layers. One forward and one backward per batch: in eval mode the samples of a batch do not interact, so the
gradient of the summed per-sample confidences w.r.t. a B x C x H x W activation holds every sample's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError, ModelError
from ..probe import call_model
from ..signals import ProbeBatch, Request, Signals
from . import _hyperparams as hp
from ._papers import Citation
from .base import Detector, register

GAIA = Citation(("Chen", "Li", "Qu", "Wang", "Wan", "Xiao"), "GAIA: Delving into Gradient-based Attribution "
                "Abnormality for Out-of-distribution Detection", "NeurIPS", 2023, "https://arxiv.org/abs/2311.09620")


def channel_average(grad: torch.Tensor, layer: str) -> torch.Tensor:
    """``B x C`` channel-wise averages of a layer's gradient: over the spatial positions of a ``B x C x ...``
    feature map, over the positions (tokens) of a ``B x T x D`` sequence, the vector itself for ``B x D``."""
    if grad.ndim == 2:
        return grad
    if grad.ndim == 3:
        return grad.mean(dim=1)
    if grad.ndim >= 4:
        return grad.flatten(2).mean(dim=2)
    raise ModelError(f"GAIA: layer {layer!r} outputs a tensor of shape {tuple(grad.shape)}; it needs one "
                     "feature vector or feature map per sample. Name other layers with layers=[...].")


def predicted_log_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log softmax(f)_c_hat`` at the predicted class (the output component whose attribution
    gradients GAIA reads)."""
    return torch.log_softmax(logits, dim=1).amax(dim=1)


@dataclass(frozen=True)
class AttributionAbnormality(Request):
    """``B x L``: per tapped layer, ``||mean_positions d log p_c_hat / d A_l||_2`` (``A_l`` the layer's
    output). ``layers=None``: the probe's default layers (activation modules reached once)."""

    layers: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return "gaia-a:" + ("default" if self.layers is None else ",".join(self.layers))

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layers = list(self.layers) if self.layers is not None else probe.default_layers()
        if not layers:
            raise ConfigError("GAIA found no layers to read attribution gradients from: pass layers=[module names].")
        modules = dict(probe.model.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ConfigError(f"GAIA: unknown layers {unknown}: name modules of the model, e.g. "
                              f"{[n for n in modules if n][:8]}.")
        acts: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(_m: torch.nn.Module, _i: Any, out: Any) -> torch.Tensor:
                if not isinstance(out, torch.Tensor):
                    raise ModelError(f"GAIA: layer {name!r} outputs a {type(out).__name__}, not a tensor; name a "
                                     "layer inside it.")
                if name in acts:
                    raise ModelError(f"GAIA: layer {name!r} runs more than once per forward pass; its attribution "
                                     "gradient is ambiguous. Name layers that run once.")
                # the downstream network reads this very tensor, so its gradient is the layer's attribution
                # gradient; a clone keeps a later in-place op from changing another module's tensor
                acts[name] = out.clone()
                return acts[name]
            return hook

        handles = [modules[n].register_forward_hook(capture(n)) for n in layers]
        try:
            with probe.eval_mode(), torch.enable_grad(), probe.model_inputs(batch.x) as inputs:
                logits = probe.output_logits(call_model(probe.model, inputs))
                missing = [n for n in layers if n not in acts]
                if missing:
                    raise ModelError(f"GAIA: layers {missing} were not reached in the forward pass.")
                grads = torch.autograd.grad(predicted_log_confidence(logits).sum(), [acts[n] for n in layers],
                                            allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        cols = []
        for name, g in zip(layers, grads):
            if g is None:  # the layer does not reach the logits
                raise ModelError(f"GAIA: layer {name!r} does not influence the logits; name other layers.")
            cols.append(channel_average(g.detach().double(), name).norm(dim=1))
        return torch.stack(cols, dim=1)


@register("gaia-a")
class GAIAA(Detector):
    """GAIA-A, channel-wise average abnormality (Chen et al., "GAIA: Delving into Gradient-based Attribution
    Abnormality for Out-of-distribution Detection", NeurIPS 2023, https://arxiv.org/abs/2311.09620).

    Score: ``-sum_l ||mean_positions d log softmax(f)_c_hat / d A_l||_2``, ``A_l`` the output of tapped layer
    l (a ``C x H x W`` map averaged over H x W per channel, as Grad-CAM's channel weights; a ``T x D``
    sequence averaged over T). OOD samples have abnormally large channel-averaged attribution gradients, so
    higher = more ID. Closest faithful reading: the paper's exact output component (here the log-confidence
    of the predicted class), its in-layer aggregation (here the L2 norm over channels) and its cross-layer
    fusion (here a plain sum) could not be recovered from its text or official code; the zero-deflation
    component (GAIA-Z) is not implemented.

    Inputs: the model (taps' gradients: one forward + one backward per batch; w.r.t. activations, not
    parameters). Fits nothing. Hyperparameters: ``layers`` (None = the probe's default layers, every
    activation module reached once, in forward order; or a list of module names).
    """

    paper = ("Chen et al., GAIA: Delving into Gradient-based Attribution Abnormality for Out-of-distribution "
             "Detection, NeurIPS 2023")
    citation = GAIA
    signals = ("taps",)
    needs_model = True

    hyperparams = {"layers": hp.names(none=True)}

    def __init__(self, layers: Sequence[str] | None = None) -> None:
        self.layers = None if layers is None else tuple(layers)

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing: no gradient pass over the fit data

    def requests(self) -> list[Request]:
        return [AttributionAbnormality(self.layers)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return -signals.get(self.requests()[0]).double().sum(dim=1)
