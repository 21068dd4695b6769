"""Per-sample gradient statistics of a whole batch from one batched forward and one backward pass.

Every existing OOD library loops over samples (one backward each) or vmaps a per-sample gradient of all
parameters (memory = samples x parameters). Here each layer's per-sample gradient is formed -- or avoided --
from its input activations and the gradient w.r.t. its output (see :mod:`._layers` for the per-layer rules
and :mod:`._capture` for the pass), so a batch costs about one training step.

All functions take ``loss_fn`` mapping the model output (``B x C``) to per-sample losses ``(B,)``; the
per-sample gradient of sample i is the gradient of ``loss_i``, which must depend on sample i's output only
(layers without a native rule call ``loss_fn`` on one-sample outputs). The model must be in eval mode. ``x`` is a batch tensor or a dict of
equal-length tensors (a tokenizer's ``BatchEncoding``; the model is called as ``model(**x)``). ``params``
selects the parameters: ``"all"`` (every parameter with ``requires_grad``), an int k (the last k layers
that own parameters, in forward order) or a list of parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ._capture import (Loss, batch_size, check_eval_mode, check_losses, model_dtype_device, prepare_input,
                       resolve_params, run_pass)
from ._layers import LayerGrads, row_sqnorms
from .basis import GradBasis, Tensors


# ---------------------------------------------------------------------------------------------- reducers
class _SqNorms:
    def __init__(self, B: int, dtype: torch.dtype, device: torch.device) -> None:
        self.total = torch.zeros(B, dtype=dtype, device=device)

    def add_layer(self, lg: LayerGrads, names: dict[str, str]) -> None:
        self.total += lg.sqnorms()

    def add_materialized(self, rows: slice, grads: dict[str, torch.Tensor]) -> None:
        for g in grads.values():
            self.total[rows] += row_sqnorms(g)


class _Projections:
    def __init__(self, B: int, dirs: dict[str, torch.Tensor], offset: torch.Tensor) -> None:
        self.dirs = dirs
        self.total = (-offset).expand(B, -1).clone()

    def add_layer(self, lg: LayerGrads, names: dict[str, str]) -> None:
        self.total += lg.project({a: self.dirs[n] for a, n in names.items()})

    def add_materialized(self, rows: slice, grads: dict[str, torch.Tensor]) -> None:
        for n, g in grads.items():
            self.total[rows] += g @ self.dirs[n]


class _Accumulate:
    """Adds per-parameter ``(P,)`` / ``(P, K)`` results into flat accumulators (views of the outputs)."""

    def __init__(self, flat: dict[str, list[torch.Tensor]]) -> None:
        self.flat = flat  # name -> accumulators, one per quantity

    def _add(self, name: str, values: Sequence[torch.Tensor]) -> None:
        for acc, v in zip(self.flat[name], values):
            acc += v.to(acc.dtype)


class _Moments(_Accumulate):
    def add_layer(self, lg: LayerGrads, names: dict[str, str]) -> None:
        for a, (s, ss) in lg.moments().items():
            self._add(names[a], (s, ss))

    def add_materialized(self, rows: slice, grads: dict[str, torch.Tensor]) -> None:
        for n, g in grads.items():
            self._add(n, (g.sum(0), (g * g).sum(0)))


class _WeightedSums(_Accumulate):
    def __init__(self, flat: dict[str, list[torch.Tensor]], w: torch.Tensor) -> None:
        super().__init__(flat)
        self.w = w

    def add_layer(self, lg: LayerGrads, names: dict[str, str]) -> None:
        for a, v in lg.weighted_sum(self.w).items():
            self._add(names[a], (v,))

    def add_materialized(self, rows: slice, grads: dict[str, torch.Tensor]) -> None:
        for n, g in grads.items():
            self._add(n, (g.T @ self.w[rows],))


def _start(model: nn.Module, x: Any) -> tuple[Any, torch.dtype, torch.device]:
    check_eval_mode(model)
    x = prepare_input(model, x)
    dtype, device = model_dtype_device(model)
    return x, dtype, device


# ---------------------------------------------------------------------------------------------- public API
def per_sample_grad_sqnorms(model: nn.Module, x: torch.Tensor, loss_fn: Loss, *, params: Any = "all",
                            return_output: bool = False) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Squared L2 norm of each sample's gradient of ``loss_fn(model(x))_i`` w.r.t. the selected parameters.

    One forward and one backward for the whole batch. Returns ``(B,)`` (in the model's dtype), and with
    ``return_output=True`` also the (detached) model output of the same forward pass.
    """
    x, dtype, device = _start(model, x)
    names = resolve_params(model, params, x)
    red = _SqNorms(batch_size(x), dtype, device)
    out = run_pass(model, x, loss_fn, names, red)
    return (red.total, out) if return_output else red.total


def per_sample_grad_projections(model: nn.Module, x: torch.Tensor, loss_fn: Loss,
                                basis: GradBasis | Mapping[str, torch.Tensor], *, center: Tensors | None = None,
                                scale: Tensors | None = None, return_output: bool = False
                                ) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Projections ``((g_i - mu) * I2) . v_k`` of each sample's gradient onto the basis' K directions, ``(B, K)``.

    The parameters are those the basis covers. ``center`` (mu) and ``scale`` (I2) are element-wise
    ``{name: param.shape}`` and optional (or carried by the basis). Computed per layer from activations and
    output gradients; no ``B x P`` matrix is formed.
    """
    if not isinstance(basis, GradBasis):
        basis = GradBasis(basis)
    x, dtype, device = _start(model, x)
    basis.check_model(model)
    dirs, offset = basis.folded(dtype, device, center, scale)
    red = _Projections(batch_size(x), dirs, offset)
    out = run_pass(model, x, loss_fn, [n for n, _ in model.named_parameters() if n in dirs], red)
    return (red.total, out) if return_output else red.total


@dataclass
class GradMoments:
    """Running first and second moments of per-sample gradients: ``count``, ``sum`` and ``sumsq`` per parameter.

    Sums merge across batches and shards (:meth:`merge`); :meth:`mean` and :meth:`var` give mu and sigma^2
    (element-wise), :meth:`inverse_std` Wu et al.'s NFK scale ``I2 = 1/sigma``.
    """

    count: int = 0
    sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self) -> dict[str, torch.Tensor]:
        self._check()
        return {n: s / self.count for n, s in self.sum.items()}

    def var(self, ddof: int = 0) -> dict[str, torch.Tensor]:
        """Element-wise variance ``(sumsq - sum^2/n) / (n - ddof)``, clamped at 0 against rounding."""
        self._check()
        if self.count - ddof <= 0:
            raise InputError(f"variance with ddof={ddof} needs more than {ddof} samples, got {self.count}.")
        return {n: ((self.sumsq[n] - s * s / self.count) / (self.count - ddof)).clamp_min(0)
                for n, s in self.sum.items()}

    def inverse_std(self, ddof: int = 0) -> dict[str, torch.Tensor]:
        """``1 / sqrt(var)``, with infinite entries (zero-variance parameters) set to the largest finite value
        over all parameters, as in Wu et al.'s code."""
        inv = {n: v.rsqrt() for n, v in self.var(ddof).items()}
        finite = [v[torch.isfinite(v)] for v in inv.values()]
        top = max((float(f.max()) for f in finite if f.numel()), default=1.0)
        return {n: torch.where(torch.isfinite(v), v, torch.full_like(v, top)) for n, v in inv.items()}

    def merge(self, other: "GradMoments") -> "GradMoments":
        """Add another accumulator's sums into this one (e.g. from another data shard); returns self."""
        if not other.count:
            return self
        if self.count and set(self.sum) != set(other.sum):
            raise ConfigError("cannot merge moments of different parameter sets.")
        for n in other.sum:
            if n in self.sum:
                self.sum[n] += other.sum[n].to(self.sum[n])
                self.sumsq[n] += other.sumsq[n].to(self.sumsq[n])
            else:
                self.sum[n], self.sumsq[n] = other.sum[n].clone(), other.sumsq[n].clone()
        self.count += other.count
        return self

    def _check(self) -> None:
        if self.count == 0:
            raise InputError("no samples were accumulated into these gradient moments.")


def _batches(data: Any) -> Iterable[Any]:
    if isinstance(data, (torch.Tensor, Mapping)):  # one batch: a tensor or a dict of tensors
        yield data
        return
    for b in data:
        yield b[0] if isinstance(b, (tuple, list)) else b


def _accumulators(model: nn.Module, names: Sequence[str], into: dict[str, torch.Tensor] | None, shape_tail: tuple,
                  dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    out = {} if into is None else into
    for n in names:
        want = tuple(named[n].shape) + shape_tail
        if n not in out:
            out[n] = torch.zeros(want, dtype=dtype, device=device)
        elif tuple(out[n].shape) != want or not out[n].is_contiguous():
            raise ConfigError(f"accumulator {n!r} must be a contiguous tensor of shape {want}; got "
                              f"{tuple(out[n].shape)}.")
    return out


def grad_moments(model: nn.Module, data: Any, loss_fn: Loss, *, params: Any = "all",
                 into: GradMoments | None = None, dtype: torch.dtype = torch.float64) -> GradMoments:
    """Accumulate ``sum_i g_i`` and ``sum_i g_i**2`` (element-wise) of per-sample gradients.

    ``data``: one batch tensor, or an iterable of batches (tensors or ``(x, y, ...)`` tuples). One backward
    per batch. Pass ``into=`` a previous result to keep accumulating; sums are kept in ``dtype`` (float64 by
    default, so that ``var = E[g^2] - mu^2`` keeps its digits over many samples).
    """
    mom = into if into is not None else GradMoments()
    for xb in _batches(data):
        x, _, device = _start(model, xb)
        names = resolve_params(model, params, x)
        acc_dtype = next(iter(mom.sum.values())).dtype if mom.sum else dtype
        _accumulators(model, names, mom.sum, (), acc_dtype, device)
        _accumulators(model, names, mom.sumsq, (), acc_dtype, device)
        flat = {n: [mom.sum[n].view(-1), mom.sumsq[n].view(-1)] for n in names}
        run_pass(model, x, loss_fn, names, _Moments(flat))
        mom.count += batch_size(x)
    return mom


def weighted_grad_sums(model: nn.Module, x: torch.Tensor, loss_fn: Loss, weights: torch.Tensor, *,
                       params: Any = "all", into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``sum_i weights[i, k] g_i`` per parameter, as ``{name: (*param.shape, K)}``.

    With ``weights`` a block ``U`` this is ``Z^T U`` for randomised SVD / block power iteration; with one-hot
    labels it gives per-class gradient sums. ``into`` (a previous result) accumulates across batches.
    """
    x, dtype, device = _start(model, x)
    B = batch_size(x)
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or weights.shape[0] != B:
        raise InputError(f"weights must be a B x K tensor with B = {B} samples; got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}.")
    names = resolve_params(model, params, x)
    K = weights.shape[1]
    acc_dtype = dtype if not into else next(iter(into.values())).dtype
    out = _accumulators(model, names, into, (K,), acc_dtype, device)
    flat = {n: [out[n].view(-1, K)] for n in names}
    run_pass(model, x, loss_fn, names, _WeightedSums(flat, weights.to(device=device, dtype=dtype)))
    return out


# ---------------------------------------------------------------------------------------------- inputs
def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: Loss, *, return_output: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """``d sum_i loss_i / d x`` for a whole batch: row i is sample i's own input gradient (eval mode)."""
    x, _, _ = _start(model, x)
    if isinstance(x, dict):
        raise InputError("input gradients need one floating-point input tensor; for token inputs pass the "
                         "embeddings (e.g. {'inputs_embeds': ...}) through a model that takes them positionally.")
    if not x.is_floating_point():
        raise InputError(f"input gradients need floating-point inputs, got {x.dtype}.")
    xg = x.requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        losses = check_losses(loss_fn(out), x.shape[0])
        (g,) = torch.autograd.grad(losses.sum(), xg)
    out = out.detach() if isinstance(out, torch.Tensor) else out
    return (g, out) if return_output else g


def input_step_scale(input_std: Any, x: torch.Tensor) -> torch.Tensor | float:
    """``1 / std`` broadcastable to ``x`` on the channel dimension 1 (1.0 when ``input_std`` is None).

    Same convention as :func:`gradood.probe.input_step_scale`, for callers without a probe.
    """
    if input_std is None:
        return 1.0
    s = torch.as_tensor(input_std, dtype=x.dtype, device=x.device).flatten()
    if not bool((s > 0).all()):
        raise ConfigError(f"input_std must be positive, got {input_std!r}.")
    if s.numel() == 1:
        return 1.0 / s.reshape(())
    if x.ndim < 2 or x.shape[1] != s.numel():
        raise InputError(f"input_std has {s.numel()} channels but inputs have shape {tuple(x.shape)}.")
    return (1.0 / s).reshape(1, -1, *([1] * (x.ndim - 2)))


def perturb_input(x: torch.Tensor, grad: torch.Tensor, eps: float, *, input_std: Any = None,
                  direction: float = -1) -> torch.Tensor:
    """``x + direction * eps * sign(grad) / std`` (ODIN's step; eps in [0, 1]-pixel units, std per channel).

    ``direction=-1`` (default) descends the loss whose gradient is ``grad``: with ``grad`` the input gradient
    of the predicted-label cross-entropy this raises the max softmax, as ODIN and GRODIN do.
    """
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"eps must be a number, got {eps!r}.") from None
    if not (e >= 0 and math.isfinite(e)):
        raise ConfigError(f"eps must be >= 0 and finite (a step in [0, 1]-pixel units), got {eps!r}.")
    if direction not in (-1, 1):
        raise ConfigError(f"direction must be -1 (descend the loss) or +1 (ascend it), got {direction!r}.")
    if grad.shape != x.shape:
        raise InputError(f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}.")
    if e == 0:
        return x.detach()
    return (x + (direction * e) * torch.sign(grad) * input_step_scale(input_std, x)).detach()
