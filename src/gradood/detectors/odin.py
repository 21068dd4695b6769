"""ODIN: temperature scaling and input perturbation (Liang, Li & Srikant, ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..signals import ProbeBatch, Request, Signals
from . import _hyperparams as hp
from ._checks import pending_samples, warn_if_costly
from .._passes import batch_input_grad
from ._perturb import pred_ce, step
from . import _papers
from .base import Detector, register, register_variant

#: the original ODIN / GRODIN grid (10 x 21: ``grid="paper"``)
ODIN_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
ODIN_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 0.004, 21))
#: gradood's default tuning grid (4 x 4, ``grid="default"``): the paper grid's decades of T and its eps range,
#: 16 of its 210 points, so that tuning on a few thousand validation samples finishes in minutes on a CPU
DEFAULT_TEMPERATURES = (1.0, 10.0, 100.0, 1000.0)
DEFAULT_EPSILONS = (0.0, 0.001, 0.002, 0.004)
#: named tuning grids: (temperatures, epsilons)
ODIN_GRIDS = {"default": (DEFAULT_TEMPERATURES, DEFAULT_EPSILONS), "paper": (ODIN_TEMPERATURES, ODIN_EPSILONS)}


def resolve_grid(grid: str, temperatures: Sequence[float] | None,
                 epsilons: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (T, eps) grid to tune on: explicit ``temperatures``/``epsilons`` over the named ``grid``."""
    named_t, named_e = ODIN_GRIDS[grid]
    return (tuple(float(t) for t in (named_t if temperatures is None else temperatures)),
            tuple(float(e) for e in (named_e if epsilons is None else epsilons)))


def odin_grid_passes(temperatures: Sequence[float], epsilons: Sequence[float]) -> int:
    """Forward/backward passes per sample of :class:`PerturbedMSP` over a grid (eps = 0 reuses the shared
    forward pass): per T one input gradient (forward + backward) and one forward per nonzero eps."""
    nonzero = sum(e > 0 for e in epsilons)
    return len(temperatures) * ((2 if nonzero else 0) + nonzero)


@dataclass(frozen=True)
class PerturbedMSP(Request):
    """``max softmax(f(x_p)/T)`` at ``x_p = x - eps * sign(grad_x CE(f(x)/T, y_hat)) / std`` for every (T, eps)
    of a grid, as a ``B x (len(temperatures) * len(epsilons))`` tensor (T-major). One backward per T."""

    temperatures: tuple[float, ...]
    epsilons: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"odin:T={list(self.temperatures)}:eps={[round(e, 8) for e in self.epsilons]}"

    @property
    def shares_input_grad(self) -> bool:
        """With eps > 0 the input gradient comes from the pass's shared forward (2 forwards per batch, not 3)."""
        return any(e > 0 for e in self.epsilons)

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        cols = []
        for T in self.temperatures:
            g = None
            for eps in self.epsilons:
                if eps == 0:
                    logits = batch.logits
                else:
                    if g is None:
                        g = batch_input_grad(batch, lambda f, _t, T=T: pred_ce(f, T))
                    xp = step(batch.probe, batch.x, g, eps, direction=-1.0)
                    logits = batch.probe.forward(xp, validate=False).logits
                cols.append(torch.softmax(logits.double() / T, dim=1).amax(dim=1))
        return torch.stack(cols, dim=1)


def grid_auroc(id_vals: torch.Tensor, ood_vals: torch.Tensor) -> np.ndarray:
    """AUROC of each column (ID positive, higher = more ID)."""
    from ..metrics import auroc

    return np.array([auroc(id_vals[:, j].numpy(), ood_vals[:, j].numpy()) for j in range(id_vals.shape[1])])


@register("odin")
class ODIN(Detector):
    """ODIN (Liang et al., ICLR 2018).

    ``x_p = x - eps * sign(-grad_x log S_T(x)) / std`` with ``S_T`` the max softmax at temperature T (label from
    the unscaled logits; the step is divided by the per-channel normalisation std given to the Probe, so eps
    is in [0, 1]-pixel units); score ``max_k softmax(f(x_p)/T)_k``; higher = more ID.
    Inputs: the model (input gradients). Cost 2 forward + 1 backward per sample.

    Hyperparameters: ``temperature`` (1000, the GradNorm repo/OpenOOD default) and ``eps`` (0.0014, OpenOOD's)
    used as fixed values; with ``tune=True`` both are chosen on an OOD validation split to maximise AUROC over
    ``temperatures`` x ``epsilons`` -- then the detector is OOD-tuned and ``fit`` needs ``ood_val=``. The grid:
    ``grid="default"`` (T in {1, 10, 100, 1000} x eps in {0, 0.001, 0.002, 0.004}: 16 points, minutes on a
    CPU) or ``grid="paper"`` (the original 10 x 21 grid, T in {1, ..., 1000}, 21 eps in [0, 0.004]);
    explicit ``temperatures=`` / ``epsilons=`` replace the named grid's. A tuning run above 200 000
    sample-passes warns with its estimated time first.
    """

    paper = "Liang, Li & Srikant, Enhancing the Reliability of OOD Image Detection in Neural Networks, ICLR 2018"
    citation = _papers.ODIN
    signals = ("logits", "input-grads")
    needs_model = True

    hyperparams = {"temperature": hp.positive(), "eps": hp.non_negative(),
                   "temperatures": hp.reals(low=0, low_open=True, none=True), "epsilons": hp.reals(low=0, none=True),
                   "grid": hp.choice(*ODIN_GRIDS)}

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014, tune: bool = False,
                 temperatures: Sequence[float] | None = None, epsilons: Sequence[float] | None = None,
                 grid: str = "default") -> None:
        self.temperature = temperature
        self.eps = eps
        self.tune = tune
        self.temperatures = None if temperatures is None else tuple(temperatures)
        self.epsilons = None if epsilons is None else tuple(epsilons)
        self.grid = grid

    def tuning_grid(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (temperatures, epsilons) that ``tune=True`` searches."""
        return resolve_grid(self.grid, self.temperatures, self.epsilons)

    @property
    def tunes_on_ood(self) -> bool:  # type: ignore[override]
        return self.tune

    def _untuned_hint(self) -> str:
        return "pass tune=False with fixed temperature= and eps= (e.g. create('odin', temperature=1000, eps=0.0014))."

    def _chosen(self) -> tuple[float, float]:
        if self.tune:
            return self.temperature_, self.eps_
        return float(self.temperature), float(self.eps)

    def requests(self) -> list[Request]:
        T, eps = self._chosen()
        return [PerturbedMSP((T,), (eps,))]

    def fit_requests(self) -> list[Request]:
        return []  # fitting reads the validation splits only

    def _fit(self, signals: Signals, *, ood_val: Signals | None, id_val: Signals | None) -> None:
        if not self.tune:
            return
        assert ood_val is not None
        temps, epsilons = self.tuning_grid()
        grid = PerturbedMSP(temps, epsilons)
        id_s = id_val if id_val is not None else signals
        warn_if_costly(self.label, f"the tuning grid ({len(temps)} temperatures x {len(epsilons)} eps)",
                       pending_samples([id_s, ood_val], grid), odin_grid_passes(temps, epsilons),
                       "Pass a smaller id_val= split, grid='default' or fewer temperatures=/epsilons=.",
                       timing_from=id_s)
        aucs = grid_auroc(id_s.get(grid), ood_val.get(grid))
        best = int(np.argmax(aucs))
        self.temperature_ = temps[best // len(epsilons)]
        self.eps_ = epsilons[best % len(epsilons)]
        self.grid_auroc_ = aucs.reshape(len(temps), len(epsilons))

    def _score(self, signals: Signals) -> torch.Tensor:
        return signals.get(self.requests()[0])[:, 0]


register_variant("odin-tuned", ODIN, tune=True)
