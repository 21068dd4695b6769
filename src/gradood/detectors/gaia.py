"""GAIA-A (channel-wise average abnormality) and GAIA-Z (zero-deflation abnormality) of attribution gradients
(Chen et al., NeurIPS 2023).

The attribution gradient of a layer is the gradient of the model's confidence in its prediction w.r.t. that
layer's output (the quantity Grad-CAM averages per channel). Per sample and per tapped layer gradood takes
the channel-wise spatial average of that gradient, its L2 norm over channels, and sums the norms over the
layers. One forward and one backward per batch: in eval mode the samples of a batch do not interact, so the
gradient of the summed per-sample confidences w.r.t. a B x C x H x W activation holds every sample's own.
GAIA-Z counts, per channel, the proportion of nonzero entries of such gradients (see :class:`GAIAZ`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, InputError, ModelError
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
        grads = attribution_gradients(probe, batch.x, layers, predicted_log_confidence)
        return torch.stack([channel_average(g, n).norm(dim=1) for n, g in zip(layers, grads)], dim=1)


def attribution_gradients(probe, x: Any, layers: Sequence[str], output: Callable[[torch.Tensor], torch.Tensor],
                          inputs_of: bool = False) -> list[torch.Tensor]:
    """Per layer, the float64 gradient of ``output(logits).sum()`` w.r.t. the layer's output (its input with
    ``inputs_of``: the pre-activation of an activation module), ``B x ...``: one forward and one backward for
    the batch (in eval mode the samples do not interact, so each sample's rows are its own gradient)."""
    if not layers:
        raise ConfigError("GAIA found no layers to read attribution gradients from: pass layers=[module names].")
    modules = dict(probe.model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ConfigError(f"GAIA: unknown layers {unknown}: name modules of the model, e.g. "
                          f"{[n for n in modules if n][:8]}.")
    acts: dict[str, torch.Tensor] = {}

    def capture(name: str, t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"GAIA: layer {name!r} {'receives' if inputs_of else 'outputs'} a {type(t).__name__}, "
                             "not a tensor; name a layer inside it.")
        if name in acts:
            raise ModelError(f"GAIA: layer {name!r} runs more than once per forward pass; its attribution "
                             "gradient is ambiguous. Name layers that run once.")
        # the downstream network reads a copy of this tensor, so its gradient is the layer's attribution
        # gradient, also when a later op works in place (ReLU(inplace=True) after a BatchNorm)
        acts[name] = t.clone()
        return acts[name].clone()

    def out_hook(name: str):
        return lambda _m, _i, out: capture(name, out)

    def in_hook(name: str):
        return lambda _m, args: (capture(name, args[0]),) + tuple(args[1:]) if args else None

    handles = [modules[n].register_forward_pre_hook(in_hook(n)) if inputs_of
               else modules[n].register_forward_hook(out_hook(n)) for n in layers]
    try:
        with probe.eval_mode(), torch.enable_grad(), probe.model_inputs(x) as inputs:
            logits = probe.output_logits(call_model(probe.model, inputs))
            missing = [n for n in layers if n not in acts]
            if missing:
                raise ModelError(f"GAIA: layers {missing} were not reached in the forward pass.")
            grads = torch.autograd.grad(output(logits).sum(), [acts[n] for n in layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, g in zip(layers, grads):
        if g is None:  # the layer does not reach the logits
            raise ModelError(f"GAIA: layer {name!r} does not influence the logits; name other layers.")
        out.append(g.detach().double())
    return out


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
    component is ``gaia-z``.

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


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max_c f_c``: the output whose attribution gradients the official GAIA-Z reads."""
    return logits.amax(dim=1)


@dataclass(frozen=True)
class ZeroDeflation(Request):
    """``B``: ``mean_(l, c) rho_lc^2`` over the channels of every layer, ``rho_lc`` the proportion of nonzero
    entries of channel c of ``d max_k f_k / d A_l`` (``A_l`` the output of layer l, or its input when
    ``inputs_of``). ``layers=None``: :func:`gaia_z_layers` of the batch's probe."""

    layers: tuple[str, ...] | None = None
    inputs_of: bool = False

    @property
    def key(self) -> str:
        where = "default" if self.layers is None else ("in:" if self.inputs_of else "") + ",".join(self.layers)
        return "gaia-z:" + where

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layers, inputs_of = (self.layers, self.inputs_of) if self.layers is not None else gaia_z_layers(probe)
        grads = attribution_gradients(probe, batch.x, list(layers), max_logit, inputs_of=inputs_of)
        rho = torch.cat([channel_average((g != 0).double(), n) for n, g in zip(layers, grads)], dim=1)
        return rho.pow(2).mean(dim=1)


_ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU, torch.nn.SiLU,
                torch.nn.Hardswish)


def gaia_z_layers(probe) -> tuple[tuple[str, ...], bool]:
    """GAIA-Z's default layers and whether their inputs (True) or outputs (False) are read: every BatchNorm
    module reached once (the official ``-hook bn``; their outputs); in a model without BatchNorm, the
    pre-activations: the inputs of the activation modules reached once whose input is a feature map."""
    from .feature_map import batchnorm_layers

    bns = batchnorm_layers(probe)
    if bns:
        return tuple(bns), False
    modules = dict(probe.model.named_modules())
    layers = probe.default_layers()
    acts = [n for n in layers if isinstance(modules[n], _ACTIVATIONS)]
    # without activation modules (functional ReLUs) the default layers are the top-level children: read their
    # outputs (a conv's output is then the pre-activation)
    candidates = acts or layers
    taps = probe.forward(probe._example, candidates, validate=False).taps if candidates else {}
    maps = [n for n in candidates if taps[n].ndim >= 3]  # an activation keeps its input's shape
    if not maps:
        raise ModelError(f"gaia-z found no BatchNorm layer and no activation with a feature-map input in "
                         f"{type(probe.model).__name__}: it counts zeros per channel of C x H x W attribution "
                         "gradients. Pass layers=[<module names>] (their outputs are read), or use gaia-a.")
    return tuple(maps), bool(acts)


@register("gaia-z")
class GAIAZ(Detector):
    """GAIA-Z, zero-deflation abnormality (Chen, Li, Qu, Wang, Wan & Xiao, "GAIA: Delving into Gradient-based
    Attribution Abnormality for Out-of-distribution Detection", NeurIPS 2023, https://arxiv.org/abs/2311.09620).

    The attribution gradient ``G_l = d max_k f_k / d A_l`` of the largest logit w.r.t. a layer's output
    ``A_l`` (``C x H x W``) is sparse for ID inputs (inactive ReLUs and max-pool routing zero it); OOD inputs
    deflate its zeros. Per channel c, ``rho_lc = (1/HW) #{(h, w): G_l[c, h, w] != 0}``; score
    ``-mean_(l, c) rho_lc^2`` over the channels of all layers concatenated, as the official code (cal_zero
    with ``-hook bn``: every BatchNorm2d output). Higher = more ID (fewer nonzeros).

    Default layers: every BatchNorm module reached once (their outputs). Models without BatchNorm: the inputs
    of the activation modules (reached once) whose input is a feature map -- the pre-activations, which in a
    conv -> BN -> ReLU network are the BN outputs (and get the same gradient where a residual addition lies
    in between); with functional activations only, the outputs of the model's top-level children that are
    feature maps (the probe's default layers). These fallbacks are gradood's generalisation, not the paper's.
    Models without any feature map (an MLP) raise a ModelError. The official ImageNet setting (BiT: the GroupNorm layers of block 4 and the
    pre-head output) needs ``layers=``. A ``B x D`` layer counts each unit as its own channel (0 or 1);
    ``B x T x D`` sequences count over T.

    Inputs: the model (one forward + one backward per batch, w.r.t. activations, not parameters).
    Fitted state: ``layers_`` and ``inputs_of_`` (the layers and whether their inputs are read, chosen on the
    first batch when ``layers`` is None). Hyperparameters: ``layers`` (None = the default above; or module
    names, whose outputs are read).
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
        return []  # fits nothing: no gradient pass over the fit data (the layers are found on one batch)

    def _fit(self, signals: Signals, **_: object) -> None:
        if signals.probe is None:
            raise InputError("gaia-z backpropagates through the model: build the signals with "
                             "probe.signals(data), not from arrays.")
        if self.layers is not None:
            self.layers_, self.inputs_of_ = self.layers, False
        else:
            self.layers_, self.inputs_of_ = gaia_z_layers(signals.probe)

    def requests(self) -> list[Request]:
        if hasattr(self, "layers_"):
            return [ZeroDeflation(tuple(self.layers_), bool(self.inputs_of_))]
        return [ZeroDeflation(self.layers)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return -signals.get(self.requests()[0]).double()
