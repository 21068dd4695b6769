"""Mahalanobis distance to class-conditional Gaussians with a tied covariance (Lee et al., NeurIPS 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..signals import FEATURES, Request, Signals
from .base import Detector, register


@dataclass
class TiedGaussian:
    """Class means and the shared precision of one layer's features, in float64."""

    means: torch.Tensor  # C x D
    precision: torch.Tensor  # D x D

    @classmethod
    def fit(cls, feats: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None) -> "TiedGaussian":
        """Means per class and ``Sigma = (1/N) sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T``
        (sklearn ``EmpiricalCovariance`` on class-centred features; precision by ``pinvh``, as sklearn)."""
        f = feats.double()
        y = labels.long()
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


def _labels(signals: Signals) -> torch.Tensor:
    y = signals.labels
    if y is None:
        raise InputError(
            f"Mahalanobis fits class means on true labels, but {signals.name!r} has none: pass a loader yielding "
            "(x, y), a tuple (inputs, labels), or Signals.from_arrays(..., labels=...)."
        )
    return y


@register("mahalanobis")
class Mahalanobis(Detector):
    """Mahalanobis on penultimate features (Lee et al., NeurIPS 2018; OpenOOD's "MDS" / ViM's benchmark form).

    Fit: class means ``mu_c`` from ID training features with their TRUE labels and one tied covariance
    (float64). Score ``max_c -(h - mu_c)^T Sigma^-1 (h - mu_c)``; higher = more ID. Inputs: penultimate
    features + labels at fit time. No hyperparameters (single layer, no input preprocessing, no ensemble;
    those are in ``mahalanobis-ensemble``).
    """

    paper = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks, NeurIPS 2018"
    signals = ("features",)
    fits_on_id = True

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        self.gaussian_ = TiedGaussian.fit(signals.features, _labels(signals))
        self.n_classes_ = self.gaussian_.means.shape[0]

    def _score(self, signals: Signals) -> torch.Tensor:
        return -self.gaussian_.sqdists(signals.features).amin(dim=1)
