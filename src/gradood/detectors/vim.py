"""ViM: virtual-logit matching (Wang, Li, Feng & Zhang, CVPR 2022). Higher = more in-distribution."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..signals import FEATURES, LOGITS, Request, Signals
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
    """

    paper = "Wang, Li, Feng & Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    signals = ("logits", "features")
    fits_on_id = True

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and (int(dim) != dim or int(dim) < 1):
            raise ConfigError(f"dim must be a positive integer or None, got {dim!r}.")
        self.dim = dim

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h = signals.features.double()
        D = h.shape[1]
        dim = default_principal_dim(D) if self.dim is None else int(self.dim)
        if dim >= D:
            raise ConfigError(f"ViM dim={dim} leaves no residual space for {D}-dimensional features: use dim < {D}.")
        w, b = signals.head_params()
        self.origin_ = (-torch.linalg.pinv(w.double()) @ b.double()) if b is not None else torch.zeros(D, dtype=torch.float64)
        x = h - self.origin_
        cov = x.T @ x / x.shape[0]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.residual_basis_ = vecs[:, : D - dim].contiguous()
        self.dim_ = dim
        r = self._residual(h)
        self.alpha_ = float(signals.logits.double().amax(dim=1).mean() / r.mean())

    def _residual(self, h: torch.Tensor) -> torch.Tensor:
        return ((h.double() - self.origin_) @ self.residual_basis_).norm(dim=1)

    def _score(self, signals: Signals) -> torch.Tensor:
        energy = torch.logsumexp(signals.logits.double(), dim=1)
        return energy - self.alpha_ * self._residual(signals.features)
