"""The three full-network per-sample gradient operations low-dimensional gradients need (adapter onto
:mod:`gradood.grads`): sums and element-wise square sums, weighted sums, and projections."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Loss = Callable[[torch.Tensor], torch.Tensor]


def _selected(model: nn.Module, params: Any) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params == "all":
        return named
    return {n: named[n] for n in params}


def _per_sample(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any) -> dict[str, torch.Tensor]:
    sel = _selected(model, params)
    rest = {n: p for n, p in model.named_parameters() if n not in sel}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict, xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**p, **rest}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out).sum()

    return vmap(grad(loss_one), in_dims=(None, 0))({n: p.detach() for n, p in sel.items()}, x)


def sum_and_sqsum(model: nn.Module, x: torch.Tensor, loss_fn: Loss, params: Any):
    g = _per_sample(model, x, loss_fn, params)
    return {n: v.sum(0) for n, v in g.items()}, {n: v.pow(2).sum(0) for n, v in g.items()}


def weighted_sums(model: nn.Module, x: torch.Tensor, loss_fn: Loss, weights: torch.Tensor, params: Any):
    g = _per_sample(model, x, loss_fn, params)
    return {n: torch.einsum("b...,bk->...k", v, weights.to(v.dtype)) for n, v in g.items()}


def projections(model: nn.Module, x: torch.Tensor, loss_fn: Loss, basis: dict[str, torch.Tensor], params: Any):
    g = _per_sample(model, x, loss_fn, params)
    return sum(v.reshape(v.shape[0], -1) @ basis[n].reshape(-1, basis[n].shape[-1]).to(v.dtype) for n, v in g.items())
