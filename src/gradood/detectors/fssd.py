"""FSSD: Feature Space Singularity Distance (Huang et al., 2020; method-specs.md 2.8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..signals import ProbeBatch, Request, Signals, tensor_digest
from ._ensemble import LayerCombiner, check_combine, select_on_halves
from .._passes import batch_input_grad
from ._perturb import check_eps, check_grid, step
from .base import Detector, check_choice, check_open_fraction, register, register_variant

#: the official code's epsilon grid (the paper's is 0 to 0.2 in steps of 0.01)
FSSD_CODE_EPSILONS = (0.2, 0.18, 0.16, 0.14, 0.12, 0.1, 0.08, 0.06, 0.04, 0.02, 0.01, 0.008, 0.006, 0.004,
                      0.002, 0.001, 0.0008, 0.0006, 0.0004, 0.0002, 0.0001, 0.0)
FSSD_PAPER_EPSILONS = tuple(round(0.01 * i, 2) for i in range(21))


def flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1)


@dataclass(frozen=True, eq=False)
class SingularityDistances(Request):
    """``||F_k(x_k) - F_k*||_2`` for each layer k (flattened maps), ``B x L``.

    With ``eps > 0`` each layer gets its own perturbed input: ``mode="paper"`` moves x by
    ``eps * sign(grad_x FSSD_k) / std`` (increasing the ID-score); ``mode="code"`` follows the official code:
    ``g = grad_x(-mean_batch FSSD_k)`` standardised by the whole batch's mean/std, divided by the std, and
    ``x + eps * g`` -- batch-dependent, kept for numeric reproduction only.
    """

    layers: tuple[str, ...]
    centers: tuple[torch.Tensor, ...] = field(repr=False)
    eps: float = 0.0
    mode: str = "paper"

    @property
    def taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.layers

    @property
    def key(self) -> str:
        return f"fssd:{','.join(self.layers)}:{tensor_digest(*self.centers)}:eps={self.eps:g}:{self.mode}"

    @property
    def shares_input_grad(self) -> bool:
        """With eps > 0 the input gradients come from the pass's shared forward (one forward fewer)."""
        return self.eps > 0

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        cols = []
        for layer, c in zip(self.layers, self.centers):
            if self.eps == 0:
                feats = batch.taps[layer]
            else:
                xp = self._perturbed(batch, layer, c)
                feats = batch.probe.forward(xp, (layer,), validate=False).taps[layer]
            cols.append((flat(feats).double() - c.to(feats.device)).norm(dim=1))
        return torch.stack(cols, dim=1)

    def _perturbed(self, batch: ProbeBatch, layer: str, c: torch.Tensor) -> torch.Tensor:
        dist = lambda _f, taps: (flat(taps[layer]) - c.to(taps[layer].device, taps[layer].dtype)).norm(dim=1)  # noqa: E731
        if self.mode == "paper":
            g = batch_input_grad(batch, dist, taps=(layer,))
            return step(batch.probe, batch.x, g, self.eps, direction=+1.0)
        g = batch_input_grad(batch, lambda f, t: -dist(f, t) / batch.x.shape[0], taps=(layer,))
        g = (g - g.mean()) / g.std().clamp_min(1e-12)
        from ..probe import input_step_scale

        return (batch.x + self.eps * g * input_step_scale(batch.probe, batch.x)).detach()


@register("fssd")
class FSSD(Detector):
    """FSSD (Huang, Geng & Li et al., "Feature Space Singularity for Out-of-Distribution Detection", 2020).

    Fit: the singularity ``F_k*`` of each tapped layer = mean flattened feature of ``n_noise`` uniform-noise
    inputs. Per-layer score ``FSSD_k(x) = ||F_k(x) - F_k*||_2`` (flattened maps, no pooling); higher = more ID
    (OOD features concentrate near the singularity). Inputs: layer activations (+ input gradients if eps > 0).

    Hyperparameters:

    * ``layers``: module names to tap; None = the probe's default (activation modules reached once) plus the
      logits, which matches the official LeNet choice (conv1-relu, conv2-relu, fc1-relu, logits).
    * ``noise``: "code" (official: pixels ``randint(0,255)``, ``(p - 127.5)/255``, fed without normalisation;
      default, for numeric reproduction) or "normalized" (U[0,1] pixels through the probe's mean/std, the
      paper's wording).
    * ``combine``: how layers are combined -- "mean-z" (default, OOD-agnostic: per-layer z-scores with ID fit
      statistics, averaged), "lr" (the paper's FSSD-Ensem: logistic regression on an OOD validation split --
      OOD-tuned), or a layer name (that layer alone).
    * ``eps`` (0.0): input perturbation step; ``perturb_mode`` "paper" (default) or "code" (see
      :class:`SingularityDistances`); ``tune_eps`` (False): choose eps on the validation split from
      ``epsilons`` (default: the official code's grid) -- OOD-tuned.
    * ``n_noise`` (100), ``seed`` (0), ``val_split`` (0.5: with lr + tune_eps, the share of the validation
      split that fits the LR; the rest selects eps, as in the official code).
    """

    paper = "Huang et al., Feature Space Singularity for Out-of-Distribution Detection, SafeAI 2021 (arXiv 2011.14654)"
    signals = ("taps", "input-grads")
    fits_on_id = True
    needs_model = True

    def __init__(self, layers: Sequence[str] | None = None, noise: str = "code", combine: str = "mean-z",
                 eps: float = 0.0, perturb_mode: str = "paper", tune_eps: bool = False,
                 epsilons: Sequence[float] = FSSD_CODE_EPSILONS, n_noise: int = 100, seed: int = 0,
                 val_split: float = 0.5) -> None:
        self.layers = None if layers is None else tuple(layers)
        self.noise = check_choice(noise, "noise", ("code", "normalized"))
        self.combine = check_combine(combine)
        self.eps = check_eps(eps)
        self.perturb_mode = check_choice(perturb_mode, "perturb_mode", ("paper", "code"))
        self.tune_eps = bool(tune_eps)
        self.epsilons = check_grid(epsilons, "eps")
        if int(n_noise) < 1:
            raise ConfigError(f"n_noise must be >= 1, got {n_noise!r}.")
        self.n_noise = int(n_noise)
        self.seed = int(seed)
        self.val_split = check_open_fraction(val_split, "val_split")

    @property
    def tunes_on_ood(self) -> bool:  # type: ignore[override]
        return self.combine == "lr" or self.tune_eps

    def _untuned_hint(self) -> str:
        return "use combine='mean-z' (OOD-agnostic layer ensemble) or a single layer, with tune_eps=False and a fixed eps=."

    # ------------------------------------------------------------------ fitting
    def fit_requests(self) -> list[Request]:
        return []

    def _noise_pixels(self, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.noise == "code":
            return (torch.randint(0, 256, (self.n_noise, *shape), generator=g).float() - 127.5) / 255.0
        return torch.rand((self.n_noise, *shape), generator=g)

    def _fit(self, signals: Signals, *, ood_val: Signals | None, id_val: Signals | None) -> None:
        probe = signals.probe
        if probe is None:
            raise InputError("FSSD runs the model on noise and on perturbed inputs: build the signals with "
                             "probe.signals(data), not from arrays.")
        signals.warm_up()
        layers = list(self.layers) if self.layers is not None else probe.default_layers() + ["logits"]
        if not layers:
            raise ConfigError("FSSD found no layers to tap: pass layers=[module names].")
        if self.combine not in ("mean-z", "lr") and self.combine not in layers:
            raise ConfigError(f"combine={self.combine!r} is neither 'mean-z', 'lr' nor one of the layers {layers}.")
        self.layers_ = tuple(layers)
        noise = self._noise_pixels(tuple(probe.input_shape))
        x = (noise if self.noise == "code" else probe.to_model_space(noise)).to(probe.device, probe.dtype)
        out = probe.forward(x, self.layers_, validate=False)
        self.centers_ = tuple(flat(out.taps[k]).double().mean(dim=0).cpu() for k in self.layers_)
        self.eps_ = self.eps
        if self.tune_eps:
            assert ood_val is not None
            self.eps_ = self._select_eps(id_val if id_val is not None else signals, ood_val)
        self.combiner_ = LayerCombiner(self.combine, self.layers_, seed=self.seed)
        self.combiner_.fit(self._request(self.eps_), fit=signals, id_val=id_val, ood_val=ood_val)

    def _request(self, eps: float) -> SingularityDistances:
        return SingularityDistances(self.layers_, self.centers_, eps, self.perturb_mode)

    def _select_eps(self, id_val: Signals, ood_val: Signals) -> float:
        """Fit the combiner on one half of the validation splits per eps, keep the eps with the best AUROC on
        the other half (the official code's val_for_train / val_for_test protocol)."""
        from ..metrics import auroc

        grid = [self._request(eps) for eps in self.epsilons]
        id_val.require(grid)  # one pass per split for the whole grid; the halves index the results
        ood_val.require(grid)

        def auroc_of(eps: float, id_a: Signals, id_b: Signals, ood_a: Signals, ood_b: Signals) -> float:
            r = self._request(eps)
            comb = LayerCombiner(self.combine, self.layers_, seed=self.seed).fit(r, fit=id_a, id_val=id_a,
                                                                                 ood_val=ood_a)
            return auroc(comb.transform(id_b.get(r)).numpy(), comb.transform(ood_b.get(r)).numpy())

        return select_on_halves(self.epsilons, id_val, ood_val, share=self.val_split, seed=self.seed,
                                auroc_of=auroc_of)

    # ------------------------------------------------------------------ scoring
    def requests(self) -> list[Request]:
        return [self._request(self.eps_)]

    def layer_scores(self, signals: Signals) -> torch.Tensor:
        """``N x L`` per-layer FSSD values (higher = more ID)."""
        self._check_fitted()
        return signals.get(self._request(self.eps_))

    def _score(self, signals: Signals) -> torch.Tensor:
        return self.combiner_.transform(signals.get(self._request(self.eps_)))


register_variant("fssd-lr", FSSD, combine="lr")
register_variant("fssd-lr-eps", FSSD, combine="lr", tune_eps=True)

