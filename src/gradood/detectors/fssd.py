"""FSSD: Feature Space Singularity Distance (Huang et al., 2020; docs/methods.md 2.8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ConfigError, InputError, NotApplicableError
from ..signals import ProbeBatch, Request, Signals, tensor_digest
from . import _hyperparams as hp
from ._checks import pending_samples, warn_if_costly
from ._ensemble import LayerCombiner, select_on_halves
from .._passes import batch_input_grad
from ._perturb import batch_rows, shift, step
from . import _papers
from .base import Detector, register, register_variant

#: the official code's epsilon grid (the paper's is 0 to 0.2 in steps of 0.01)
FSSD_CODE_EPSILONS = (0.2, 0.18, 0.16, 0.14, 0.12, 0.1, 0.08, 0.06, 0.04, 0.02, 0.01, 0.008, 0.006, 0.004,
                      0.002, 0.001, 0.0008, 0.0006, 0.0004, 0.0002, 0.0001, 0.0)
FSSD_PAPER_EPSILONS = tuple(round(0.01 * i, 2) for i in range(21))
#: gradood's default tuning grid: 5 values over the same range, so tuning finishes in minutes on a CPU
FSSD_DEFAULT_EPSILONS = (0.0, 0.001, 0.005, 0.02, 0.1)
#: named eps grids (``grid=``): "default", "paper" (0 to 0.2 step 0.01, the paper's text), "code" (the
#: official code's 22 values)
FSSD_GRIDS = {"default": FSSD_DEFAULT_EPSILONS, "paper": FSSD_PAPER_EPSILONS, "code": FSSD_CODE_EPSILONS}


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
            self._check_size(layer, batch.taps[layer], c)
            if self.eps == 0:
                feats = batch.taps[layer]
            else:
                xp = self._perturbed(batch, layer, c)
                feats = batch.probe.forward(xp, (layer,), validate=False).taps[layer]
            cols.append((flat(feats).double() - c.to(feats.device)).norm(dim=1))
        return torch.stack(cols, dim=1)

    @staticmethod
    def _check_size(layer: str, feats: torch.Tensor, c: torch.Tensor) -> None:
        """The singularity was fitted on one model's layer: another model's layer of another size cannot be
        compared with it (it would fail deep inside torch with "size of tensor a must match")."""
        size = flat(feats).shape[1]
        if size != c.numel():
            raise InputError(
                f"FSSD was fitted on a model whose layer {layer!r} has {c.numel()} values per sample, but the model "
                f"these signals come from gives {size} (shape {tuple(feats.shape[1:])}): score with the model FSSD "
                "was fitted on, or refit FSSD on this model's ID data."
            )

    def _perturbed(self, batch: ProbeBatch, layer: str, c: torch.Tensor) -> torch.Tensor:
        dist = lambda _f, taps: (flat(taps[layer]) - c.to(taps[layer].device, taps[layer].dtype)).norm(dim=1)  # noqa: E731
        if self.mode == "paper":
            g = batch_input_grad(batch, dist, taps=(layer,))
            return step(batch.probe, batch.x, g, self.eps, direction=+1.0)
        n = batch_rows(batch.x)
        g = batch_input_grad(batch, lambda f, t: -dist(f, t) / n, taps=(layer,))
        g = (g - g.mean()) / g.std().clamp_min(1e-12)
        return shift(batch.probe, batch.x, self.eps * g)


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
      ``epsilons`` -- OOD-tuned. ``grid`` names the eps grid used when ``epsilons`` is None: "default"
      (0, 0.001, 0.005, 0.02, 0.1: minutes on a CPU), "paper" (0 to 0.2 step 0.01) or "code" (the official
      code's 22 values). Without ``id_val=`` the grid runs on every ID fit sample; above 200 000
      sample-passes a warning gives the estimated time first.
    * ``n_noise`` (100), ``seed`` (0), ``val_split`` (0.5: with lr + tune_eps, the share of the validation
      split that fits the LR; the rest selects eps, as in the official code).
    """

    paper = "Huang et al., Feature Space Singularity for Out-of-Distribution Detection, SafeAI 2021 (arXiv 2011.14654)"
    citation = _papers.FSSD
    signals = ("taps", "input-grads")
    fits_on_id = True
    needs_model = True

    hyperparams = {"noise": hp.choice("code", "normalized"), "combine": hp.text(), "eps": hp.non_negative(),
                   "perturb_mode": hp.choice("paper", "code"), "epsilons": hp.reals(low=0, none=True),
                   "n_noise": hp.integer(minimum=1), "seed": hp.SEED,
                   "val_split": hp.real(low=0, high=1, low_open=True, high_open=True), "grid": hp.choice(*FSSD_GRIDS)}

    def __init__(self, layers: Sequence[str] | None = None, noise: str = "code", combine: str = "mean-z",
                 eps: float = 0.0, perturb_mode: str = "paper", tune_eps: bool = False,
                 epsilons: Sequence[float] | None = None, n_noise: int = 100, seed: int = 0,
                 val_split: float = 0.5, grid: str = "default") -> None:
        self.layers = None if layers is None else tuple(layers)
        self.noise = noise
        self.combine = combine
        self.eps = eps
        self.perturb_mode = perturb_mode
        self.tune_eps = tune_eps
        self.epsilons = None if epsilons is None else tuple(epsilons)
        self.n_noise = n_noise
        self.seed = seed
        self.val_split = val_split
        self.grid = grid

    def eps_grid(self) -> tuple[float, ...]:
        """The eps values ``tune_eps=True`` searches: ``epsilons`` if given, else the named ``grid``."""
        return tuple(float(e) for e in (FSSD_GRIDS[self.grid] if self.epsilons is None else self.epsilons))

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

    def _noise_inputs(self, probe: Any) -> Any:
        """The uniform-noise inputs whose features define the singularity, shaped like the model's inputs
        (for a dict input such as ``{"pixel_values": ...}``, under its only key)."""
        from ..probe import EMBEDDINGS

        target = probe.perturbation_target(probe._example)
        if target == EMBEDDINGS or (target is not None and len(probe._example) != 1):
            raise NotApplicableError(
                "FSSD needs image-like inputs: its singularity is the mean feature map of uniform-noise inputs, "
                "and there is no uniform noise over token ids (nor fixed-size feature maps over sequences of "
                f"varying length). The inputs here are {sorted(probe._example) if isinstance(probe._example, dict) else 'token ids'}; "
                "use another detector (e.g. mahalanobis, knn, vim, grodin) for text models."
            )
        shape = probe.input_shape if target is None else probe.input_shape[target]
        noise = self._noise_pixels(tuple(shape))
        x = (noise if self.noise == "code" else probe.to_model_space(noise)).to(probe.device, probe.dtype)
        return x if target is None else {target: x}

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
        x = self._noise_inputs(probe)
        out = probe.forward(x, self.layers_, validate=False)
        self.centers_ = tuple(flat(out.taps[k]).double().mean(dim=0).cpu() for k in self.layers_)
        self.eps_ = float(self.eps)
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

        epsilons = self.eps_grid()
        grid = [self._request(eps) for eps in epsilons]
        warn_if_costly(self.label, f"the eps grid ({len(epsilons)} values) over {len(self.layers_)} layers",
                       pending_samples([id_val, ood_val], grid[-1]),
                       3 * len(self.layers_) * sum(e > 0 for e in epsilons),
                       "Pass id_val= (a smaller ID validation split; without it the grid runs on every ID fit "
                       "sample), grid='default', fewer epsilons= or a fixed eps= with tune_eps=False.",
                       timing_from=id_val)
        id_val.require(grid)  # one pass per split for the whole grid; the halves index the results
        ood_val.require(grid)

        def auroc_of(eps: float, id_a: Signals, id_b: Signals, ood_a: Signals, ood_b: Signals) -> float:
            r = self._request(eps)
            comb = LayerCombiner(self.combine, self.layers_, seed=self.seed).fit(r, fit=id_a, id_val=id_a,
                                                                                 ood_val=ood_a)
            return auroc(comb.transform(id_b.get(r)).numpy(), comb.transform(ood_b.get(r)).numpy())

        return select_on_halves(epsilons, id_val, ood_val, share=self.val_split, seed=self.seed,
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

