"""Finding the classifier head by data flow, and reading its output at the positions the model pools.

The head is the ``nn.Linear`` (or 1x1 ``nn.Conv2d``) *whose output becomes the model's logits*, possibly
through reshapes, flattening, dtype casts, indexing/selection (e.g. the last non-pad token), concatenation
and element-wise ops (scaling, adding a constant or a parameter, dropout and identity, which leave no trace
in eval mode, softmax/log-softmax, tanh soft-capping). It is *not* the last ``nn.Linear`` called: an
auxiliary linear layer called after the head (a projection for a contrastive loss, a second task, a
regression branch) must not be taken for it.

How: one forward pass on a couple of samples with a forward hook on every candidate layer that replaces the
layer's output by a fresh autograd leaf (followed by a clone, so in-place ops after the layer stay legal).
The autograd graph of the model's logits is then walked backwards through the pass-through operations
above only; the candidate leaves it reaches are the layers the logits are made of. Exactly one must be
reached. Several (``head_a(h) + head_b(h)``, an ensemble of heads) or none (a learned matrix multiply, a
pooling over positions) is an error that names the candidates and asks for ``head=``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from .errors import ModelError

#: autograd nodes a head's output may go through on its way to the model's logits (names without the
#: ``Backward<n>`` suffix): views and reshapes, casts, selection and indexing, concatenation and
#: element-wise arithmetic with constants or parameters, softmax / log-softmax and tanh/sigmoid capping.
PASS_THROUGH = frozenset({
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "Alias", "AsStrided", "Squeeze", "Unsqueeze", "Permute",
    "Transpose", "T", "Expand", "Clone", "ToCopy", "Select", "Index", "Slice", "Gather", "Cat", "Stack",
    "Unbind", "Split", "SplitWithSizes", "CopySlices", "Mul", "Div", "Add", "Sub", "Rsub", "Neg",
    "Softmax", "LogSoftmax", "Tanh", "Sigmoid",
})

_SUFFIX = re.compile(r"Backward\d*$")


def is_head_candidate(m: nn.Module) -> bool:
    """An ``nn.Linear``, or an ``nn.Conv2d`` with a 1x1 kernel and no groups (BiT-style heads)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def _op_name(node: Any) -> str:
    return _SUFFIX.sub("", type(node).__name__)


def heads_reaching(logits: torch.Tensor, leaves: dict[int, tuple[str, int]]) -> tuple[list[tuple[str, int]], set[str]]:
    """The candidate ``(module name, call index)`` whose leaf output the logits are made of through
    pass-through operations only, and the names of the operations where the walk stopped."""
    found: list[tuple[str, int]] = []
    stopped: set[str] = set()
    start = logits.grad_fn
    if start is None:
        return found, stopped
    seen: set[int] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad":
            var = getattr(node, "variable", None)
            if var is not None and id(var) in leaves and leaves[id(var)] not in found:
                found.append(leaves[id(var)])
            continue  # a parameter or another leaf: nothing behind it
        op = _op_name(node)
        if op not in PASS_THROUGH:
            stopped.add(op)
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return found, stopped


def find_head(model: nn.Module, run: Callable[[], Any], logits_of: Callable[[Any], torch.Tensor],
              scope: str | None = None) -> str:
    """Name of the candidate layer (under ``scope`` when given) whose output the model's logits are made of.

    ``run`` calls the model on a few samples (in eval mode); ``logits_of`` reads the logits from its output.
    """
    prefix = None if not scope else scope + "."
    candidates = {n: m for n, m in model.named_modules()
                  if is_head_candidate(m) and (scope is None or n == scope or n.startswith(prefix))}
    leaves: dict[int, tuple[str, int]] = {}
    keep: list[torch.Tensor] = []  # the leaves must outlive the walk (ids are only unique while alive)
    order: list[str] = []

    def hook(name: str) -> Callable[..., Any]:
        def fn(_m: nn.Module, _i: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            leaf = out.detach().requires_grad_(True)
            leaves[id(leaf)] = (name, order.count(name))
            keep.append(leaf)
            order.append(name)
            return leaf.clone()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
    try:
        with torch.enable_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    reached = list(dict.fromkeys(order))
    inside = f" inside {scope!r}" if scope else ""
    what = "nn.Linear (or 1x1 nn.Conv2d) layer" + inside
    if not reached:
        raise ModelError(
            f"no {what} is reached in the forward pass of {type(model).__name__}, so the classifier head cannot "
            "be found. Pass Probe(model, head='<name>') naming the layer whose output are the logits (an "
            "nn.Linear, or a 1x1 nn.Conv2d); module names are listed by [n for n, _ in model.named_modules()]."
        )
    logits = logits_of(out)
    if logits.grad_fn is None:
        raise ModelError(
            f"the model's logits carry no autograd graph (the forward pass detaches them or runs under "
            f"torch.no_grad), so the layer that outputs them cannot be traced among {reached[:8]}. Pass "
            "Probe(model, head='<name>') naming the layer whose output are the logits."
        )
    found, stopped = heads_reaching(logits, leaves)
    names = list(dict.fromkeys(n for n, _ in found))
    if len(found) == 1:
        return found[0][0]
    if len(names) == 1:
        raise ModelError(
            f"the model's logits are made of several calls of {names[0]!r} (e.g. the same layer applied to two "
            "inputs and summed), so no single call of a layer outputs the logits. gradood's closed forms need "
            "one linear layer whose output are the logits; restructure the model or pass head= and logits=."
        )
    if len(names) > 1:
        raise ModelError(
            f"the classifier head is ambiguous: the model's logits are made of the outputs of {len(names)} layers "
            f"({names}), e.g. a sum or concatenation of heads. Pass Probe(model, head='<name>') naming the one "
            "whose output are the logits (gradood's closed-form gradient scores are exact for that layer)."
        )
    via = f" (the walk back from the logits stopped at: {sorted(stopped)})" if stopped else ""
    raise ModelError(
        f"none of the nn.Linear (or 1x1 nn.Conv2d) layers{inside} reached in the forward pass ({reached[:8]}{'...' if len(reached) > 8 else ''}) "
        f"outputs the model's logits through reshapes or element-wise ops{via}. Pass "
        "Probe(model, head='<name>') naming the layer whose output are the logits, and logits=<callable> if the "
        "logits are not the model's output (or its .logits / ['logits'] / [0])."
    )


def pool_positions(head_out: torch.Tensor, head_in: torch.Tensor, logits: torch.Tensor, head_name: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of a head applied at every position (``B x ... x C`` out, ``B x ... x D`` in)
    whose model logits (``B x C``) are the head output at one position per sample, e.g. GPT-2's ``score``
    read at the last non-pad token, or a CLS-token selection after a per-token head.

    The position is found by data flow on values: the one whose head output equals the model's logits (to
    round-off); among equal ones, the last (GPT-2's convention; equal outputs are equal logits anyway).
    """
    B, C = logits.shape
    out = head_out.reshape(B, -1, C)
    inp = head_in.reshape(B, out.shape[1], -1)
    z = logits.detach().to(out.dtype)
    gap = (out.detach() - z[:, None, :]).abs().amax(dim=2)  # B x positions
    best = gap.min(dim=1).values
    tol = 1e-5 * (1.0 + z.abs().amax(dim=1))
    if bool((best > tol).any()):
        bad = (best > tol).nonzero().flatten()[:5].tolist()
        raise ModelError(
            f"the head {head_name!r} is applied at {out.shape[1]} positions per sample, but the model's logits of "
            f"samples {bad} are not its output at any one position (pooled by averaging?). gradood needs one "
            "head output per sample: name a head applied after the pooling (head=), or pass logits= to read "
            "the per-position logits the model pools."
        )
    positions = torch.arange(out.shape[1], device=out.device)
    last = torch.where(gap <= best[:, None], positions, -1).amax(dim=1)
    rows = torch.arange(B, device=out.device)
    return out[rows, last], inp[rows, last]
