"""One batched forward and backward pass with per-layer bookkeeping.

Forward hooks on every layer that owns a selected parameter keep the layer's input and route its output
through :class:`_Tap`, an identity in the autograd graph. Backward is driven towards a dummy scalar
``anchor`` that every tap takes as an extra input, so autograd computes exactly the gradients w.r.t. layer
outputs that lead to a tap, never weight gradients (no ``.grad`` is touched), and it runs no layer that
precedes the first tap. Each tap's backward hands the output gradient to its layer as soon as autograd
produces it; the layer reduces ``(input, output gradient)`` at once (see :mod:`._layers`) and both are
released, so memory peaks like a training step's.

Layers without a fast rule (or whose parameter is shared between modules) are computed afterwards with
``torch.func`` (``functional_call`` + ``vmap(grad)``) for their parameters only, with a
:class:`FallbackWarning` naming them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ConfigError, InputError, ModelError
from ._layers import LayerGrads, handler_for, row_chunks

Loss = Callable[[Any], torch.Tensor]


class FallbackWarning(UserWarning):
    """Some parameters' per-sample gradients use the slower ``torch.func`` path (named in the message)."""


class Reducer(Protocol):
    """What the pass feeds per-sample gradient information into."""

    def add_layer(self, lg: LayerGrads, names: dict[str, str]) -> None: ...

    def add_materialized(self, rows: slice, grads: dict[str, torch.Tensor]) -> None: ...


# ---------------------------------------------------------------------------------------------- checks
def check_eval_mode(model: nn.Module) -> None:
    """Per-sample gradients need every module in eval mode and no batch statistics."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"per-sample gradients need a torch.nn.Module, got {type(model).__name__}.")
    modules = list(model.named_modules())
    training = [n or type(model).__name__ for n, m in modules if m.training]
    if training:
        raise ModelError(
            f"the model is in training mode ({len(training)} modules, e.g. {training[:3]}). In training mode "
            "BatchNorm normalises with statistics of the whole batch, so one sample's gradient depends on the "
            "other samples, and Dropout makes it random. Call model.eval() before computing per-sample gradients."
        )
    for n, m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ModelError(
                f"BatchNorm layer {n!r} has no running statistics (track_running_stats=False), so even in eval "
                "mode it normalises with batch statistics and one sample's gradient depends on the others. "
                "Per-sample gradients are undefined for it; use a model with running statistics."
            )


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def prepare_input(model: nn.Module, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"inputs must be a non-empty batch (first dimension = samples), got shape {tuple(x.shape)}.")
    dtype, device = model_dtype_device(model)
    x = x.to(device)
    if x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    if x.is_inference():
        x = x.clone()  # tensors made under inference_mode cannot enter an autograd graph
    return x.detach()


def check_losses(losses: Any, B: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ConfigError(
            f"loss_fn must map the model output to one loss per sample, a tensor of shape ({B},); got {shape}. "
            "Use reduction='none' (e.g. F.cross_entropy(out, y, reduction='none'))."
        )
    return losses


# ---------------------------------------------------------------------------------------------- selection
def _direct_params(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Canonical parameter name -> (module name, module, attribute), for every parameter of the model."""
    owner: dict[int, tuple[str, nn.Module, str]] = {}
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None and id(p) not in owner:
                owner[id(p)] = (mname, m, attr)
    return {n: owner[id(p)] for n, p in model.named_parameters()}


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters registered in more than one module (tied weights): their gradient sums over layers."""
    holders: dict[int, set[int]] = {}
    for m in model.modules():  # distinct module instances; one module called twice is not sharing
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(m))
    return {pid for pid, ms in holders.items() if len(ms) > 1}


def forward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of modules that own parameters with requires_grad, in the order the forward pass first calls them."""
    owners = {mname for mname, _, _ in (_direct_params(model)[n] for n, p in model.named_parameters()
                                         if p.requires_grad)}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_a, n=n: order.append(n) if n not in order else None)
               for n, m in model.named_modules() if n in owners]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def resolve_params(model: nn.Module, params: Any, x: torch.Tensor | None = None) -> list[str]:
    """Canonical names of the selected parameters, in ``model.named_parameters()`` order.

    ``"all"``: every parameter with ``requires_grad``; an int k: every such parameter of the last k layers
    (modules owning parameters) in forward order (needs ``x``; one sample is run); a list of names.
    """
    named = dict(model.named_parameters())
    if isinstance(params, str):
        if params != "all":
            raise ConfigError(f"params must be 'all', an int k (last k layers) or a list of parameter names; "
                              f"got {params!r}.")
        names = [n for n, p in named.items() if p.requires_grad]
    elif isinstance(params, bool) or (not isinstance(params, int) and not isinstance(params, (list, tuple))):
        raise ConfigError(f"params must be 'all', an int k (last k layers) or a list of parameter names; "
                          f"got {params!r}.")
    elif isinstance(params, int):
        if x is None:
            raise ConfigError("params=<int> (last k layers) needs an example input to find the forward order.")
        order = forward_order(model, x)
        if not 1 <= params <= len(order):
            raise ConfigError(f"params={params}: the model has {len(order)} layers with trainable parameters "
                              f"reached in its forward pass; k must be in 1..{len(order)}.")
        last = set(order[-params:])
        owners = _direct_params(model)
        names = [n for n, p in named.items() if p.requires_grad and owners[n][0] in last]
    else:
        aliases = {n: n for n in named}
        canonical = {id(p): n for n, p in named.items()}
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(n, canonical[id(p)])
        unknown = [n for n in params if not isinstance(n, str) or n not in aliases]
        if unknown:
            raise ConfigError(f"unknown parameter names {unknown[:5]}; the model's parameters are e.g. "
                              f"{list(named)[:6]} (see model.named_parameters()).")
        wanted = {aliases[n] for n in params}
        names = [n for n in named if n in wanted]
    if not names:
        raise ConfigError("no parameters selected (none has requires_grad=True?); pass params=[names] explicitly.")
    return names


# ---------------------------------------------------------------------------------------------- the pass
class _Tap(torch.autograd.Function):
    """Identity on a layer output whose backward hands the output gradient to the layer's site."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, anchor: torch.Tensor, site: "_Site", index: int) -> torch.Tensor:
        ctx.site, ctx.index = site, index
        # A detached alias (not a view) so that in-place ops after the layer (ReLU(inplace=True)) stay legal.
        return out.detach()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        ctx.site.receive(ctx.index, g)
        return g, None, None, None


@dataclass
class _Site:
    """One layer with selected parameters: its calls' inputs until their output gradients arrive."""

    name: str
    module: nn.Module
    handler: type[LayerGrads]
    names: dict[str, str]  # attribute -> canonical parameter name
    batch_size: int
    reducer: Reducer
    anchor: torch.Tensor
    calls: list[list[Any]] = field(default_factory=list)  # [input, output gradient or None, input version]
    received: int = 0
    disabled: str | None = None

    def forward_hook(self, _m: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if self.disabled:
            return None
        a = inputs[0] if inputs else None
        B = self.batch_size
        if not (isinstance(a, torch.Tensor) and isinstance(output, torch.Tensor) and a.ndim >= 1
                and output.ndim >= 1 and a.shape[0] == B and output.shape[0] == B):
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            self.disabled = (f"its first positional input / output is not a tensor with the batch ({B} samples) "
                             f"in dimension 0 (input: {shape})")
            self.calls.clear()
            return None
        self.calls.append([a.detach(), None, a._version])
        return _Tap.apply(output, self.anchor, self, len(self.calls) - 1)

    def receive(self, index: int, g: torch.Tensor) -> None:
        if self.disabled:
            return
        self.calls[index][1] = g
        self.received += 1
        if self.received == len(self.calls):
            self.flush()

    def flush(self) -> None:
        """Reduce the calls whose output gradient arrived (outputs that do not reach the loss add nothing)."""
        calls = [(a, g) for a, g, _ in self.calls if g is not None]
        for a, _, version in self.calls:
            if a._version != version:
                raise ModelError(
                    f"the input of layer {self.name!r} was modified in place after the layer used it, so its "
                    "per-sample gradients cannot be formed from it. Avoid in-place ops on that tensor "
                    "(e.g. ReLU(inplace=True) applied to a layer's input after the layer ran)."
                )
        self.calls.clear()
        if calls:
            self.reducer.add_layer(self.handler(self.module, list(self.names), calls, self.batch_size), self.names)


def plan_sites(model: nn.Module, names: Sequence[str], owners: dict[str, tuple[str, nn.Module, str]]
               ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split the selected parameters into fast-path layers (module name -> {attr: param name}) and the
    torch.func fallback (param name -> reason)."""
    shared = _shared_params(model)
    named = dict(model.named_parameters())
    native: dict[str, dict[str, str]] = {}
    fallback: dict[str, str] = {}
    for n in names:
        mname, m, attr = owners[n]
        cls = handler_for(m)
        if id(named[n]) in shared:
            fallback[n] = "the parameter is shared between several modules"
        elif cls is None:
            fallback[n] = f"no per-sample rule for {type(m).__name__}"
        elif attr not in cls.attrs_supported:
            fallback[n] = f"no per-sample rule for {type(m).__name__}.{attr}"
        elif (reason := cls.unsupported_reason(m)) is not None:
            fallback[n] = f"{type(m).__name__}: {reason}"
        else:
            native.setdefault(mname, {})[attr] = n
    return native, fallback


def warn_fallback(fallback: dict[str, str], owners: dict[str, tuple[str, nn.Module, str]]) -> None:
    by_layer: dict[str, list[str]] = {}
    for n, reason in fallback.items():
        by_layer.setdefault(f"{owners[n][0] or '<model>'} ({reason})", []).append(n)
    desc = "; ".join(f"layer {k}: {v}" for k, v in by_layer.items())
    warnings.warn(
        f"gradood.grads: using the slower torch.func per-sample path (vmap over samples, memory ~ samples x "
        f"parameters) for {desc}.", FallbackWarning, stacklevel=4)


def run_pass(model: nn.Module, x: torch.Tensor, loss_fn: Loss, names: Sequence[str], reducer: Reducer) -> Any:
    """One forward and one backward feeding ``reducer``; fallback parameters afterwards. Returns the output."""
    B = x.shape[0]
    owners = _direct_params(model)
    native, fallback = plan_sites(model, names, owners)
    if fallback:
        warn_fallback(fallback, owners)
    dtype, _ = model_dtype_device(model)
    anchor = torch.zeros((), dtype=dtype, device=x.device, requires_grad=True)
    sites = []
    for mname, attrs in native.items():
        module = owners[next(iter(attrs.values()))][1]
        sites.append(_Site(mname, module, handler_for(module), attrs, B, reducer, anchor))  # type: ignore[arg-type]
    handles = [s.module.register_forward_hook(s.forward_hook) for s in sites]
    try:
        with torch.enable_grad():
            out = model(x)
            losses = check_losses(loss_fn(out), B)
            if losses.requires_grad and any(s.calls for s in sites):
                torch.autograd.grad(losses.sum(), [anchor], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    late = {}
    for s in sites:
        if s.disabled:
            late.update({n: s.disabled for n in s.names.values()})
        else:
            s.flush()
    if late:
        warn_fallback(late, owners)
        fallback.update(late)
    if fallback:
        for rows, grads in func_per_sample_grads(model, x, loss_fn, list(fallback)):
            reducer.add_materialized(rows, grads)
    return out.detach() if isinstance(out, torch.Tensor) else out


# ---------------------------------------------------------------------------------------------- torch.func
def func_per_sample_grads(model: nn.Module, x: torch.Tensor, loss_fn: Loss, names: Sequence[str],
                          budget: int | None = None) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Per-sample gradients of the named parameters by ``functional_call`` + ``vmap(grad)``, in chunks of
    samples: yields ``(rows, {name: (rows, P)})``."""
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    selected = {n: named[n].detach() for n in names}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **p}, buffers), (xi.unsqueeze(0),))
        return check_losses(loss_fn(out), 1)[0]

    per_sample = vmap(grad(loss_one), in_dims=(None, 0))
    P = sum(p.numel() for p in selected.values())
    for rows in row_chunks(x.shape[0], P, budget):
        with torch.enable_grad():
            gs = per_sample(selected, x[rows])
        yield rows, {n: g.detach().reshape(g.shape[0], -1) for n, g in gs.items()}
