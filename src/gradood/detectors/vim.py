"""ViM: virtual-logit matching (Wang, Li, Feng & Zhang, CVPR 2022). Higher = more in-distribution."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..signals import FEATURES, LOGITS, Request, Signals
from . import _papers
from . import _hyperparams as hp
from ._checks import covariance_rank, warn_degenerate
from .base import Detector, register


def default_principal_dim(feature_dim: int) -> int:
    """Official rule 1000 if D >= 2048 else 512; OpenOOD's 256 for 512-d; half of D for small features."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 1024:
        return 512
    if feature_dim >= 512:
        return 256
    return max(1, feature_dim // 2)


@register("vim")
class ViM(Detector):
    """ViM (Wang et al., CVPR 2022).

    Fit on ID features: origin ``o = -pinv(W) b``; eigenvectors of the (uncentred about o) covariance of
    ``h - o``; principal space = the top ``dim`` eigenvectors, residual space R = the others;
    ``alpha = mean(max_c f_c) / mean(||R^T (h - o)||)``. Score ``LSE(f) - alpha * ||R^T (h - o)||``;
    higher = more ID. Inputs: logits, penultimate features, head weight/bias.
    Hyperparameters: ``dim`` (None = :func:`default_principal_dim`: 1000 for D >= 2048, 512 for D >= 1024,
    256 for D >= 512, else D // 2). ``dim`` must be below the feature dimension.

    Degenerate fits warn (:class:`~gradood.detectors._checks.DegenerateFitWarning`) with the numbers and the
    fix: ``dim`` >= the rank of the ID feature covariance (dead units: the residual space then holds only
    round-off and ``alpha_`` explodes), and N <= D fit samples.
    """

    paper = "Wang, Li, Feng & Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    citation = _papers.VIM
    signals = ("logits", "features")
    fits_on_id = True

    hyperparams = {"dim": hp.integer(minimum=1, none=True)}

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h = signals.features.double()
        D = h.shape[1]
        w, b = signals.head_params()
        self.origin_ = (-torch.linalg.pinv(w.double()) @ b.double()) if b is not None else torch.zeros(D, dtype=torch.float64)
        x = h - self.origin_
        self.dim_, self.residual_basis_ = vim_residual_basis(self, x.T @ x / x.shape[0], x.shape[0])
        r = self._residual(h)
        self.alpha_ = float(signals.logits.double().amax(dim=1).mean() / r.mean())

    def _residual(self, h: torch.Tensor) -> torch.Tensor:
        return ((h.double() - self.origin_) @ self.residual_basis_).norm(dim=1)

    def _score(self, signals: Signals) -> torch.Tensor:
        energy = torch.logsumexp(signals.logits.double(), dim=1)
        return energy - self.alpha_ * self._residual(signals.features)


def vim_residual_basis(vim: ViM, cov: torch.Tensor, n: int) -> tuple[int, torch.Tensor]:
    """``(dim, R)``: the principal dimension and the residual space R (eigenvectors of the uncentred covariance
    ``cov`` about the origin beyond the top ``dim``), from ``n`` fit samples. Shared by the in-memory fit and
    the fit from shards (:mod:`gradood.stream`)."""
    D = cov.shape[0]
    dim = default_principal_dim(D) if vim.dim is None else int(vim.dim)
    if dim >= D:
        raise ConfigError(f"ViM dim={dim} leaves no residual space for {D}-dimensional features: use dim < {D}.")
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    _warn_if_degenerate(covariance_rank(cov), dim, n, D)
    return dim, vecs[:, : D - dim].contiguous()


def _warn_if_degenerate(rank: int, dim: int, n: int, D: int) -> None:
    """The residual space must hold ID variance: with rank(cov) <= dim it holds only round-off, so alpha
    explodes and the ranking is decided by the eigen-solver; with N <= D the eigenvectors are ill-determined."""
    if n <= D:
        warn_degenerate(
            f"vim: fitted on N = {n} samples of D = {D}-dimensional features: the feature covariance has rank "
            f"<= {n} and its principal/residual split is poorly determined. Fit on more than {D} ID samples "
            "(ideally several times D).", stacklevel=6)
    if rank <= dim:
        warn_degenerate(
            f"vim: the ID features span only {rank} of D = {D} dimensions (covariance rank {rank}, e.g. dead units "
            f"or N = {n} samples), but the principal space has dim = {dim} >= {rank}: the residual space holds only "
            "round-off, alpha_ explodes and the ranking is decided by numerical noise. Use dim < "
            f"{rank} (e.g. dim={max(1, rank // 2)}), or features with more live units.", stacklevel=6)
