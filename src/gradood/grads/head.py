"""Closed forms of last-layer gradients (docs/methods.md section 1).

For logits ``z = W h + b`` and any loss ``L(z)`` with ``delta = dL/dz``: ``dL/dW = delta h^T`` and
``dL/db = delta``. Entry-wise norms of an outer product factorise for any sign pattern, so

* ``||dL/dW||_1 = ||delta||_1 ||h||_1``   (with bias: ``||delta||_1 (||h||_1 + 1)``)
* ``||dL/dW||_F = ||delta||_2 ||h||_2``   (with bias: ``||delta||_2 sqrt(||h||_2^2 + 1)``)

Every last-layer gradient score is therefore (output term) x (feature term) and needs one forward pass
and no backward. ``tests/test_closed_forms.py`` checks each form against per-sample autograd.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

NORMS = ("l1", "l2", "l2sq")


def softmax_t(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / T, dim=1)


def gini_impurity(p: torch.Tensor) -> torch.Tensor:
    """``1 - sum_k p_k^2`` computed as ``sum_k p_k (1 - p_k)``, with ``1 - p_max`` taken as the sum of the other
    probabilities so that confident predictions (p_max ~ 1) do not lose every digit to cancellation."""
    one_minus = 1.0 - p
    top = p.argmax(dim=1, keepdim=True)
    rest = p.scatter(1, top, 0.0).sum(dim=1, keepdim=True)  # sum of the others, not sum(p) - p_max
    one_minus = one_minus.scatter(1, top, rest)
    return (p * one_minus).sum(dim=1)


def loss_delta(loss: str, logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``dL/dz`` (``B x C``) of a named per-sample loss of the logits.

    * ``"kl_uniform"``: ``KL(u || softmax(z/T))`` (GradNorm paper, RG eq. 3) -> ``(p_T - u)/T``
    * ``"ones"``: ``-sum_c log softmax(z/T)_c`` (GradNorm official code) -> ``(C p_T - 1)/T``
    * ``"pred_ce"``: ``-log softmax(z/T)_c_hat``, c_hat = argmax z (GRODIN) -> ``(p_T - e_c_hat)/T``
    * ``"sumexp"``: ``sum_i exp(z_i)`` (RG eq. 5) -> ``exp(z)``
    * ``"energy"``: ``LSE(z)`` (Wu et al.'s target) -> ``softmax(z)``
    """
    if loss == "kl_uniform":
        return (softmax_t(logits, T) - 1.0 / logits.shape[1]) / T
    if loss == "ones":
        return (logits.shape[1] * softmax_t(logits, T) - 1.0) / T
    if loss == "pred_ce":
        p = softmax_t(logits, T)
        onehot = torch.zeros_like(p).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
        return (p - onehot) / T
    if loss == "sumexp":
        return torch.exp(logits)
    if loss == "energy":
        return torch.softmax(logits, dim=1)
    raise ConfigError(f"unknown loss {loss!r}; choose one of kl_uniform, ones, pred_ce, sumexp, energy.")


def feature_norm(h: torch.Tensor, norm: str, include_bias: bool = False) -> torch.Tensor:
    """The feature factor of a last-layer gradient norm: ``||h||_1 (+1)``, ``sqrt(||h||_2^2 (+1))`` or its square."""
    if norm == "l1":
        return h.abs().sum(dim=1) + (1.0 if include_bias else 0.0)
    sq = h.pow(2).sum(dim=1) + (1.0 if include_bias else 0.0)
    if norm == "l2sq":
        return sq
    if norm == "l2":
        return sq.sqrt()
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")


def output_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        return delta.abs().sum(dim=1)
    if norm == "l2sq":
        return delta.pow(2).sum(dim=1)
    if norm == "l2":
        return delta.pow(2).sum(dim=1).sqrt()
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")


def head_grad_norm(delta: torch.Tensor, h: torch.Tensor, norm: str = "l1",
                   include_bias: bool = False) -> torch.Tensor:
    """Per-sample norm of ``[delta h^T, delta]`` (bias part only with ``include_bias``), exactly."""
    return output_norm(delta, norm) * feature_norm(h, norm, include_bias)


def expected_logprob_grad_output_term(logits: torch.Tensor, T: float, norm: str) -> torch.Tensor:
    """``E_{y ~ p_T} ||(e_y - p_T)/T||`` per sample: ExGrad's output factor (Igoe et al.; RG eq. 4).

    ``l1``: ``(2/T)(1 - sum p^2)`` since ``||e_y - p||_1 = 2 (1 - p_y)``; ``l2sq``: ``(1 - sum p^2)/T^2``;
    ``l2``: ``(1/T) sum_y p_y sqrt(1 - 2 p_y + sum p^2)``.
    """
    p = softmax_t(logits, T)
    g = gini_impurity(p)
    if norm == "l1":
        return 2.0 * g / T
    if norm == "l2sq":
        return g / T**2
    if norm == "l2":
        # ||e_y - p||^2 = (1 - p_y)^2 + sum_{k != y} p_k^2. For the top class both terms are formed from the
        # other probabilities directly, so a confident prediction (p_max ~ 1) keeps its digits.
        top = p.argmax(dim=1, keepdim=True)
        others = p.scatter(1, top, 0.0)
        one_minus = (1.0 - p).scatter(1, top, others.sum(dim=1, keepdim=True))
        sq = p.pow(2)
        rest_sq = (sq.sum(dim=1, keepdim=True) - sq).scatter(1, top, others.pow(2).sum(dim=1, keepdim=True))
        return (p * (one_minus.pow(2) + rest_sq.clamp_min(0.0)).sqrt()).sum(dim=1) / T
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")
