"""Feature-map forms of activation shaping: the shaping is applied to a layer inside the network and the
forward pass runs on from there (through :meth:`gradood.Probe.forward`'s ``modify=``), as the papers do on
the last convolutional block of a ResNet, rather than on the head's input. Higher = more in-distribution.

ASH (``ash-fm``), RankFeat (``rankfeat``: rank-1 removal), SCALE (``scale-fm``) and BATS on a BatchNorm
layer (``bats-fm``). DICE has no feature-map form (it sparsifies the head's weights; see ``dice``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InputError, ModelError, NotApplicableError
from ..probe import call_model
from ..signals import LOGITS, ProbeBatch, Request, Signals, is_feature_map
from . import _hyperparams as hp
from . import _papers
from .base import Detector, register
from .shaping import ASH_MODES, _check_kept, ash


def feature_map_layers(probe) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, output shape)`` of the probe's default layers (activation modules reached once), in forward
    order, whose output is a feature map (``B x C x ...``, at least 3 dimensions; not the ``B x T x H``
    token activations of a transformer, which have no channel-first map to shape)."""
    layers = probe.default_layers()
    out = probe.forward(probe._example, layers, validate=False)
    return [(n, tuple(out.taps[n].shape)) for n in layers if is_feature_map(probe._example, out.taps[n])]


def last_feature_map_layer(probe, who: str = "ash-fm",
                           fix: str = "pass layer=<module name>, or use the penultimate forms ash-s / ash-p / ash-b"
                           ) -> str:
    """The last of the probe's default layers (activation modules reached once) whose output is a feature map
    (``B x C x ...``, at least 3 dimensions): the input of the pooling in front of a CNN's head. ``who`` and
    ``fix`` word the error raised when there is none (an MLP)."""
    maps = feature_map_layers(probe)
    if not maps:
        raise NotApplicableError(f"{who} found no activation layer with a feature-map output (B x C x H x W): {fix}.")
    return maps[-1][0]


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
        _needs_probe(signals, "ash-fm")
        self.layer_ = self.layer if self.layer is not None else last_feature_map_layer(signals.probe)

    def requests(self) -> list[Request]:
        return [ShapedMapEnergy(self.layer_, self.mode, float(self.percentile))]

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.get(self.requests()[0]).double()


def _needs_probe(signals: Signals, who: str) -> None:
    """The signals' probe, having run one batch (the layer is chosen on it, also when every signal came from
    the disk cache and no batch has run in this process)."""
    if signals.probe is None:
        raise InputError(f"{who} runs the model from a layer onwards: build the signals with probe.signals(data), "
                         "not from arrays.")
    signals.warm_up()


def _energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return temperature * torch.logsumexp(logits.double() / temperature, dim=1)


# ------------------------------------------------------------------------------------------------ RankFeat
RANK1_METHODS = ("svd", "power")


def previous_stage_layer(probe, last: str) -> str | None:
    """RankFeat's "Block 3" in general terms: the last of the probe's default feature-map layers before ``last``
    whose spatial size differs from ``last``'s (the output of the previous resolution stage), or None."""
    maps = feature_map_layers(probe)
    names = [n for n, _ in maps]
    if last not in names:
        return None
    i = names.index(last)
    earlier = [n for n, shape in maps[:i] if shape[2:] != maps[i][1][2:]]
    return earlier[-1] if earlier else None


def _power_rank1(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """``sigma u v^T`` per ``C x N`` matrix of ``x`` (``B x C x N``) by the official code's power iteration:
    ``v = norm(u X)``, ``u = norm(X v)`` repeated, ``sigma = u X v`` (norms with the official +1e-10). The start
    vector ``u`` (shared by the batch, as in the official code) is drawn from N(0, 1) with a fixed seed (0)."""
    b, c, _ = x.shape
    if iterations < 1:
        raise ConfigError(f"rankfeat power iteration needs iterations >= 1, got {iterations}.")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(c, generator=g, dtype=torch.float64).to(x.device, x.dtype).reshape(1, 1, c).expand(b, 1, c)
    for _ in range(iterations):
        v = u @ x
        v = (v / (v.norm(dim=2, keepdim=True) + 1e-10)).transpose(1, 2)
        u = (x @ v).transpose(1, 2)
        u = u / (u.norm(dim=2, keepdim=True) + 1e-10)
    sigma = u @ x @ v
    return sigma * (u.transpose(1, 2) @ v.transpose(1, 2))


def remove_rank1(out: torch.Tensor, method: str = "svd", iterations: int = 20, layer: str = "") -> torch.Tensor:
    """RankFeat's feature: per sample, the ``C x (H W)`` matrix ``X`` of a ``B x C x ...`` map minus its rank-1
    term ``s1 u1 v1^T`` (exact, ``method="svd"``, or ``iterations`` of power iteration, ``"power"``);
    float64, the shape of ``out``."""
    if out.ndim < 3:
        raise ModelError(f"rankfeat: layer {layer!r} outputs {tuple(out.shape)}, not a feature map (B x C x H x W); "
                         "name a convolutional layer with layers=[...].")
    x = out.detach().double().reshape(out.shape[0], out.shape[1], -1)
    r1 = _exact_rank1(x) if method == "svd" else _power_rank1(x, iterations)
    return (x - r1).reshape(out.shape)


def _exact_rank1(x: torch.Tensor) -> torch.Tensor:
    """``s1 u1 v1^T`` of each ``C x N`` matrix of ``x``, exactly: from the top eigenvector of the smaller Gram
    matrix (``u1`` of ``X X^T`` when C <= N: ``u1 u1^T X``; else ``v1`` of ``X^T X``: ``X v1 v1^T``). The same
    term as the SVD's (its sensitivity to a small gap ``s1 - s2`` is the SVD's too) at a third to a tenth of
    the time of a batched ``torch.linalg.svd`` on CPU; tests check it against numpy's SVD."""
    if x.shape[1] <= x.shape[2]:
        u = torch.linalg.eigh(x @ x.transpose(1, 2)).eigenvectors[:, :, -1:]  # eigenvalues ascending
        return u @ (u.transpose(1, 2) @ x)
    v = torch.linalg.eigh(x.transpose(1, 2) @ x).eigenvectors[:, :, -1:]
    return (x @ v) @ v.transpose(1, 2)


@dataclass(frozen=True)
class RankFeatEnergy(Request):
    """``B``: ``T * LSE(mean_l f_l / T)``, ``f_l`` the logits when the rank-1 term of ``layers[l]``'s output is
    removed and the network runs on from it (one forward per layer). ``layers=None``: RankFeat's default
    layers (:meth:`RankFeat.default_layers`), found on the batch's probe."""

    layers: tuple[str, ...] | None
    fuse: bool
    method: str
    iterations: int
    temperature: float

    @property
    def key(self) -> str:
        where = ",".join(self.layers) if self.layers is not None else ("auto-fused" if self.fuse else "last-map")
        how = self.method + (f":it={self.iterations}" if self.method == "power" else "")
        return f"rankfeat:{where}:{how}:T={self.temperature:g}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layers = self.layers if self.layers is not None else RankFeat.default_layers(probe, self.fuse)
        total = None
        for layer in layers:
            fn = (lambda o, n=layer: remove_rank1(o, self.method, self.iterations, n))
            f = probe.forward(batch.x, modify={layer: fn}, validate=False).logits.double()
            total = f if total is None else total + f
        return _energy(total / len(layers), self.temperature)


@register("rankfeat")
class RankFeat(Detector):
    """RankFeat: rank-1 feature removal (Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for
    Out-of-distribution Detection", NeurIPS 2022, https://arxiv.org/abs/2209.08590).

    Per sample, a layer's ``C x H x W`` output is read as the ``C x HW`` matrix ``X``; its rank-1 term
    ``s1 u1 v1^T`` (``s1`` the largest singular value; OOD maps have a larger, more dominant one) is removed,
    ``X' = X - s1 u1 v1^T``, and the network runs on from ``X'`` to the logits. Score: the energy
    ``T * LSE(f / T)``. Higher = more ID. As the official code (test_ood_resnetv2.py, test_ood_squeezenet.py:
    "Block 3 + 4"), the default removes the rank-1 term at two layers in two separate runs -- the last
    activation layer with a feature-map output (the official Block 4 output) and the last one of the previous
    spatial resolution (the Block 3 output; in a ResNet the last block of the previous stage) -- and
    averages the two runs' logits before the energy ("fusion at the logit space"); a model with one
    resolution has one run. ``fuse=False``: the last map alone (the paper's "Block 4" row).

    Inputs: the model (one extra forward per layer per batch, 2 by default, and a batched rank-1
    decomposition of the ``C x HW`` maps in float64). Fitted state: ``layers_`` (the layers, chosen at fit when ``layers`` is None).
    Hyperparameters: ``fuse`` (True), ``layers`` (None = the default above; or module names, each removed in
    its own run, logits averaged), ``method`` ("svd": the exact rank-1 term of the SVD, the official default,
    computed from the top eigenvector of the smaller Gram matrix ``X X^T`` or ``X^T X``, the same term 3 to
    10 times faster than a batched SVD on CPU; "power": the paper's power iteration, ``iterations`` (20, the official value) steps from a start vector drawn with a fixed seed where
    the official code draws it unseeded), ``temperature`` T (1, the official value). Models without a feature
    map (an MLP) raise a ModelError. The rank-1 term is not unique when ``s1 = s2`` (then any choice removes
    the same energy, but the map differs); SVD's sign ambiguity does not matter (``u v^T`` is invariant).
    """

    paper = ("Song, Sebe & Wang, RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection, "
             "NeurIPS 2022")
    citation = _papers.RANKFEAT
    signals = ("taps",)
    needs_model = True

    hyperparams = {"fuse": hp.boolean(), "layers": hp.names(none=True), "method": hp.choice(*RANK1_METHODS),
                   "iterations": hp.integer(minimum=1), "temperature": hp.positive()}

    def __init__(self, fuse: bool = True, layers: Sequence[str] | None = None, method: str = "svd",
                 iterations: int = 20, temperature: float = 1.0) -> None:
        self.fuse = fuse
        self.layers = None if layers is None else tuple(layers)
        self.method = method
        self.iterations = iterations
        self.temperature = temperature
        if self.layers is not None and not fuse and len(self.layers) > 1:
            raise ConfigError(f"rankfeat fuse=False removes the rank-1 term at one layer, but layers= names "
                              f"{len(self.layers)}: name one layer, or set fuse=True to average their runs.")

    @staticmethod
    def default_layers(probe, fuse: bool = True) -> tuple[str, ...]:
        """``(previous-stage map, last map)`` (the official Block 3 and Block 4), or ``(last map,)``."""
        last = last_feature_map_layer(probe, "rankfeat", "pass layers=[<module name>] naming a convolutional "
                                                         "layer; RankFeat needs a C x H x W map")
        prev = previous_stage_layer(probe, last) if fuse else None
        return (last,) if prev is None else (prev, last)

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing from the data: the layers are chosen on the probe's first batch

    def _fit(self, signals: Signals, **_: object) -> None:
        _needs_probe(signals, "rankfeat")
        self.layers_ = self.layers if self.layers is not None else self.default_layers(signals.probe, self.fuse)

    def requests(self) -> list[Request]:
        return [RankFeatEnergy(getattr(self, "layers_", self.layers), self.fuse, self.method, self.iterations,
                               float(self.temperature))]

    def _score(self, signals: Signals) -> torch.Tensor:
        _needs_probe(signals, "rankfeat")
        return signals.get(self.requests()[0]).double()


# ------------------------------------------------------------------------------------------------ SCALE
SCALE_FIX = "pass layer=<module name>, or use the penultimate form scale"


def scale_map(out: torch.Tensor, percentile: float) -> torch.Tensor:
    """SCALE over all ``C x H x W`` values of each sample (the official ``scale()``): ``x * exp(s1 / s2)``,
    ``s1`` the sum of all values, ``s2`` the sum of the ``k = n - round(n p / 100)`` largest; nothing is
    pruned. Rows whose top-k sum is 0 are left unscaled (as ``scale``). float64, the shape of ``out``."""
    h = out.detach().double().flatten(1)
    k = _check_kept(h.shape[1], percentile, "SCALE")
    s1 = h.sum(dim=1, keepdim=True)
    s2 = torch.topk(h, k, dim=1).values.sum(dim=1, keepdim=True)
    ratio = torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s2))
    return (h * torch.exp(ratio)).reshape(out.shape)


@dataclass(frozen=True)
class ScaledMapEnergy(Request):
    """``B``: the energy ``LSE(f)`` of the logits when ``layer``'s output is scaled by SCALE (``percentile``)
    and the network runs on from it. ``layer=None``: :func:`last_feature_map_layer`."""

    layer: str | None
    percentile: float

    @property
    def key(self) -> str:
        return f"scale-fm:{self.layer or 'last-map'}:p={self.percentile:g}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layer = self.layer if self.layer is not None else last_feature_map_layer(probe, "scale-fm", SCALE_FIX)
        out = probe.forward(batch.x, modify={layer: lambda o: scale_map(o, self.percentile)}, validate=False)
        return _energy(out.logits)



@register("scale-fm")
class ScaleFeatureMap(Detector):
    """SCALE on a feature map (Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc
    Out-of-distribution Detection Enhancement", ICLR 2024, https://arxiv.org/abs/2310.00227).

    The official ``scale()`` on a layer's whole ``C x H x W`` output per sample: ``A' = A * exp(s1 / s2)``,
    ``s1`` the sum of all its values, ``s2`` the sum of the ``k = n - round(n p / 100)`` largest (``n = C H
    W``); unlike ASH-S nothing is pruned. The network runs on from ``A'``; score: the energy ``LSE(f)``.
    Higher = more ID. Placement: the official SCALE network applies ``scale()`` to the pooled penultimate
    features viewed as ``D x 1 x 1`` maps (gradood's ``scale``); this form applies the same function inside the
    network, where ``ash-fm`` applies ASH (default: the last activation layer with a feature-map output).
    On the layer whose output is the head's input it is ``scale`` (a test checks it).

    Inputs: the model (one extra forward per batch). Fitted state: ``layer_`` (chosen at fit when ``layer`` is
    None). Hyperparameters: ``percentile`` p (85, the paper's ImageNet value, as ``scale``), ``layer`` (None =
    the last activation layer with a feature-map output; or a module name). Models without a feature map (an
    MLP) raise a ModelError unless ``layer`` is given.
    """

    paper = ("Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution Detection "
             "Enhancement, ICLR 2024")
    citation = _papers.SCALE
    signals = ("taps",)
    needs_model = True

    hyperparams = {"percentile": hp.real(low=0, high=100), "layer": hp.text(none=True)}

    def __init__(self, percentile: float = 85.0, layer: str | None = None) -> None:
        self.percentile = percentile
        self.layer = layer

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing from the data: the layer is chosen on the probe's first batch

    def _fit(self, signals: Signals, **_: object) -> None:
        _needs_probe(signals, "scale-fm")
        self.layer_ = self.layer if self.layer is not None else last_feature_map_layer(signals.probe, "scale-fm",
                                                                                       SCALE_FIX)

    def requests(self) -> list[Request]:
        return [ScaledMapEnergy(getattr(self, "layer_", self.layer), float(self.percentile))]

    def _score(self, signals: Signals) -> torch.Tensor:
        _needs_probe(signals, "scale-fm")
        return signals.get(self.requests()[0]).double()


# ------------------------------------------------------------------------------------------------ BATS
BN_FIX = ("bats-fm truncates a BatchNorm layer's output to its typical set: pass layer=<name of an affine "
          "BatchNorm module>, or use the penultimate form bats (statistics='features' estimates the typical set "
          "from ID features when the model has no BatchNorm)")


def batchnorm_layers(probe, affine_only: bool = False) -> list[str]:
    """Names of the model's BatchNorm modules (affine ones only with ``affine_only``) that a forward pass of the
    probe's first sample reaches exactly once, in forward order."""
    modules = {n: m for n, m in probe.model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.affine or not affine_only)}
    if not modules:
        return []
    if probe._example is None:
        raise ModelError("run at least one batch through the probe before asking for its BatchNorm layers.")
    calls: dict[str, int] = {}
    order: list[str] = []

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any, _o: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), probe.eval_mode():
            call_model(probe.model, probe._example)
    finally:
        for h in handles:
            h.remove()
    return [n for n in order if calls[n] == 1]


def last_batchnorm_layer(probe) -> str:
    """The last affine BatchNorm module of a forward pass (reached once): BATS's default layer."""
    bns = batchnorm_layers(probe, affine_only=True)
    if not bns:
        raise NotApplicableError(f"bats-fm found no affine BatchNorm layer in {type(probe.model).__name__}: {BN_FIX}.")
    return bns[-1]


def _typical_bounds(module: nn.Module, layer: str, lam: float, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
        what = type(module).__name__ + ("" if not isinstance(module, nn.modules.batchnorm._BatchNorm)
                                        else " without affine parameters")
        raise ModelError(f"bats-fm: layer {layer!r} is a {what}; {BN_FIX}.")
    beta = module.bias.detach().double()
    gamma = module.weight.detach().double().abs()
    shape = (1, -1) + (1,) * (ndim - 2)
    return (beta - lam * gamma).reshape(shape), (beta + lam * gamma).reshape(shape)


def truncate_to_typical(out: torch.Tensor, module: nn.Module, layer: str, lam: float) -> torch.Tensor:
    """BATS's truncated BatchNorm: each channel ``c`` of a BatchNorm layer's output clamped to
    ``[beta_c - lam |gamma_c|, beta_c + lam |gamma_c|]``. float64, the shape of ``out``."""
    lo, hi = _typical_bounds(module, layer, lam, out.ndim)
    return torch.maximum(torch.minimum(out.detach().double(), hi.to(out.device)), lo.to(out.device))


@dataclass(frozen=True)
class TruncatedBNEnergy(Request):
    """``B``: the energy ``LSE(f)`` of the logits when the output of the BatchNorm ``layer`` is truncated to
    ``beta +- lam |gamma|`` and the network runs on from it. ``layer=None``: :func:`last_batchnorm_layer`."""

    layer: str | None
    lam: float

    @property
    def key(self) -> str:
        return f"bats-fm:{self.layer or 'last-bn'}:lam={self.lam:g}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe = batch.probe
        layer = self.layer if self.layer is not None else last_batchnorm_layer(probe)
        modules = dict(probe.model.named_modules())
        if layer not in modules:
            raise ConfigError(f"bats-fm: unknown layer {layer!r}: name an affine BatchNorm module of the model, e.g. "
                              f"{batchnorm_layers(probe, affine_only=True)[:8]}.")
        module = modules[layer]
        _typical_bounds(module, layer, self.lam, 2)  # a BatchNorm? (before running the model)
        out = probe.forward(batch.x, modify={layer: lambda o: truncate_to_typical(o, module, layer, self.lam)},
                            validate=False)
        return _energy(out.logits)


@register("bats-fm")
class BATSFeatureMap(Detector):
    """BATS on a BatchNorm layer inside the network (Zhu, Chen, Xie, Gong, Yu, Hu & Liu, "Boosting
    Out-of-distribution Detection with Typical Features", NeurIPS 2022, https://arxiv.org/abs/2211.11164).

    The paper's truncated BatchNorm (TrBN): the output of a BatchNorm layer is clamped per channel to its
    typical set ``[beta_c - lam |gamma_c|, beta_c + lam |gamma_c|]`` -- the BN's shift and scale are the mean
    and std of its output, so no ID statistics are estimated -- and the network runs on from there; score:
    the energy ``LSE(f)``. Higher = more ID. Default layer: the last affine BatchNorm module of the forward
    pass (reached once; in a ResNet the last block's last BN, before the residual addition). The official
    TrBN uses ``gamma`` itself, which equals ``|gamma|`` for the usual positive scales (a negative one would
    make its interval empty). On a BatchNorm whose output is the head's input it is ``bats`` with
    ``statistics="bn"`` (a test checks it).

    Inputs: the model (one extra forward per batch). Fitted state: ``layer_`` (chosen at fit when ``layer`` is
    None). Hyperparameters: ``lam`` (1.0, the paper's ResNet-50 value, as ``bats``), ``layer`` (None = the last
    affine BatchNorm; or a module name). Models without BatchNorm raise a ModelError naming the fix (the
    penultimate ``bats`` with ``statistics="features"``), so it is not in specs' ``"all"`` (the default bench's
    MNIST CNNs have no BatchNorm).
    """

    paper = "Zhu et al., Boosting Out-of-distribution Detection with Typical Features, NeurIPS 2022"
    citation = _papers.BATS
    signals = ("taps",)
    needs_model = True
    in_all = False

    hyperparams = {"lam": hp.non_negative(), "layer": hp.text(none=True)}

    def __init__(self, lam: float = 1.0, layer: str | None = None) -> None:
        self.lam = lam
        self.layer = layer

    def fit_requests(self) -> list[Request]:
        return []  # fits nothing from the data: the layer is chosen on the probe's first batch

    def _fit(self, signals: Signals, **_: object) -> None:
        _needs_probe(signals, "bats-fm")
        probe = signals.probe
        layer = self.layer if self.layer is not None else last_batchnorm_layer(probe)
        modules = dict(probe.model.named_modules())
        if layer not in modules:
            raise ConfigError(f"bats-fm: unknown layer {layer!r}: name an affine BatchNorm module of the model, e.g. "
                              f"{batchnorm_layers(probe, affine_only=True)[:8]}.")
        _typical_bounds(modules[layer], layer, float(self.lam), 2)
        self.layer_ = layer

    def requests(self) -> list[Request]:
        return [TruncatedBNEnergy(getattr(self, "layer_", self.layer), float(self.lam))]

    def _score(self, signals: Signals) -> torch.Tensor:
        _needs_probe(signals, "bats-fm")
        return signals.get(self.requests()[0]).double()
