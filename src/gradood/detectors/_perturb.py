"""Input perturbation shared by ODIN, GRODIN, FSSD and Mahalanobis preprocessing.

The step is ``eps * sign(grad) / std``: ``eps`` is in [0, 1]-pixel units and divided by the per-channel
normalisation std (the probe's ``input_std``), as in the ODIN code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..probe import Probe, input_step_scale


def check_eps(eps: float, what: str = "eps") -> float:
    try:
        v = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {eps!r}.") from None
    if not v >= 0 or v != v or v == float("inf"):
        raise ConfigError(f"{what} must be >= 0 (a step in [0, 1]-pixel units), got {eps!r}.")
    return v


def check_grid(values: Sequence[float], what: str, *, positive: bool = False) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ConfigError(f"{what} grid is empty.")
    for v in vals:
        if positive and not v > 0:
            raise ConfigError(f"every value of the {what} grid must be > 0, got {v!r}.")
        if not positive:
            check_eps(v, what)
    return vals


def input_grad(probe: Probe, x: torch.Tensor, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               taps: Sequence[str] = ()) -> torch.Tensor:
    """Gradient of ``sum_i loss_of(logits, taps)_i`` with respect to the inputs, for a whole batch.

    Per-sample losses are summed: in eval mode sample i's loss depends only on x_i, so the gradient of the
    sum w.r.t. x_i is that sample's own input gradient.
    """
    xg = x.detach().clone().requires_grad_(True)
    out = probe.forward(xg, taps, grad=True, validate=False)
    loss = loss_of(out.logits, out.taps) if taps else loss_of(out.logits, {})
    (g,) = torch.autograd.grad(loss.sum(), xg)
    return g


def step(probe: Probe, x: torch.Tensor, grad: torch.Tensor, eps: float, direction: float) -> torch.Tensor:
    """``x + direction * eps * sign(grad) / std`` (direction -1 descends the loss)."""
    if eps == 0:
        return x
    return (x + direction * eps * torch.sign(grad) * input_step_scale(probe, x)).detach()


def pred_ce(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits / T`` with the predicted label (label from the unscaled logits)."""
    return torch.nn.functional.cross_entropy(logits / T, logits.argmax(dim=1).detach(), reduction="none")
