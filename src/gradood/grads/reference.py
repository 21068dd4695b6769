"""Reference per-sample gradients: the plain, obviously correct ways.

* ``torch.func``: ``functional_call`` + ``vmap(grad)`` gives every sample's full gradient (memory: samples x
  parameters). The tests prove the fast engine equal to it.
* A Python loop with one forward and one backward per sample, the way the official GradNorm / GRODIN code
  works (batch size 1). The benchmark times it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._capture import (Loss, batch_size, call_model, check_eval_mode, check_losses, func_per_sample_grads,
                       prepare_input, resolve_params, take_rows)
from .basis import GradBasis, Tensors


def per_sample_grads(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any = "all") -> dict[str, torch.Tensor]:
    """Every sample's gradient of its loss, ``{name: (B, *param.shape)}``, by ``vmap(grad)`` over the batch."""
    check_eval_mode(model)
    x = prepare_input(model, x)
    names = resolve_params(model, params, x)
    named = dict(model.named_parameters())
    [(rows, grads)] = list(func_per_sample_grads(model, x, loss_fn, names, budget=1 << 62))
    return {n: grads[n].reshape(batch_size(x), *named[n].shape) for n in names}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)


def sqnorms(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any = "all") -> torch.Tensor:
    g = _flat(per_sample_grads(model, x, loss_fn, params))
    return (g * g).sum(1)


def projections(model: nn.Module, x: torch.Tensor, loss_fn: Loss, basis: GradBasis,
                center: Tensors | None = None, scale: Tensors | None = None) -> torch.Tensor:
    """``((g_i - mu) * I2) . V`` formed literally from the full per-sample gradients."""
    names = basis.names
    grads = per_sample_grads(model, x, loss_fn, names)
    mu = center if center is not None else basis.center
    i2 = scale if scale is not None else basis.scale
    out = 0
    for n in names:
        g = grads[n]
        if mu is not None:
            g = g - mu[n].to(g)
        if i2 is not None:
            g = g * i2[n].to(g)
        out = out + g.reshape(g.shape[0], -1) @ basis.directions[n].to(g).reshape(-1, basis.k)
    return out  # type: ignore[return-value]


def moments(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any = "all"
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    grads = per_sample_grads(model, x, loss_fn, params)
    return {n: g.sum(0) for n, g in grads.items()}, {n: (g * g).sum(0) for n, g in grads.items()}


def weighted_sums(model: nn.Module, x: torch.Tensor, loss_fn: Loss, weights: torch.Tensor,
                  params: Any = "all") -> dict[str, torch.Tensor]:
    grads = per_sample_grads(model, x, loss_fn, params)
    return {n: torch.einsum("b...,bk->...k", g, weights.to(g)) for n, g in grads.items()}


def loop_sqnorms(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any = "all") -> torch.Tensor:
    """One forward + backward per sample (batch size 1), summing squared parameter gradients."""
    check_eval_mode(model)
    x = prepare_input(model, x)
    names = set(resolve_params(model, params, x))
    ps = [p for n, p in model.named_parameters() if n in names]
    out = torch.empty(batch_size(x), dtype=ps[0].dtype, device=ps[0].device)
    with torch.enable_grad():
        for i in range(batch_size(x)):
            loss = check_losses(loss_fn(call_model(model, take_rows(x, slice(i, i + 1)))), 1)[0]
            gs = torch.autograd.grad(loss, ps, allow_unused=True)
            out[i] = sum((g * g).sum() for g in gs if g is not None)
    return out


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: Loss) -> torch.Tensor:
    """Sample by sample input gradients."""
    check_eval_mode(model)
    x = prepare_input(model, x)
    rows = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(check_losses(loss_fn(model(xi)), 1)[0], xi)
            rows.append(g)
    return torch.cat(rows)
