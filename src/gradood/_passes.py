"""One gradient-enabled forward pass shared by the signals of a batch: fewer forward passes per batch.

Input perturbation (ODIN, GRODIN with eps > 0, Mahalanobis and FSSD preprocessing) needs the input gradient
of a loss of the logits or taps at the unperturbed input, then a forward at the perturbed input. Computed
separately that is three forwards per batch: the shared no-grad forward that every request reads, one with
gradients for the input gradient, and one at the perturbed input. When a request of a pass declares
``shares_input_grad``, the shared forward itself runs with gradients on a leaf copy of the inputs, and such
requests take their input gradient from its graph (:func:`batch_input_grad`): two forwards per batch.

Every other request of the pass sees the batch detached, i.e. exactly what a no-grad forward gives it. Only
plain floating-point tensor inputs share; other inputs (token ids, dicts) keep the separate forward.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from .probe import Probe
    from .signals import ProbeBatch, Request


def shares_input_grad(request: "Request") -> bool:
    """Whether ``request`` takes its input gradient from the shared forward's graph."""
    return bool(getattr(request, "shares_input_grad", False))


def any_shares_input_grad(requests: Iterable["Request"]) -> bool:
    return any(shares_input_grad(r) for r in requests)


def grad_leaf(probe: "Probe", x: Any, batch_index: int | None) -> Any:
    """The validated inputs as a leaf that requires grad (plain float tensors only; anything else unchanged)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return probe.prepare(x, batch_index=batch_index).detach().requires_grad_(True)


def _detached(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def batch_for(request: "Request", batch: "ProbeBatch", shared: bool) -> "ProbeBatch":
    """The batch as ``request`` sees it: with the graph for requests that share it, detached for the rest."""
    if not shared or shares_input_grad(request):
        return batch
    return dataclasses.replace(batch, x=_detached(batch.x), logits=batch.logits.detach(),
                               features=batch.features.detach(), taps={k: v.detach() for k, v in batch.taps.items()})


def batch_input_grad(batch: "ProbeBatch", loss_of: Callable[[torch.Tensor, dict], torch.Tensor],
                     taps: Sequence[str] = ()) -> torch.Tensor:
    """Gradient of ``sum_i loss_of(logits, taps)_i`` w.r.t. the batch's inputs: from the shared forward's graph
    when the pass built one (no extra forward), else from a forward of its own
    (:func:`gradood.detectors._perturb.input_grad`)."""
    x = batch.x
    if (isinstance(x, torch.Tensor) and x.requires_grad and batch.logits.requires_grad
            and all(t in batch.taps for t in taps)):
        loss = loss_of(batch.logits, {t: batch.taps[t] for t in taps})
        # the graph stays for the other requests (and temperatures) of this batch; it goes with the batch
        (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
        return g
    from .detectors._perturb import input_grad

    return input_grad(batch.probe, x, loss_of, taps)
