"""Feature-map forms of activation shaping: the shaping is applied to a layer inside the network and the
forward pass runs on from there (through :meth:`gradood.Probe.forward`'s ``modify=``), as the papers do on
the last convolutional block of a ResNet, rather than on the head's input. Higher = more in-distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, ModelError
from ..signals import LOGITS, ProbeBatch, Request, Signals
from . import _hyperparams as hp
from . import _papers
from .base import Detector, register
from .shaping import ASH_MODES, ash


def last_feature_map_layer(probe) -> str:
    """The last of the probe's default layers (activation modules reached once) whose output is a feature map
    (``B x C x ...``, at least 3 dimensions): the input of the pooling in front of a CNN's head."""
    example = probe._example
    shapes: dict[str, tuple[int, ...]] = {}
    layers = probe.default_layers()
    out = probe.forward(example, layers, validate=False)
    for name in layers:
        shapes[name] = tuple(out.taps[name].shape)
    maps = [n for n in layers if len(shapes[n]) >= 3]
    if not maps:
        raise ModelError("ash-fm found no activation layer with a feature-map output (B x C x H x W): pass "
                          "layer=<module name>, or use the penultimate forms ash-s / ash-p / ash-b.")
    return maps[-1]


def ash_map(out: torch.Tensor, percentile: float, mode: str) -> torch.Tensor:
    """ASH over all ``C x H x W`` values of each sample's feature map (the official code flattens them)."""
    return ash(out.flatten(1), percentile, mode).reshape(out.shape).to(out.dtype)


@dataclass(frozen=True)
class ShapedMapEnergy(Request):
    """``B``: the energy ``LSE(f)`` of the logits when ``layer``'s output is shaped by ASH (``mode``,
    ``percentile``) and the network runs on from it. ``layer=None``: :func:`last_feature_map_layer`."""

    layer: str | None
    mode: str
    percentile: float

    @property
    def key(self) -> str:
        return f"ash-fm:{self.layer or 'last-map'}:{self.mode}:p={self.percentile:g}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layer = self.layer if self.layer is not None else last_feature_map_layer(probe)
        out = probe.forward(batch.x, modify={layer: lambda o: ash_map(o, self.percentile, self.mode)},
                            validate=False)
        return torch.logsumexp(out.logits.double(), dim=1)


@register("ash-fm")
class ASHFeatureMap(Detector):
    """ASH on a feature map (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023, https://arxiv.org/abs/2209.09858), the paper's placement: the
    output of a convolutional layer (default: the last activation layer with a feature-map output, i.e. the map
    the head's pooling reads) is shaped per sample over all its ``C x H x W`` values -- top
    ``1 - percentile/100`` kept ("p"), then binarised ("b") or rescaled by ``exp(sum / kept sum)`` ("s") --
    and the network runs on from there; score: the energy ``LSE(f)`` of the resulting logits. Higher = more ID.

    Inputs: the model (one extra forward pass per batch with the layer's output replaced). Fitted state:
    ``layer_`` (the layer, chosen at fit when ``layer`` is None). Hyperparameters: ``mode`` ("s"), ``percentile`` (90, the paper's ImageNet ASH-S value), ``layer`` (None =
    the last activation layer with a feature-map output; or a module name).
    """

    paper = ("Djurisic et al., Extremely Simple Activation Shaping for Out-of-Distribution Detection, "
             "ICLR 2023")
    citation = _papers.ASH
    signals = ("taps",)
    needs_model = True

    hyperparams = {"mode": hp.choice(*ASH_MODES), "percentile": hp.real(low=0, high=100),
                   "layer": hp.text(none=True)}

    def __init__(self, mode: str = "s", percentile: float = 90.0, layer: str | None = None) -> None:
        self.mode = mode
        self.percentile = percentile
        self.layer = layer

    def fit_requests(self) -> list[Request]:
        return [LOGITS]  # only to have run the model once: the layer is chosen at fit

    def _fit(self, signals: Signals, **_: object) -> None:
        if signals.probe is None:
            raise InputError("ash-fm runs the model from a layer onwards: build the signals with "
                             "probe.signals(data), not from arrays.")
        self.layer_ = self.layer if self.layer is not None else last_feature_map_layer(signals.probe)

    def requests(self) -> list[Request]:
        return [ShapedMapEnergy(self.layer_, self.mode, float(self.percentile))]

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.get(self.requests()[0]).double()
