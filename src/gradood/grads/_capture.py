"""One batched forward and backward pass with per-layer bookkeeping.

Forward hooks on every layer that owns a selected parameter keep the layer's input and route its output
through :class:`_Tap`, an identity in the autograd graph. Backward is driven towards a dummy scalar
``anchor`` that every tap takes as an extra input, so autograd computes exactly the gradients w.r.t. layer
outputs that lead to a tap, never weight gradients (no ``.grad`` is touched), and it runs no layer that
precedes the first tap. Each tap's backward hands the output gradient to its layer as soon as autograd
produces it; the layer reduces ``(input, output gradient)`` at once (see :mod:`._layers`) and both are
released, so memory peaks like a training step's.

Tied parameters (one parameter registered in several layers) sum the layers' per-sample gradients before
reducing. Layers without a fast rule are computed afterwards with ``torch.func`` (``functional_call`` +
``vmap(grad)``; one backward per sample for models that cannot be vmapped) for their parameters only, with a
:class:`FallbackWarning` naming them.

Inputs are a batch tensor (``model(x)``) or a dict of equal-length tensors such as a tokenizer's
``BatchEncoding`` (``model(**x)``). Padding needs nothing special: with the attention mask, padded
positions receive exactly zero output gradient, so they add nothing to any layer's per-sample gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

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


Inputs = Any  # a batch tensor, or a dict of tensors (HF tokenizer output) passed as keyword arguments


def _prepare_tensor(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if t.is_inference():
        t = t.clone()  # tensors made under inference_mode cannot enter an autograd graph
    return t.detach()


def prepare_input(model: nn.Module, x: Any) -> Inputs:
    """A batch on the model's device (floats in its dtype): a tensor (called as ``model(x)``) or a mapping of
    equal-length tensors such as a tokenizer's ``BatchEncoding`` (called as ``model(**x)``)."""
    dtype, device = model_dtype_device(model)
    if isinstance(x, Mapping):
        if not x:
            raise InputError("a dict input must hold at least one tensor (e.g. input_ids).")
        n = None
        out = {}
        for k, v in x.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0:
                got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise InputError(f"dict input {k!r} must be a tensor with samples in dimension 0, got {got} "
                                 "(tokenize with return_tensors='pt').")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise InputError(f"dict inputs must hold the same number of samples; {k!r} has {v.shape[0]}, "
                                 f"the first entry {n}.")
            out[str(k)] = _prepare_tensor(v, dtype, device)
        if n == 0:
            raise InputError("inputs must be a non-empty batch, got 0 samples.")
        return out
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor or a dict of tensors, got {type(x).__name__}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"inputs must be a non-empty batch (first dimension = samples), got shape {tuple(x.shape)}.")
    return _prepare_tensor(x, dtype, device)


def batch_size(x: Inputs) -> int:
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def take_rows(x: Inputs, rows: slice) -> Inputs:
    return {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]


def call_model(model: nn.Module, x: Inputs) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


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


def _holders(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """Canonical parameter name -> every (module name, module, attribute) registering it. More than one
    distinct module means tied weights: the parameter's gradient is the sum of the holders' gradients (one
    module called twice is not sharing; its calls add up inside its own rule)."""
    by_id: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules():  # distinct module instances
        for attr, p in m._parameters.items():
            if p is not None:
                by_id.setdefault(id(p), []).append((mname, m, attr))
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def forward_order(model: nn.Module, x: Inputs) -> list[str]:
    """Names of modules that own parameters with requires_grad, in the order the forward pass first calls them."""
    owners = {mname for mname, _, _ in (_direct_params(model)[n] for n, p in model.named_parameters()
                                         if p.requires_grad)}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_a, n=n: order.append(n) if n not in order else None)
               for n, m in model.named_modules() if n in owners]
    try:
        with torch.no_grad():
            call_model(model, take_rows(x, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return order


def resolve_params(model: nn.Module, params: Any, x: Inputs | None = None) -> list[str]:
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


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The layer's input: its first positional argument, or its first keyword argument (HF layers are
    sometimes called as ``layer(input_ids=...)``)."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


@dataclass
class _Site:
    """One layer with selected parameters: its calls' inputs until their output gradients arrive.

    ``shared`` holds the attributes whose parameter is tied to another layer: their per-sample gradients
    add up over layers before any square is taken, so they go to ``deferred`` instead of the reducer.
    """

    name: str
    module: nn.Module
    handler: type[LayerGrads]
    names: dict[str, str]  # attribute -> canonical parameter name
    shared: frozenset[str]
    batch_size: int
    reducer: Reducer
    anchor: torch.Tensor
    deferred: dict[str, list[tuple[LayerGrads, str]]]
    calls: list[list[Any]] = field(default_factory=list)  # [input, output gradient or None, input version]
    received: int = 0
    disabled: str | None = None

    def forward_hook(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.disabled:
            return None
        a = _first_input(args, kwargs)
        B = self.batch_size
        if not (isinstance(a, torch.Tensor) and isinstance(output, torch.Tensor) and a.ndim >= 1
                and output.ndim >= 1):
            return self._disable(f"its input / output is not a tensor (input: {type(a).__name__})")
        if B > 1 and a.shape[0] == 1 and output.shape[0] == 1 and self.handler.broadcasts:
            # One row shared by the whole batch (HF position ids are (1, T)): its output is broadcast against
            # the batch downstream. Broadcasting it here instead gives each sample its own output gradient.
            a = a.expand(B, *a.shape[1:])
            output = output.expand(B, *output.shape[1:])
        if a.shape[0] != B or output.shape[0] != B:
            return self._disable(f"its input / output does not have the batch ({B} samples) in dimension 0 "
                                 f"(input: {tuple(a.shape)}, output: {tuple(output.shape)})")
        if (reason := self.handler.unsupported_call(self.module, a, output)) is not None:
            return self._disable(reason)
        self.calls.append([a.detach(), None, a._version])
        return _Tap.apply(output, self.anchor, self, len(self.calls) - 1)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self.calls.clear()
        return None

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
        if not calls:
            return
        own = {a: n for a, n in self.names.items() if a not in self.shared}
        if own:
            self.reducer.add_layer(self.handler(self.module, list(own), calls, self.batch_size), own)
        if self.shared:
            lg = self.handler(self.module, sorted(self.shared), calls, self.batch_size)
            for attr in self.shared:
                self.deferred.setdefault(self.names[attr], []).append((lg, attr))


def plan_sites(model: nn.Module, names: Sequence[str], holders: dict[str, list[tuple[str, nn.Module, str]]]
               ) -> tuple[dict[str, dict[str, str]], set[str], dict[str, str]]:
    """Split the selected parameters into fast-path layers (module name -> {attr: param name}), the tied ones
    among them (param names) and the torch.func fallback (param name -> reason)."""
    native: dict[str, dict[str, str]] = {}
    tied: set[str] = set()
    fallback: dict[str, str] = {}
    for n in names:
        reasons = []
        for _, m, attr in holders[n]:
            cls = handler_for(m)
            if cls is None:
                reasons.append(f"no per-sample rule for {type(m).__name__}")
            elif attr not in cls.attrs_supported:
                reasons.append(f"no per-sample rule for {type(m).__name__}.{attr}")
            elif (reason := cls.unsupported_reason(m)) is not None:
                reasons.append(f"{type(m).__name__}: {reason}")
        if reasons:
            fallback[n] = "; ".join(dict.fromkeys(reasons))
            continue
        for mname, _, attr in holders[n]:
            native.setdefault(mname, {})[attr] = n
        if len(holders[n]) > 1:
            tied.add(n)
    return native, tied, fallback


def warn_fallback(fallback: dict[str, str], holders: dict[str, list[tuple[str, nn.Module, str]]]) -> None:
    by_layer: dict[str, list[str]] = {}
    for n, reason in fallback.items():
        by_layer.setdefault(f"{holders[n][0][0] or '<model>'} ({reason})", []).append(n)
    desc = "; ".join(f"layer {k}: {v}" for k, v in by_layer.items())
    warnings.warn(
        f"gradood.grads: using the slower torch.func per-sample path (vmap over samples, memory ~ samples x "
        f"parameters) for {desc}.", FallbackWarning, stacklevel=4)


def _reduce_tied(deferred: dict[str, list[tuple[LayerGrads, str]]], B: int, reducer: Reducer) -> None:
    """A tied parameter's per-sample gradient is the sum over the layers holding it: materialised per chunk of
    samples (sum of each layer's rule), then reduced like any materialised gradient."""
    for name, parts in deferred.items():
        P = parts[0][0].numel(parts[0][1])
        for rows in row_chunks(B, P):
            total = None
            for lg, attr in parts:
                m = lg.materialize_param(attr, rows)
                total = m if total is None else total + m
            reducer.add_materialized(rows, {name: total})


def run_pass(model: nn.Module, x: Inputs, loss_fn: Loss, names: Sequence[str], reducer: Reducer) -> Any:
    """One forward and one backward feeding ``reducer``; fallback parameters afterwards. Returns the output."""
    B = batch_size(x)
    holders = _holders(model)
    native, tied, fallback = plan_sites(model, names, holders)
    if fallback:
        warn_fallback(fallback, holders)
    dtype, device = model_dtype_device(model)
    anchor = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
    modules = dict(model.named_modules())
    deferred: dict[str, list[tuple[LayerGrads, str]]] = {}
    sites = []
    for mname, attrs in native.items():
        module = modules[mname]
        shared = frozenset(a for a, n in attrs.items() if n in tied)
        sites.append(_Site(mname, module, handler_for(module), attrs, shared, B, reducer, anchor,  # type: ignore[arg-type]
                           deferred))
    handles = [s.module.register_forward_hook(s.forward_hook, with_kwargs=True) for s in sites]
    try:
        with torch.enable_grad():
            out = call_model(model, x)
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
        warn_fallback(late, holders)
        fallback.update(late)
    _reduce_tied({n: parts for n, parts in deferred.items() if n not in fallback}, B, reducer)
    if fallback:
        for rows, grads in func_per_sample_grads(model, x, loss_fn, list(fallback)):
            reducer.add_materialized(rows, grads)
    return out.detach() if isinstance(out, torch.Tensor) else out


# ---------------------------------------------------------------------------------------------- torch.func
def func_per_sample_grads(model: nn.Module, x: Inputs, loss_fn: Loss, names: Sequence[str],
                          budget: int | None = None) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Per-sample gradients of the named parameters by ``functional_call`` + ``vmap(grad)``, in chunks of
    samples: yields ``(rows, {name: (rows, P)})``.

    Models whose forward branches on tensor values (HuggingFace attention inspects the attention mask)
    cannot be vmapped; they get one backward per sample instead, with a :class:`FallbackWarning`.
    """
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    selected = {n: named[n].detach() for n in names}

    def loss_one(p: dict[str, torch.Tensor], xi: Inputs) -> torch.Tensor:
        xb = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else (xi.unsqueeze(0),)
        args, kwargs = ((), xb) if isinstance(xb, dict) else (xb, None)
        out = functional_call(model, ({**fixed, **p}, buffers), args, kwargs)
        return check_losses(loss_fn(out), 1)[0]

    per_sample = vmap(grad(loss_one), in_dims=(None, 0))
    P = sum(p.numel() for p in selected.values())
    looping = False
    for rows in row_chunks(batch_size(x), P, budget):
        if not looping:
            try:
                with torch.enable_grad():
                    gs = per_sample(selected, take_rows(x, rows))
            except RuntimeError as e:
                if "vmap" not in str(e):
                    raise
                looping = True
                warnings.warn(f"gradood.grads: torch.func cannot vmap this model ({str(e).splitlines()[0][:120]}"
                              "...); computing the fallback parameters' gradients one sample at a time.",
                              FallbackWarning, stacklevel=4)
        if looping:
            gs = loop_per_sample_grads(model, take_rows(x, rows), loss_fn, names)
        yield rows, {n: g.detach().reshape(g.shape[0], -1) for n, g in gs.items()}


def loop_per_sample_grads(model: nn.Module, x: Inputs, loss_fn: Loss, names: Sequence[str]
                          ) -> dict[str, torch.Tensor]:
    """Per-sample gradients by one forward + backward per sample (batch size 1): ``{name: (B, *shape)}``."""
    named = dict(model.named_parameters())
    ps = [named[n] for n in names]
    rows: list[list[torch.Tensor]] = []
    with torch.enable_grad():
        for i in range(batch_size(x)):
            loss = check_losses(loss_fn(call_model(model, take_rows(x, slice(i, i + 1)))), 1)[0]
            gs = torch.autograd.grad(loss, ps, allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}
