"""Input perturbation shared by ODIN, GRODIN, FSSD and Mahalanobis preprocessing.

What moves, and in which unit (see :meth:`gradood.Probe.perturbation_target`):

* image / continuous inputs (a float tensor, or a dict's ``pixel_values`` / ``inputs_embeds``): the step is
  ``eps * sign(grad) / std``: ``eps`` is in [0, 1]-pixel units and divided by the per-channel normalisation
  std (the probe's ``input_std``), as in the ODIN code;
* token inputs (integer ids, e.g. a tokenizer's ``input_ids``): ids cannot move, so the output of the
  token-embedding layer does (:class:`gradood.probe.ShiftedTokens`): ``eps * sign(grad)`` is added to every
  coordinate of every token's embedding, ``eps`` in the units of the embedding table (``input_std`` does
  not apply; BERT-family word embeddings have entries of standard deviation ~0.02-0.05, so useful eps are
  of that order or below). Position/type embeddings, masks and padding are unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .._batches import num_rows
from ..errors import ConfigError
from ..probe import EMBEDDINGS, Probe, ShiftedTokens, input_step_scale


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


def input_grad(probe: Probe, x: Any, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               taps: Sequence[str] = ()) -> torch.Tensor:
    """Gradient of ``sum_i loss_of(logits, taps)_i`` with respect to the inputs, for a whole batch (for
    token inputs: with respect to the token-embedding layer's output, ``B x L x H``; for a dict: its
    perturbed entry).

    Per-sample losses are summed: in eval mode sample i's loss depends only on x_i, so the gradient of the
    sum w.r.t. x_i is that sample's own input gradient.
    """
    target = probe.perturbation_target(x)
    if target == EMBEDDINGS:
        with probe.embedding_leaf() as leaves:
            out = probe.forward(x, taps, grad=True, validate=False)
        if len(leaves) != 1:
            raise ConfigError(f"the token-embedding layer {probe.embedding_layer()[0]!r} ran {len(leaves)} times "
                              "in one forward pass; pass Probe(embeddings=<the layer that embeds the input ids>).")
        wrt = leaves[0]
    else:
        wrt = (x if target is None else x[target]).detach().clone().requires_grad_(True)
        out = probe.forward(wrt if target is None else {**x, target: wrt}, taps, grad=True, validate=False)
    loss = loss_of(out.logits, out.taps) if taps else loss_of(out.logits, {})
    (g,) = torch.autograd.grad(loss.sum(), wrt)
    return g


def shift(probe: Probe, x: Any, d: torch.Tensor) -> Any:
    """The inputs moved by ``d`` (shaped like :func:`input_grad`'s gradient): ``x + d / std`` for images
    ([0, 1]-pixel units), the token embeddings plus ``d`` for token inputs (embedding units)."""
    target = probe.perturbation_target(x)
    if target == EMBEDDINGS:
        if isinstance(x, ShiftedTokens):
            return ShiftedTokens(x.inputs, (x.delta + d).detach())
        return ShiftedTokens(x, d.detach())
    if target is None:
        return (x + d * input_step_scale(probe, x)).detach()
    v = x[target]
    return {**x, target: (v + d * input_step_scale(probe, v)).detach()}


def step(probe: Probe, x: Any, grad: torch.Tensor, eps: float, direction: float) -> Any:
    """``x + direction * eps * sign(grad) / std`` (direction -1 descends the loss); see :func:`shift`."""
    if eps == 0:
        return x
    return shift(probe, x, direction * eps * torch.sign(grad))


def batch_rows(x: Any) -> int:
    """Number of samples in a batch of (possibly shifted) inputs."""
    return num_rows(x.inputs if isinstance(x, ShiftedTokens) else x)


def pred_ce(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits / T`` with the predicted label (label from the unscaled logits)."""
    return torch.nn.functional.cross_entropy(logits / T, logits.argmax(dim=1).detach(), reduction="none")
