"""GRODIN: gradient-based ODIN (docs/methods.md 2.6).

The full-network gradient of the predicted-label loss ``l_T(x) = -log softmax(f(x)/T)_c_hat`` factorises as
``grad_theta l_T = -S * G`` with ``S`` the max softmax at temperature T (ODIN's score). GRODIN scores the
G-part ``||G||^2 = ||grad l_T||^2 / S^2`` and the SG-part ``||grad l_T||^2``, after ODIN's input
perturbation. Per-sample squared norms over all parameters come from gradood's batched engine: one
forward and one backward per batch, never one backward per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..grads import per_sample_grad_sqnorms
from ..signals import FEATURES, LOGITS, ProbeBatch, Request, Signals
from . import _hyperparams as hp
from ._checks import pending_samples, warn_if_costly
from .._passes import batch_input_grad
from ._perturb import pred_ce, step
from . import _papers
from .base import Detector, register, register_variant
from .odin import ODIN_GRIDS, grid_auroc, resolve_grid

PARTS = ("G", "SG", "S")


def _params_key(params: Any) -> str:
    return params if isinstance(params, str) else (str(params) if isinstance(params, int) else ",".join(params))


def head_stats(logits: torch.Tensor, features: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, ||grad_{W,b} l_T||^2)`` of the head in closed form: ``||p_T - e_c||^2 (||h||^2 + 1) / T^2``."""
    f, h = logits.double(), features.double()
    p = torch.softmax(f / T, dim=1)
    onehot = torch.zeros_like(p).scatter_(1, f.argmax(dim=1, keepdim=True), 1.0)
    return p.amax(dim=1), (p - onehot).pow(2).sum(dim=1) * (h.pow(2).sum(dim=1) + 1.0) / T**2


@dataclass(frozen=True)
class GrodinStats(Request):
    """``[S, ||grad_theta l_T||^2]`` at the ODIN-perturbed input for every (T, eps) of a grid:
    ``B x (len(T) * len(eps) * 2)`` (T-major, then eps, then the pair). ``last_layer=True`` uses the closed
    form over the head's weight and bias (``||p_T - e_c||^2 (||h||^2 + 1) / T^2``) instead of the engine."""

    temperatures: tuple[float, ...]
    epsilons: tuple[float, ...]
    params: Any = "all"
    last_layer: bool = False

    @property
    def key(self) -> str:
        scope = "head" if self.last_layer else _params_key(self.params)
        return (f"grodin:{scope}:T={list(self.temperatures)}:eps={[round(e, 8) for e in self.epsilons]}")

    @property
    def shares_input_grad(self) -> bool:
        """With eps > 0 the input gradient comes from the pass's shared forward (2 forwards per batch, not 3)."""
        return any(e > 0 for e in self.epsilons)

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        cols = []
        for T in self.temperatures:
            g = None
            for eps in self.epsilons:
                if eps > 0 and g is None:
                    g = batch_input_grad(batch, lambda f, _t, T=T: pred_ce(f, T))
                x = batch.x if eps == 0 else step(batch.probe, batch.x, g, eps, direction=-1.0)
                s, sq = self._stats(batch, x, T, eps)
                cols += [s, sq]
        return torch.stack(cols, dim=1)

    def _stats(self, batch: ProbeBatch, x: torch.Tensor, T: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last_layer:
            out = batch if eps == 0 else batch.probe.forward(x, validate=False)
            return head_stats(out.logits, out.features, T)
        probe = batch.probe
        # the model may return a tuple/dict/ModelOutput: the loss and S read its logits; shifted token inputs
        # (eps > 0 on text) run with their embedding shift hooked in
        with probe.eval_mode(), probe.model_inputs(x) as inputs:
            sq, out = per_sample_grad_sqnorms(probe.model, inputs, lambda o, T=T: pred_ce(probe.output_logits(o), T),
                                              params=self.params, return_output=True)
        s = torch.softmax(probe.output_logits(out).detach().double() / T, dim=1).amax(dim=1)
        return s, sq.double()


@register("grodin")
class GRODIN(Detector):
    """GRODIN (Yengalych et al., "GRODIN: improved large-scale out-of-domain detection via back-propagation").

    ``part``: "G" (default) scores ``-||G||^2 = -||grad_theta l_T||^2 / S^2``; "SG" scores
    ``-||grad_theta l_T||^2``; "S" scores S (= ODIN). Higher = more ID (training drives the gradient of ID
    samples towards zero). ``params``: which parameters count -- "all" (default; every parameter with
    requires_grad, incl. BN affine and biases, docs/methods.md 2.6), an int k (last k parametrised
    layers) or a list of names. Inputs: the model (per-sample parameter gradients + input gradients).

    ``temperature`` (1) and ``eps`` (0) are used as given ("vanilla" GRODIN, OOD-agnostic); ``tune=True``
    picks them on an OOD validation split from ``temperatures`` x ``epsilons`` by AUROC -- then OOD-tuned.
    The grid is ODIN's: ``grid="default"`` (4 x 4, minutes on a CPU) or ``grid="paper"`` (the ODIN grid,
    10 x 21, as in the paper); explicit ``temperatures=`` / ``epsilons=`` replace the named grid's. Cost per sample: forward + backward (+ forward + backward
    for the perturbation when eps > 0), batched.
    """

    paper = "Yengalych, Kuralenok & Ershov, GRODIN: Improved Large-Scale Out-of-Domain Detection via Back-propagation, OpenReview"
    citation = _papers.GRODIN
    signals = ("param-grads", "input-grads")
    needs_model = True
    last_layer = False

    hyperparams = {"part": hp.choice(*PARTS), "temperature": hp.positive(), "eps": hp.non_negative(),
                   "temperatures": hp.reals(low=0, low_open=True, none=True), "epsilons": hp.reals(low=0, none=True),
                   "params": hp.PARAM_SCOPE, "grid": hp.choice(*ODIN_GRIDS)}

    def __init__(self, part: str = "G", temperature: float = 1.0, eps: float = 0.0, tune: bool = False,
                 temperatures: Sequence[float] | None = None, epsilons: Sequence[float] | None = None,
                 params: Any = "all", grid: str = "default") -> None:
        self.part = part
        self.temperature = temperature
        self.eps = eps
        self.tune = tune
        self.temperatures = None if temperatures is None else tuple(temperatures)
        self.epsilons = None if epsilons is None else tuple(epsilons)
        self.params = tuple(params) if isinstance(params, list) else params
        self.grid = grid

    def tuning_grid(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (temperatures, epsilons) that ``tune=True`` searches."""
        return resolve_grid(self.grid, self.temperatures, self.epsilons)

    def _grid_passes(self, temps: Sequence[float], epsilons: Sequence[float]) -> int:
        """Forward/backward passes per sample of :class:`GrodinStats`: per T an input gradient when some eps
        is nonzero, and per (T, eps) the engine's forward + backward (the head's closed form: a forward at a
        perturbed input only)."""
        nonzero = sum(e > 0 for e in epsilons)
        per_t = (2 if nonzero else 0) + (nonzero if self.last_layer else 2 * len(epsilons))
        return len(temps) * per_t

    @property
    def tunes_on_ood(self) -> bool:  # type: ignore[override]
        return self.tune

    def _request(self, temperatures: tuple[float, ...], epsilons: tuple[float, ...]) -> GrodinStats:
        return GrodinStats(temperatures, epsilons, self.params, self.last_layer)

    def _untuned_hint(self) -> str:
        return ("pass tune=False with fixed temperature= and eps= (e.g. create('grodin', temperature=1, eps=0), "
                "the paper's vanilla setting).")

    def _chosen(self) -> tuple[float, float]:
        return (self.temperature_, self.eps_) if self.tune else (float(self.temperature), float(self.eps))

    def requests(self) -> list[Request]:
        T, eps = self._chosen()
        return [self._request((T,), (eps,))]

    def fit_requests(self) -> list[Request]:
        return []

    def part_scores(self, stats: torch.Tensor) -> torch.Tensor:
        """ID-scores from ``[S, ||grad||^2]`` column pairs (any number of pairs): one column per pair."""
        s, sq = stats[:, 0::2].double(), stats[:, 1::2].double()
        if self.part == "S":
            return s
        if self.part == "SG":
            return -sq
        return -sq / s.pow(2)

    def _fit(self, signals: Signals, *, ood_val: Signals | None, id_val: Signals | None) -> None:
        if not self.tune:
            return
        assert ood_val is not None
        temps, epsilons = self.tuning_grid()
        grid = self._request(temps, epsilons)
        id_s = id_val if id_val is not None else signals
        warn_if_costly(self.label, f"the tuning grid ({len(temps)} temperatures x {len(epsilons)} eps)",
                       pending_samples([id_s, ood_val], grid), self._grid_passes(temps, epsilons),
                       "Pass a smaller id_val= split, grid='default' or fewer temperatures=/epsilons=.",
                       timing_from=id_s)
        aucs = grid_auroc(self.part_scores(id_s.get(grid)), self.part_scores(ood_val.get(grid)))
        best = int(np.argmax(aucs))
        self.temperature_ = temps[best // len(epsilons)]
        self.eps_ = epsilons[best % len(epsilons)]
        self.grid_auroc_ = aucs.reshape(len(temps), len(epsilons))

    def _score(self, signals: Signals) -> torch.Tensor:
        return self.part_scores(signals.get(self.requests()[0]))[:, 0]


class GRODINLastLayer(GRODIN):
    """GRODIN restricted to the classifier head's weight and bias, in closed form (no backward pass for
    eps = 0): ``||grad l_T||^2 = ||p_T - e_c_hat||^2 (||h||^2 + 1) / T^2``. A cheap approximation, NOT the
    paper's method (which uses all network weights). Same hyperparameters as :class:`GRODIN` (``params`` is
    ignored)."""

    signals = ("logits", "features", "input-grads")
    last_layer = True

    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        return self.tune or self.eps > 0

    def requests(self) -> list[Request]:
        T, eps = self._chosen()
        return [self._request((T,), (eps,))] if eps > 0 else [LOGITS, FEATURES]

    def _score(self, signals: Signals) -> torch.Tensor:
        T, eps = self._chosen()
        if eps > 0:
            return super()._score(signals)
        return self.part_scores(torch.stack(head_stats(signals.logits, signals.features, T), dim=1))[:, 0]


register_variant("grodin-sg", GRODIN, part="SG")
register_variant("grodin-tuned", GRODIN, tune=True)
register_variant("grodin-sg-tuned", GRODIN, part="SG", tune=True)
register_variant("grodin-lastlayer", GRODINLastLayer)
register_variant("grodin-lastlayer-sg", GRODINLastLayer, part="SG")
