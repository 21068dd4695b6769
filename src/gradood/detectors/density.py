"""Gaussian densities on the penultimate features: RMD (relative Mahalanobis), GEM (Gaussian energy) and a
Gaussian mixture (scikit-learn's ``GaussianMixture``). Higher = more in-distribution for all.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from ..signals import FEATURES, Request, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register
from .mahalanobis import TiedGaussian, _labels


@register("rmd")
class RMD(Detector):
    """Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, 2021,
    "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", https://arxiv.org/abs/2106.09022).

    Fit: class means and a tied covariance (as :class:`~gradood.detectors.mahalanobis.Mahalanobis`, TRUE
    labels) plus one background Gaussian ``N(mu_0, Sigma_0)`` of all ID fit features regardless of class.
    ``RMD_k(h) = MD_k(h) - MD_0(h)`` (squared Mahalanobis distances); score ``-min_k RMD_k(h)``; higher = more
    ID. Inputs: penultimate features (+ labels at fit). Fitted state: ``gaussian_``, ``background_``.
    No hyperparameters.
    """

    paper = "Ren et al., A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection, arXiv 2106.09022, 2021"
    citation = _papers.RMD
    signals = ("features",)
    fits_on_id = True

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h = signals.features
        self.gaussian_ = TiedGaussian.fit(h, _labels(signals))
        self.background_ = TiedGaussian.fit(h, torch.zeros(len(h), dtype=torch.long), n_classes=1)

    def _score(self, signals: Signals) -> torch.Tensor:
        h = signals.features
        return -(self.gaussian_.sqdists(h).amin(dim=1) - self.background_.sqdists(h)[:, 0])


@register("gem")
class GEM(Detector):
    """GEM: Gaussian mixture energy (Morteza & Li, AAAI 2022, "Provable Guarantees for Understanding
    Out-of-distribution Detection", https://arxiv.org/abs/2112.00787).

    Fit: class means ``mu_k`` and a tied covariance ``Sigma`` (TRUE labels, as Mahalanobis). Score
    ``log sum_k exp(-1/2 (h - mu_k)^T Sigma^-1 (h - mu_k))``; higher = more ID. Inputs: penultimate features
    (+ labels at fit). Fitted state: ``gaussian_``. No hyperparameters.
    """

    paper = "Morteza & Li, Provable Guarantees for Understanding Out-of-distribution Detection, AAAI 2022"
    citation = _papers.GEM
    signals = ("features",)
    fits_on_id = True

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        self.gaussian_ = TiedGaussian.fit(signals.features, _labels(signals))

    def _score(self, signals: Signals) -> torch.Tensor:
        return torch.logsumexp(-0.5 * self.gaussian_.sqdists(signals.features), dim=1)


COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@register("gmm")
class GMM(Detector):
    """Gaussian mixture model on penultimate features: the density baseline of OpenOOD's "GMM" postprocessor
    (after Lee et al., NeurIPS 2018, which models features by Gaussians), fitted by EM with scikit-learn's
    ``GaussianMixture`` (Dempster, Laird & Rubin, JRSS-B 1977).

    Fit: features are first projected on their top ``reduce_dim`` principal components (scikit-learn ``PCA``
    on the ID fit features; skipped when D <= ``reduce_dim``), which keeps full-covariance EM cheap
    (O(N M d^2) per iteration); then ``GaussianMixture(n_components, covariance_type, reg_covar,
    random_state=seed)`` on them (no labels). Score: the log-likelihood ``log sum_m pi_m N(z; mu_m, Sigma_m)``
    of the projected features (sklearn's ``score_samples``, evaluated here in torch from the fitted
    parameters); higher = more ID. Inputs: penultimate features. Fitted state: ``pca_mean_`` and
    ``pca_components_`` (None without reduction), ``weights_``, ``means_``, ``precisions_cholesky_``,
    ``covariance_type_``. Hyperparameters: ``n_components`` (None = the number of classes),
    ``covariance_type`` ("full"), ``reduce_dim`` (50; None = no reduction), ``reg_covar`` (1e-6, sklearn's),
    ``max_iter`` (100), ``seed`` (0).
    """

    paper = ("OpenOOD's GMM postprocessor (Yang et al., NeurIPS 2022 D&B, https://arxiv.org/abs/2210.07242); "
             "EM: Dempster, Laird & Rubin, JRSS-B 1977")
    citation = _papers.OPENOOD
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"n_components": hp.integer(minimum=1, none=True), "covariance_type": hp.choice(*COVARIANCE_TYPES),
                   "reduce_dim": hp.integer(minimum=1, none=True), "reg_covar": hp.non_negative(),
                   "max_iter": hp.integer(minimum=1), "seed": hp.SEED}

    def __init__(self, n_components: int | None = None, covariance_type: str = "full", reduce_dim: int | None = 50,
                 reg_covar: float = 1e-6, max_iter: int = 100, seed: int = 0) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reduce_dim = reduce_dim
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.seed = seed

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        h = signals.features.double().numpy()
        self.pca_mean_ = self.pca_components_ = None
        if self.reduce_dim is not None and self.reduce_dim < h.shape[1]:
            if self.reduce_dim > len(h):
                raise InputError(f"gmm reduce_dim={self.reduce_dim} exceeds the {len(h)} ID fit samples: lower "
                                 "reduce_dim or fit on more data.")
            # eigh of the D x D covariance: N >> D here, and a full SVD of the N x D matrix is 10x slower
            with threadpool_limits(limits=1):
                pca = PCA(n_components=self.reduce_dim, svd_solver="covariance_eigh").fit(h)
            self.pca_mean_ = torch.from_numpy(pca.mean_).double()
            self.pca_components_ = torch.from_numpy(pca.components_).double()
            h = pca.transform(h)
        m = self.n_components if self.n_components is not None else signals.known_num_classes()
        if m is None:
            m = signals.logits.shape[1]
        if m > len(h):
            raise InputError(f"gmm n_components={m} exceeds the {len(h)} ID fit samples: lower n_components or fit "
                             "on more data.")
        gm = GaussianMixture(n_components=m, covariance_type=self.covariance_type, reg_covar=self.reg_covar,
                             max_iter=self.max_iter, random_state=self.seed)
        # EM on (N x d<=50) runs many tiny BLAS / OpenMP calls: more threads only add contention (12x slower on a
        # 2-core machine), so one thread (threadpoolctl ships with scikit-learn)
        with threadpool_limits(limits=1):
            gm.fit(h)
        self.weights_ = torch.from_numpy(gm.weights_).double()
        self.means_ = torch.from_numpy(gm.means_).double()
        self.precisions_cholesky_ = torch.from_numpy(np.asarray(gm.precisions_cholesky_)).double()
        self.covariance_type_ = self.covariance_type
        self.converged_ = bool(gm.converged_)

    def _score(self, signals: Signals, chunk: int = 1024) -> torch.Tensor:
        h = signals.features.double()
        if self.pca_components_ is not None:
            h = (h - self.pca_mean_) @ self.pca_components_.T
        return torch.cat([gmm_log_likelihood(h[s: s + chunk], self.weights_, self.means_, self.precisions_cholesky_,
                                             self.covariance_type_) for s in range(0, len(h), chunk)])


def gmm_log_likelihood(h: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor,
                       covariance_type: str) -> torch.Tensor:
    """``log sum_m pi_m N(h; mu_m, Sigma_m)`` from Cholesky factors of the precisions (``P = L L^T``), for the
    four covariance parametrisations of scikit-learn."""
    N, D = h.shape
    M = means.shape[0]
    if covariance_type == "full":  # prec_chol: M x D x D
        logdet = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(dim=1)
        y = torch.einsum("nd,mde->nme", h, prec_chol) - torch.einsum("md,mde->me", means, prec_chol)[None]
        maha = y.pow(2).sum(dim=2)
    elif covariance_type == "tied":  # D x D
        logdet = torch.log(torch.diagonal(prec_chol)).sum().expand(M)
        y = (h @ prec_chol)[:, None, :] - (means @ prec_chol)[None]
        maha = y.pow(2).sum(dim=2)
    elif covariance_type == "diag":  # M x D
        logdet = torch.log(prec_chol).sum(dim=1)
        y = h[:, None, :] * prec_chol[None] - (means * prec_chol)[None]
        maha = y.pow(2).sum(dim=2)
    else:  # spherical: M
        logdet = D * torch.log(prec_chol)
        maha = torch.cdist(h, means).pow(2) * prec_chol[None].pow(2)
    log_gauss = -0.5 * (D * math.log(2 * math.pi) + maha) + logdet[None]
    return torch.logsumexp(log_gauss + torch.log(weights)[None], dim=1)
