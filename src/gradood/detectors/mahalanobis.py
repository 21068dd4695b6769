"""Mahalanobis distance to class-conditional Gaussians with a tied covariance (Lee et al., NeurIPS 2018)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..signals import FEATURES, ProbeBatch, Request, Signals, Tap, position_mean, sequence_mask, tensor_digest
from ._ensemble import LayerCombiner, select_on_halves
from .._passes import batch_input_grad
from ._perturb import input_grad, pred_ce, step
from . import _papers
from . import _hyperparams as hp
from ._checks import (check_label_values, class_labels, constant_units, covariance_rank, pending_samples,
                      warn_degenerate, warn_if_costly)
from .base import Detector, register, register_variant


@dataclass
class TiedGaussian:
    """Class means and the shared precision of one layer's features, in float64."""

    means: torch.Tensor  # C x D
    precision: torch.Tensor  # D x D

    @classmethod
    def fit(cls, feats: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None, *, ridge: float = 0.0,
            who: str = "Mahalanobis", data: str = "the ID fit data", fix: str = "") -> "TiedGaussian":
        """Means per class and ``Sigma = (1/N) sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T``
        (sklearn ``EmpiricalCovariance`` on class-centred features; precision by ``pinvh``, as sklearn).

        ``ridge > 0`` inverts ``Sigma + ridge * (tr Sigma / D) * I`` instead (a ridge relative to the mean
        variance). With ``ridge = 0`` a rank-deficient Sigma (dead units, N <= D) is pseudo-inverted and a
        :class:`DegenerateFitWarning` names the rank: the distances then ignore the directions in which the
        ID features never vary."""
        f = feats.double()
        y = labels.long()
        check_label_values(y, who, data, n_classes)
        C = int(n_classes if n_classes is not None else int(y.max()) + 1)
        counts = torch.bincount(y, minlength=C)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            raise InputError(
                f"the ID fit data has no samples of classes {missing[:10]}: Mahalanobis needs every class's mean. "
                "Fit on data covering all classes."
            )
        means = torch.zeros(C, f.shape[1], dtype=torch.float64).index_add_(0, y, f) / counts[:, None].double()
        centred = f - means[y]
        cov = centred.T @ centred / f.shape[0]
        if ridge == 0:
            _warn_if_rank_deficient(cov, f.shape[0], constant_units(f), who, data, C, fix)
        return cls.from_moments(means, cov, ridge=ridge)

    @classmethod
    def from_moments(cls, means: torch.Tensor, cov: torch.Tensor, *, ridge: float = 0.0) -> "TiedGaussian":
        """The Gaussian of class means (``C x D``) and a tied covariance (``D x D``): :meth:`fit` and the fit
        from shards (:mod:`gradood.stream`) both end here."""
        if ridge > 0:
            eye = torch.eye(cov.shape[0], dtype=cov.dtype)
            return cls(means=means, precision=torch.linalg.inv(cov + ridge * cov.diagonal().mean() * eye))
        return cls(means=means, precision=torch.linalg.pinv(cov, hermitian=True))

    def sqdists(self, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """``N x C`` squared Mahalanobis distances to every class mean."""
        P, mu = self.precision, self.means
        mu_p = mu @ P
        mu_p_mu = (mu_p * mu).sum(dim=1)
        out = []
        for s in range(0, feats.shape[0], chunk):
            f = feats[s: s + chunk].double()
            fPf = ((f @ P) * f).sum(dim=1, keepdim=True)
            out.append((fPf - 2.0 * f @ mu_p.T + mu_p_mu).clamp_min_(0.0))
        return torch.cat(out)


def _warn_if_rank_deficient(cov: torch.Tensor, N: int, dead: int, who: str, data: str, n_classes: int,
                            fix: str = "") -> None:
    """Warn when the tied covariance of ``N`` samples has rank below its dimension; ``dead`` = constant units."""
    D = cov.shape[0]
    rank = covariance_rank(cov)
    if rank >= D:
        return
    why = (f"{dead} of {D} units are constant (dead) on these samples" if dead else
           f"N = {N} samples in {n_classes} classes span at most {max(N - n_classes, 0)} dimensions" if N - n_classes < D
           else "the features are linearly dependent")
    warn_degenerate(
        f"{who}: the tied covariance of {data} has rank {rank} < D = {D} ({why}). gradood pseudo-inverts it, as "
        f"scikit-learn's EmpiricalCovariance and the official code do: distances ignore the {D - rank} directions in "
        "which the ID features never vary, so a sample that differs from ID only there is not penalised (a ridge, "
        "as pytorch-ood uses, would penalise it heavily; the two rankings can differ). "
        + (fix or "To avoid it: features without constant units, or more fit samples."),
        stacklevel=6,
    )


def _check_layer_width(layer: str, activation: torch.Tensor, gauss: TiedGaussian, is_sequence: bool = False) -> None:
    """Gaussians fitted on one model's layer cannot score another model's layer of another width (it would fail
    inside torch with "size mismatch")."""
    width = activation.shape[-1] if is_sequence else spatial_mean(activation).shape[1]
    if width != gauss.means.shape[1]:
        raise InputError(
            f"the Mahalanobis ensemble was fitted on a model whose layer {layer!r} has {gauss.means.shape[1]} "
            f"channels, but the model these signals come from gives {width}: score with the model it was fitted on, "
            "or refit on this model's ID data."
        )


def _labels(signals: Signals, who: str = "Mahalanobis") -> torch.Tensor:
    """The checked true labels of ``signals`` (see :func:`~gradood.detectors._checks.class_labels`)."""
    return class_labels(signals, who)


@register("mahalanobis")
class Mahalanobis(Detector):
    """Mahalanobis on penultimate features (Lee et al., NeurIPS 2018; OpenOOD's "MDS" / ViM's benchmark form).

    Fit: class means ``mu_c`` from ID training features with their TRUE labels and one tied covariance
    (float64). Score ``max_c -(h - mu_c)^T Sigma^-1 (h - mu_c)``; higher = more ID. Inputs: penultimate
    features + labels at fit time (class indices; unlabelled ``-1`` samples are refused).

    Hyperparameters: ``ridge`` (0.0): 0 pseudo-inverts the covariance (scikit-learn's ``EmpiricalCovariance``,
    Lee et al.'s code, OpenOOD); a rank-deficient covariance (dead units, N <= D) then warns with its rank,
    since distances ignore the directions the ID features never vary in. ``ridge > 0`` inverts
    ``Sigma + ridge * (tr Sigma / D) I`` (pytorch-ood adds a fixed 1e-6 to the unnormalised scatter matrix),
    which penalises those directions instead. Single layer, no input preprocessing, no ensemble: those are in
    ``mahalanobis-ensemble``.
    """

    paper = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks, NeurIPS 2018"
    citation = _papers.MAHALANOBIS
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"ridge": hp.non_negative()}

    def __init__(self, ridge: float = 0.0) -> None:
        self.ridge = ridge

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        y = class_labels(signals, "mahalanobis")
        self.gaussian_ = TiedGaussian.fit(signals.features, y, ridge=self.ridge, fix=(
                                              "To choose the ridge form, pass ridge=1e-6 (Sigma + ridge * mean variance"
                                              " * I); or use features without constant units, or more fit samples."),
                                          who="mahalanobis", data=f"{signals.name!r} (penultimate features)")

    def _score(self, signals: Signals) -> torch.Tensor:
        return -self.gaussian_.sqdists(signals.features).amin(dim=1)


# ---------------------------------------------------------------------- multi-layer, preprocessing, ensemble

#: Lee et al.'s noise magnitudes
MAHALANOBIS_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def spatial_mean(a: torch.Tensor, x: Any = None) -> torch.Tensor:
    """Lee et al.'s per-layer feature: the mean over positions (``B x channels``): the spatial dims of a map,
    the real tokens of a transformer's ``B x T x H`` activation when ``x`` are the token inputs."""
    return position_mean(x, a)


def closest_class_sqdist(g: TiedGaussian, f: torch.Tensor) -> torch.Tensor:
    """Differentiable ``min_c (f - mu_c)^T P (f - mu_c)`` at the class closest to each sample."""
    f = f.double()
    with torch.no_grad():
        c = g.sqdists(f.detach()).argmin(dim=1)
    d = f - g.means[c]
    return ((d @ g.precision) * d).sum(dim=1)


@dataclass(frozen=True, eq=False)
class MahalanobisScores(Request):
    """``-min_c d^2_c`` per layer at the preprocessed input ``x - eps sign(grad_x 1/2 d^2_c_hat(x)) / std``,
    ``B x L``. With ``fgsm_step > 0`` the input is first moved by FGSM (``+step sign(grad_x CE(f(x), y_hat))``),
    which makes OOD-free negatives from ID data (the GradNorm repo's variant)."""

    layers: tuple[str, ...]
    gaussians: tuple[TiedGaussian, ...] = field(repr=False)
    eps: float = 0.0
    fgsm_step: float = 0.0

    @property
    def taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.layers

    @property
    def key(self) -> str:
        digest = tensor_digest(*[t for g in self.gaussians for t in (g.means, g.precision)])
        return f"mahalanobis:{','.join(self.layers)}:{digest}:eps={self.eps:g}:fgsm={self.fgsm_step:g}"

    @property
    def shares_input_grad(self) -> bool:
        """Input gradients at the unperturbed input come from the pass's shared forward (one forward fewer)."""
        return self.eps > 0 or self.fgsm_step > 0

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        probe, x, taps = batch.probe, batch.x, batch.taps
        if self.fgsm_step > 0:
            g = batch_input_grad(batch, lambda f, _t: pred_ce(f, 1.0))
            x = step(probe, x, g, self.fgsm_step, direction=+1.0)
            taps = probe.forward(x, self.layers, validate=False).taps
        cols = []
        for layer, gauss in zip(self.layers, self.gaussians):
            _check_layer_width(layer, taps[layer], gauss, sequence_mask(x, taps[layer]) is not None)
            if self.eps == 0:
                f = spatial_mean(taps[layer], x)
            else:
                dist = lambda _f, t, L=layer, G=gauss: 0.5 * closest_class_sqdist(G, spatial_mean(t[L], x))  # noqa: E731
                g = (batch_input_grad(batch, dist, taps=(layer,)) if self.fgsm_step == 0
                     else input_grad(probe, x, dist, taps=(layer,)))  # at the FGSM input: a forward of its own
                xp = step(probe, x, g, self.eps, direction=-1.0)
                f = spatial_mean(probe.forward(xp, (layer,), validate=False).taps[layer], x)
            cols.append(-gauss.sqdists(f).amin(dim=1))
        return torch.stack(cols, dim=1)


@register("mahalanobis-ensemble")
class MahalanobisEnsemble(Detector):
    """Multi-layer Mahalanobis with input preprocessing and a feature ensemble (Lee et al., NeurIPS 2018).

    Per layer l: feature = spatial mean of the layer's output; class means (true labels) and a tied covariance
    fitted on ID training data; ``M_l(x) = max_c -(f_l - mu_c)^T Sigma_l^-1 (f_l - mu_c)`` at the preprocessed
    input ``x - eps * sign(grad_x 1/2 d^2_closest(x)) / std``. Layers are combined by ``combine``. Higher = more ID.
    Inputs: layer activations, input gradients (eps > 0), labels at fit time.

    Hyperparameters:

    * ``layers``: module names (None = the probe's default activation layers plus the penultimate features);
    * ``eps`` (0.0) or ``tune_eps=True`` to choose it from ``epsilons`` (Lee et al.'s grid) on the validation
      split (fit the ensemble on one half, select on the other);
    * ``combine``: "lr" (default; logistic regression on per-layer scores), "mean-z" (OOD-agnostic), or a
      layer name;
    * ``negatives``: "ood" (default; the LR contrasts ID validation with OOD validation data -- OOD-tuned, as
      in the paper) or "fgsm" (OOD-free: FGSM-perturbed ID validation samples with step ``fgsm_step`` 0.05,
      the GradNorm repo's variant);
    * ``seed`` (0), ``val_split`` (0.5).
    """

    paper = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks, NeurIPS 2018"
    citation = _papers.MAHALANOBIS
    signals = ("taps", "input-grads")
    fits_on_id = True
    needs_model = True

    hyperparams = {"eps": hp.non_negative(), "epsilons": hp.reals(low=0), "combine": hp.text(),
                   "negatives": hp.choice("ood", "fgsm"), "fgsm_step": hp.non_negative(), "seed": hp.SEED,
                   "val_split": hp.real(low=0, high=1, low_open=True, high_open=True)}

    def __init__(self, layers: Sequence[str] | None = None, eps: float = 0.0, tune_eps: bool = False,
                 epsilons: Sequence[float] = MAHALANOBIS_EPSILONS, combine: str = "lr", negatives: str = "ood",
                 fgsm_step: float = 0.05, seed: int = 0, val_split: float = 0.5) -> None:
        self.layers = None if layers is None else tuple(layers)
        self.eps = eps
        self.tune_eps = tune_eps
        self.epsilons = tuple(epsilons)
        self.combine = combine
        self.negatives = negatives
        self.fgsm_step = fgsm_step
        self.seed = seed
        self.val_split = val_split

    @property
    def tunes_on_ood(self) -> bool:  # type: ignore[override]
        uses_val = self.combine == "lr" or self.tune_eps
        return uses_val and self.negatives == "ood"

    def _untuned_hint(self) -> str:
        return ("use negatives='fgsm' (FGSM-perturbed ID samples instead of OOD data) or combine='mean-z', "
                "with tune_eps=False and a fixed eps=.")

    def _resolve_layers(self, signals: Signals) -> tuple[str, ...]:
        if self.layers is not None:
            return self.layers
        if signals.probe is None:
            raise InputError("the Mahalanobis ensemble runs the model: build the signals with probe.signals(data).")
        signals.warm_up()
        return tuple(signals.probe.default_layers()) + ("features",)

    def fit_requests(self) -> list[Request]:
        return []

    def _fit(self, signals: Signals, *, ood_val: Signals | None, id_val: Signals | None) -> None:
        self.layers_ = self._resolve_layers(signals)
        labels = class_labels(signals, self.label)
        signals.require([Tap(layer, "mean") for layer in self.layers_])
        self.gaussians_ = tuple(TiedGaussian.fit(signals.get(Tap(layer, "mean")), labels, who=self.label,
                                                 data=f"{signals.name!r} at layer {layer!r}",
                                                 fix=f"To avoid it: layers= without {layer!r}, or more fit samples.")
                                for layer in self.layers_)
        self.eps_ = float(self.eps)
        id_v = id_val if id_val is not None else signals
        if self.tune_eps:
            self.eps_ = self._select_eps(id_v, ood_val)
        self.combiner_ = self._fit_combiner(self.eps_, signals, id_v, ood_val)

    def _request(self, eps: float, fgsm: float = 0.0) -> MahalanobisScores:
        return MahalanobisScores(self.layers_, self.gaussians_, eps, fgsm)

    def _fit_combiner(self, eps: float, fit: Signals, id_v: Signals, ood_v: Signals | None) -> LayerCombiner:
        r = self._request(eps)
        negatives = id_v.get(self._request(eps, self.fgsm_step)) if self.negatives == "fgsm" else None
        comb = LayerCombiner(self.combine, self.layers_, seed=self.seed)
        return comb.fit(r, fit=fit, id_val=id_v, ood_val=ood_v, negatives=negatives)

    def _select_eps(self, id_val: Signals, ood_val: Signals | None) -> float:
        from ..metrics import auroc

        epsilons = tuple(float(e) for e in self.epsilons)
        grid = [self._request(eps) for eps in epsilons]
        if self.negatives == "fgsm":
            grid += [self._request(eps, self.fgsm_step) for eps in epsilons]
        self._warn_cost(grid, epsilons, id_val, ood_val)
        id_val.require(grid)  # one pass for the whole grid; the halves index the results
        if self.negatives == "ood":
            assert ood_val is not None
            ood_val.require(grid)

        def auroc_of(eps: float, id_a: Signals, id_b: Signals, ood_a: Signals | None, ood_b: Signals | None) -> float:
            r = self._request(eps)
            comb = self._fit_combiner(eps, id_a, id_a, ood_a)
            neg = ood_b.get(r) if ood_b is not None else id_b.get(self._request(eps, self.fgsm_step))
            return auroc(comb.transform(id_b.get(r)).numpy(), comb.transform(neg).numpy())

        return select_on_halves(epsilons, id_val, ood_val if self.negatives == "ood" else None,
                                share=self.val_split, seed=self.seed, auroc_of=auroc_of)

    def _warn_cost(self, grid: list[Request], epsilons: tuple[float, ...], id_val: Signals,
                   ood_val: Signals | None) -> None:
        """Per nonzero eps and layer: an input gradient (forward + backward) and a forward at the perturbed
        input; FGSM negatives add the FGSM step (forward + backward + forward) per eps."""
        L = len(self.layers_)
        per = sum(3 * L for e in epsilons if e > 0)
        if self.negatives == "fgsm":
            per += sum(3 + 3 * L * (e > 0) for e in epsilons)
        splits = [id_val] + ([ood_val] if self.negatives == "ood" else [])
        warn_if_costly(self.label, f"the eps grid ({len(epsilons)} values) over {L} layers", pending_samples(
            splits, grid[-1]), per, "Pass a smaller id_val= split, fewer epsilons= or a fixed eps= with "
            "tune_eps=False.", timing_from=id_val)

    def requests(self) -> list[Request]:
        return [self._request(self.eps_)]

    def _score(self, signals: Signals) -> torch.Tensor:
        return self.combiner_.transform(signals.get(self._request(self.eps_)))


register_variant("mahalanobis-ensemble-tuned", MahalanobisEnsemble, tune_eps=True)
register_variant("mahalanobis-ensemble-fgsm", MahalanobisEnsemble, negatives="fgsm")
register_variant("mahalanobis-multilayer", MahalanobisEnsemble, combine="mean-z")
