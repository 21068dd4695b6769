"""GAIA-A (channel-wise average abnormality) and GAIA-Z (zero-deflation abnormality) of attribution gradients
(Chen et al., NeurIPS 2023), as the official code (JGEthanChen/GAIA-OOD, ``cal_method.py``).

The attribution gradient of a layer is the gradient of an output of the network w.r.t. that layer's output
(the quantity Grad-CAM averages per channel). Both detectors read it for a whole batch with one forward and
one backward: in eval mode the samples of a batch do not interact, so the gradient of a sum of per-sample
outputs w.r.t. a B x C x H x W activation holds every sample's own. GAIA-A (:class:`GAIAA`, the official
``cal_grad_value``) divides the squared channel averages of the summed pre-head features' gradients at the
inner layers by the mean absolute gradient of the summed log-softmax at the pre-head features; GAIA-Z
(:class:`GAIAZ`, the official ``cal_zero``) counts, per channel, the proportion of nonzero entries of the
largest logit's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, InputError, ModelError, NotApplicableError
from ..signals import ProbeBatch, Request, Signals, is_feature_map
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


def attributed_forward(probe, x: Any, layers: Sequence[str], inputs_of: bool = False,
                       passed: dict[str, torch.Tensor] | None = None):
    """One forward pass of ``x`` with gradients (``Probe.forward(grad=True)``: logits = the head's output,
    features = its input) in which every named layer's output (its input with ``inputs_of``: the
    pre-activation of an activation module) is captured as a tensor the rest of the network reads, so that
    its gradient is the layer's attribution gradient. Returns ``({layer: tensor}, ForwardOutput)``; ``passed``
    (if given) receives the copies the network read on from."""
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
        # gradient, also when a later op works in place (ReLU(inplace=True) after a BatchNorm); a leaf when
        # nothing before it requires a gradient (frozen parameters)
        acts[name] = t.clone() if t.requires_grad else t.detach().clone().requires_grad_(True)
        out = acts[name].clone()
        if passed is not None:
            passed[name] = out
        return out

    def out_hook(name: str):
        return lambda _m, _i, out: capture(name, out)

    def in_hook(name: str):
        return lambda _m, args: (capture(name, args[0]),) + tuple(args[1:]) if args else None

    handles = [modules[n].register_forward_pre_hook(in_hook(n)) if inputs_of
               else modules[n].register_forward_hook(out_hook(n)) for n in layers]
    try:
        fo = probe.forward(x, grad=True, validate=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in acts]
    if missing:
        raise ModelError(f"GAIA: layers {missing} were not reached in the forward pass.")
    return acts, fo


def _layer_grads(output: torch.Tensor, acts: dict[str, torch.Tensor], layers: Sequence[str],
                 of_what: str) -> list[torch.Tensor]:
    """Per layer, the float64 gradient of the scalar ``output`` w.r.t. the captured layer, ``B x ...``."""
    grads = torch.autograd.grad(output, [acts[n] for n in layers], allow_unused=True) \
        if output.requires_grad else [None] * len(layers)
    out = []
    for name, g in zip(layers, grads):
        if g is None:  # the layer does not reach the output
            raise ModelError(f"GAIA: layer {name!r} does not influence the {of_what}; name other layers.")
        out.append(g.detach().double())
    return out


def attribution_gradients(probe, x: Any, layers: Sequence[str], output: Callable[[torch.Tensor], torch.Tensor],
                          inputs_of: bool = False) -> list[torch.Tensor]:
    """Per layer, the float64 gradient of ``output(logits).sum()`` (``logits`` the model's output logits)
    w.r.t. the layer's output (its input with ``inputs_of``), ``B x ...``: one forward and one backward for
    the batch (in eval mode the samples do not interact, so each sample's rows are its own gradient)."""
    acts, fo = attributed_forward(probe, x, layers, inputs_of)
    return _layer_grads(output(probe.output_logits(fo.output)).sum(), acts, layers, "logits")


# --------------------------------------------------------------------------------------------- GAIA-A
def gaia_a_components(probe, x: Any, layers: Sequence[str], inputs_of: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two components of the official ``cal_grad_value`` for a batch, float64: ``inner`` (``B x sum_l C_l``),
    ``|mean_positions d (sum_j h_j) / d A_l|`` over the channels of every layer concatenated, ``h`` the head's
    input (the pre-head features); ``output`` (``B``), ``mean_d |d (sum_k log softmax(f)_k) / d h_d|``, in
    closed form: the logits are ``f = W h + b`` (the probe's head), so ``d/dh = W^T (1 - K softmax(f))``.
    One forward and one backward."""
    acts, fo = attributed_forward(probe, x, layers, inputs_of)
    h = fo.features
    if not h.requires_grad:
        raise ModelError(f"GAIA-A: none of the layers {list(layers)} influences the head's input; name other layers.")
    grads = _layer_grads(h.sum(), acts, layers, "head's input (the pre-head features)")
    inner = torch.cat([channel_average(g, n) for n, g in zip(layers, grads)], dim=1).abs()
    logits = fo.logits.detach().double()
    dh = (1.0 - logits.shape[1] * torch.softmax(logits, dim=1)) @ probe.weight.double()
    return inner, dh.abs().mean(dim=1)


@dataclass(frozen=True)
class AttributionAbnormality(Request):
    """``B``: GAIA-A's official ``cal_grad_value`` score ``mean_(l, c) inner_lc^2 / output`` (see
    :func:`gaia_a_components`; ``A_l`` the output of layer l, or its input when ``inputs_of``).
    ``layers=None``: :func:`gaia_a_layers` of the batch's probe."""

    layers: tuple[str, ...] | None = None
    inputs_of: bool = False

    @property
    def key(self) -> str:
        where = "default" if self.layers is None else ("in:" if self.inputs_of else "") + ",".join(self.layers)
        return "gaia-a:" + where

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layers, inputs_of = (self.layers, self.inputs_of) if self.layers is not None else gaia_a_layers(probe)
        inner, output = gaia_a_components(probe, batch.x, list(layers), inputs_of)
        # official: mean((inner / sqrt(output))^2); a zero output component (all logits equal) scores -inf
        score = inner.pow(2).mean(dim=1) / output
        return torch.where(output > 0, score, torch.full_like(score, float("inf")))


def gaia_a_layers(probe) -> tuple[tuple[str, ...], bool]:
    """GAIA-A's default inner layers and whether their inputs (True) or outputs (False) are read: as
    :func:`gaia_z_layers`, every BatchNorm module reached once (their outputs); in a model without BatchNorm
    the pre-activations (the inputs of the activation modules reached once, Tanh and Sigmoid included) that are
    feature maps, else (a model without feature maps: an MLP, a transformer) all of them; with functional
    activations only, the outputs of the model's top-level children. Layers that do not reach the head's
    input are left out, and so is a layer whose output is the head's input itself or a view of it (a global
    pool before a flatten): the official code reads its gradient only for the output component."""
    from .feature_map import batchnorm_layers

    bns = batchnorm_layers(probe)
    modules = dict(probe.model.named_modules())
    if bns:
        candidates, inputs_of = list(bns), False
    else:
        layers = probe.default_layers()
        acts = [n for n in layers if isinstance(modules[n], _ACTIVATIONS + (torch.nn.Tanh, torch.nn.Sigmoid))]
        candidates, inputs_of = (acts or layers), bool(acts)
    keep: list[str] = []
    if candidates:
        passed: dict[str, torch.Tensor] = {}  # what the network read after each layer
        acts_, fo = attributed_forward(probe, probe._example, candidates, inputs_of, passed=passed)
        h = fo.features
        grads = torch.autograd.grad(h.sum(), [acts_[n] for n in candidates], allow_unused=True) \
            if h.requires_grad else [None] * len(candidates)
        ptr = h.untyped_storage().data_ptr()
        keep = [n for n, g in zip(candidates, grads)
                if g is not None and (inputs_of or passed[n].untyped_storage().data_ptr() != ptr)]
        if not bns:
            keep = [n for n in keep if is_feature_map(probe._example, acts_[n])] or \
                [n for n in keep if acts_[n].ndim <= 2]
    if not keep:
        raise NotApplicableError(f"gaia-a found no BatchNorm layer, activation or top-level layer before the head's input "
                         f"in {type(probe.model).__name__}. Pass layers=[<module names>] (their outputs are read).")
    return tuple(keep), inputs_of


class _GAIA(Detector):
    """What GAIA-A and GAIA-Z share: the layers (given, or chosen on one batch by ``default_layers``), one
    cached per-batch ``request`` of the shared pass, score = minus its value. Not registered."""

    citation = GAIA
    signals = ("taps",)
    needs_model = True
    request: Any = None
    default_layers: Any = None

    hyperparams = {"layers": hp.names(none=True)}

    def __init__(self, layers: Sequence[str] | None = None) -> None:
        self.layers = None if layers is None else tuple(layers)

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing: no gradient pass over the fit data (the layers are found on one batch)

    def _fit(self, signals: Signals, **_: object) -> None:
        if signals.probe is None:
            raise InputError(f"{self.name} backpropagates through the model: build the signals with "
                             "probe.signals(data), not from arrays.")
        signals.warm_up()  # the layers are chosen on one batch, also when every signal came from the cache
        if self.layers is not None:
            self.layers_, self.inputs_of_ = self.layers, False
        else:
            self.layers_, self.inputs_of_ = self.default_layers(signals.probe)

    def requests(self) -> list[Request]:
        if hasattr(self, "layers_"):
            return [self.request(tuple(self.layers_), bool(self.inputs_of_))]
        return [self.request(self.layers)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return -signals.get(self.requests()[0]).double()


@register("gaia-a")
class GAIAA(_GAIA):
    """GAIA-A, channel-wise average abnormality (Chen, Li, Qu, Wang, Wan & Xiao, "GAIA: Delving into
    Gradient-based Attribution Abnormality for Out-of-distribution Detection", NeurIPS 2023,
    https://arxiv.org/abs/2311.09620), as the official code's ``cal_grad_value`` (JGEthanChen/GAIA-OOD,
    ``cal_method.py``; docs/methods.md 8.5).

    With ``h`` the head's input (the pre-head features, the official ``before_head_data``) and ``f`` the
    logits: the inner component ``g_lc = mean_positions d (sum_j h_j) / d A_l[c]`` (the channel-wise average
    of the attribution gradient of the summed features w.r.t. the output ``A_l`` of inner layer l), the output
    component ``o = mean_d |d (sum_k log softmax(f)_k) / d h_d|`` (the log-softmax summed over all classes, so
    ``d/dh = W^T (1 - K p)`` for a linear head with K classes); score ``-mean_(l, c) (|g_lc| / sqrt(o))^2``
    over the channels of all layers concatenated. OOD inputs have abnormally large channel-averaged attribution
    gradients, so higher = more ID. A sample with ``o = 0`` (all logits equal) scores -inf.

    Default layers: every BatchNorm module reached once (their outputs), as ``gaia-z`` and as the official
    WideResNet/VGG setting (``-hook before_head``). Deviations: the output component is read at ``h`` itself;
    the official code reads it at its last hook (ResNet: ``layer4``'s map, whose channel averages are ``h``'s
    gradient divided by the pooled positions -- a constant factor, same ranking; WideResNet, BiT: the pooled
    ``h``). The official ResNet setting (the BatchNorms of ``layer3`` and ``layer4`` only) and ImageNet setting
    (BiT: the GroupNorms of block 4) need ``layers=``. Models without BatchNorm (gradood's generalisation, as
    ``gaia-z``): the pre-activations, i.e. the inputs of the activation modules reached once whose input is a
    feature map (in a conv -> BN -> ReLU network, the BN outputs), or all of them in a model without feature
    maps (an MLP, a transformer); with functional activations only, the outputs of the top-level children that
    reach ``h``. Left out: layers that do not reach ``h``, and a layer whose output is ``h`` or a view of it (a
    global pool before the flatten: constant gradient 1). A ``B x D`` layer has one channel per unit, a
    ``B x T x D`` sequence is averaged over T.

    Inputs: the model (one forward and one backward per batch, w.r.t. activations, not parameters; the output
    component in closed form from the head's weight). Fitted state: ``layers_`` and ``inputs_of_`` (the layers
    and whether their inputs are read, chosen on the first batch when ``layers`` is None); nothing is fitted
    from the data. Hyperparameters: ``layers`` (default None = the default above; or module names, whose
    outputs are read).
    """

    paper = ("Chen et al., GAIA: Delving into Gradient-based Attribution Abnormality for Out-of-distribution "
             "Detection, NeurIPS 2023")
    request = AttributionAbnormality
    default_layers = staticmethod(gaia_a_layers)


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
    maps = [n for n in candidates if is_feature_map(probe._example, taps[n])]  # an activation keeps its input's shape
    if not maps:
        raise NotApplicableError(f"gaia-z found no BatchNorm layer and no activation with a feature-map input in "
                         f"{type(probe.model).__name__}: it counts zeros per channel of C x H x W attribution "
                         "gradients. Pass layers=[<module names>] (their outputs are read), or use gaia-a.")
    return tuple(maps), bool(acts)


@register("gaia-z")
class GAIAZ(_GAIA):
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
    request = ZeroDeflation
    default_layers = staticmethod(gaia_z_layers)
