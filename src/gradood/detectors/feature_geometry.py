"""Scores from the geometry of the penultimate features and the linear head: Residual (ViM's residual alone),
fDBD (distance to decision boundaries), NCI (neural-collapse alignment), NNGuide (nearest-neighbour guidance)
and SHE (simplified Hopfield energy).

All read the penultimate features ``h`` (and the logits / head) of the shared forward pass. Higher = more ID.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError, InputError
from ..signals import FEATURES, LOGITS, Request, Signals
from . import _papers
from . import _hyperparams as hp
from ._checks import class_labels
from .base import Detector, register
from .knn import normalize_rows
from .vim import default_principal_dim


def _head(signals: Signals, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = signals.head_params()
    if w.shape[1] != d:
        raise InputError(f"the head weight is {tuple(w.shape)} but features have {d} dims.")
    return w.double(), None if b is None else b.double()


@register("residual")
class Residual(Detector):
    """Residual: ViM's residual norm alone (Wang, Li, Feng & Zhang, CVPR 2022, https://arxiv.org/abs/2203.10807;
    OpenOOD's / pytorch-ood's "Residual").

    Fit as ViM: origin ``o = -pinv(W) b``, eigenvectors of the uncentred-about-o covariance of ``h - o``, the
    residual space R spanned by all but the top ``dim``. Score ``-||R^T (h - o)||``; higher = more ID.
    Inputs: penultimate features, head weight/bias. Fitted state: ``origin_``, ``residual_basis_``.
    Hyperparameters: ``dim`` (None = ViM's default rule, :func:`gradood.detectors.vim.default_principal_dim`).
    """

    paper = "Wang, Li, Feng & Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    citation = _papers.VIM
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"dim": hp.integer(minimum=1, none=True)}

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h = signals.features.double()
        D = h.shape[1]
        dim = default_principal_dim(D) if self.dim is None else int(self.dim)
        if dim >= D:
            raise ConfigError(f"residual dim={dim} leaves no residual space for {D}-dimensional features: "
                              f"use dim < {D}.")
        w, b = _head(signals, D)
        self.origin_ = -torch.linalg.pinv(w) @ b if b is not None else torch.zeros(D, dtype=torch.float64)
        x = h - self.origin_
        _, vecs = torch.linalg.eigh(x.T @ x / x.shape[0])  # ascending eigenvalues
        self.residual_basis_ = vecs[:, : D - dim].contiguous()

    def _score(self, signals: Signals) -> torch.Tensor:
        return -((signals.features.double() - self.origin_) @ self.residual_basis_).norm(dim=1)


@register("fdbd")
class FDBD(Detector):
    """fDBD: fast decision-boundary distance (Liu & Qin, ICML 2024, https://arxiv.org/abs/2312.11536).

    For the predicted class c, the feature-space distance to the boundary with class j of the linear head is
    ``|f_c - f_j| / ||w_c - w_j||``. Score: their mean over ``j != c``, divided by ``||h - mu||`` with ``mu`` the
    mean ID training feature; higher = more ID. Inputs: logits, penultimate features, head weight/bias.
    Fitted state: ``mean_``. No hyperparameters. Classes with identical weight rows are skipped (their
    boundary is not a hyperplane).
    """

    paper = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"
    citation = _papers.FDBD
    signals = ("logits", "features")
    fits_on_id = True

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        self.mean_ = signals.features.double().mean(dim=0)

    def _score(self, signals: Signals) -> torch.Tensor:
        h, f = signals.features.double(), signals.logits.double()
        w, _ = _head(signals, h.shape[1])
        if w.shape[0] < 2:
            raise InputError("fDBD needs at least 2 classes (decision boundaries between classes).")
        c = f.argmax(dim=1)
        wdist = torch.cdist(w, w)  # C x C, ||w_i - w_j||
        denom = wdist[c]  # N x C
        valid = denom > 0
        ratio = torch.where(valid, (f.gather(1, c[:, None]) - f).abs() / torch.where(valid, denom, 1.0), 0.0)
        mean_dist = ratio.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
        return mean_dist / (h - self.mean_).norm(dim=1).clamp_min(1e-12)


@register("nci")
class NCI(Detector):
    """NCI: neural-collapse inspired detector (Liu & Qin, CVPR 2025, "Detecting Out-of-distribution through the
    Lens of Neural Collapse", https://arxiv.org/abs/2311.01479).

    ``pScore = w_c^T (h - mu_G) / ||h - mu_G||`` with c the predicted class and ``mu_G`` the mean ID training
    feature (the official code's form, without dividing by ``||w_c||``); score ``pScore + alpha * ||h||_1``;
    higher = more ID. Inputs: logits, penultimate features, head weight. Fitted state: ``mean_``.
    Hyperparameters: ``alpha`` (0.0: the feature-norm filter is off; the paper tunes it per model).
    """

    paper = "Liu & Qin, Detecting Out-of-distribution through the Lens of Neural Collapse, CVPR 2025"
    citation = _papers.NCI
    signals = ("logits", "features")
    fits_on_id = True

    hyperparams = {"alpha": hp.non_negative()}

    def __init__(self, alpha: float = 0.0) -> None:
        self.alpha = alpha

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        self.mean_ = signals.features.double().mean(dim=0)

    def _score(self, signals: Signals) -> torch.Tensor:
        h = signals.features.double()
        w, _ = _head(signals, h.shape[1])
        z = h - self.mean_
        wc = w[signals.logits.argmax(dim=1)]
        p = (z * wc).sum(dim=1) / z.norm(dim=1).clamp_min(1e-12)
        return p + self.alpha * h.abs().sum(dim=1) if self.alpha > 0 else p


@register("nnguide")
class NNGuide(Detector):
    """NNGuide: nearest-neighbour guidance (Park, Jung & Teoh, ICCV 2023, https://arxiv.org/abs/2309.14888).

    Fit: a bank of normalised ID features scaled by their energy, ``b_i = E(x_i) h_i / ||h_i||`` with
    ``E = LSE(f)``. Score ``E(x) * mean(top-k_i <h(x)/||h(x)||, b_i>)`` (the official code: inner products with
    the guided bank, mean of the k largest); higher = more ID. Inputs: logits, penultimate features.
    Fitted state: ``bank_`` (N x D). Hyperparameters: ``k`` (10, pytorch-ood's default; the paper uses 100 on
    ImageNet with a 1% bank), ``fraction`` (1.0: share of the ID fit samples kept in the bank, the paper's
    alpha), ``seed`` (0, for the subsample).
    """

    paper = "Park, Jung & Teoh, Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023"
    citation = _papers.NNGUIDE
    signals = ("logits", "features")
    fits_on_id = True

    hyperparams = {"k": hp.integer(minimum=1), "fraction": hp.real(low=0, high=1, low_open=True), "seed": hp.SEED}

    def __init__(self, k: int = 10, fraction: float = 1.0, seed: int = 0) -> None:
        self.k = k
        self.fraction = fraction
        self.seed = seed

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h, f = signals.features.double(), signals.logits.double()
        if self.fraction < 1:
            g = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(h), generator=g)[: max(1, int(round(self.fraction * len(h))))]
            h, f = h[keep], f[keep]
        if self.k > len(h):
            raise InputError(f"k={self.k} but the NNGuide bank has only {len(h)} samples: lower k or fit on more data.")
        self.bank_ = normalize_rows(h) * torch.logsumexp(f, dim=1)[:, None]

    def _score(self, signals: Signals, chunk: int = 2048) -> torch.Tensor:
        q = normalize_rows(signals.features.double())
        guidance = torch.cat([torch.topk(q[s: s + chunk] @ self.bank_.T, self.k, dim=1).values.mean(dim=1)
                              for s in range(0, len(q), chunk)])
        return torch.logsumexp(signals.logits.double(), dim=1) * guidance


@register("she")
class SHE(Detector):
    """SHE: simplified Hopfield energy (Zhang, Fu, Jiang, Wang & Zhang, ICLR 2023,
    https://openreview.net/forum?id=KkazG4lgKL).

    Fit: one stored pattern per class, ``S_c`` = the mean penultimate feature of the ID fit samples of class c
    that the model classifies correctly. Score ``<h, S_c_hat>`` with c_hat the predicted class; higher = more
    ID. Inputs: logits, penultimate features, labels at fit time. Fitted state: ``patterns_`` (C x D),
    ``fallback_classes_``. A class without any correctly classified fit sample falls back to the mean of all
    its labelled samples (with a warning). No hyperparameters.
    """

    paper = ("Zhang et al., Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization "
             "with Modern Hopfield Energy, ICLR 2023")
    citation = _papers.SHE
    signals = ("logits", "features")
    fits_on_id = True

    def requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _fit(self, signals: Signals, **_: object) -> None:
        h, f = signals.features.double(), signals.logits
        C = f.shape[1]
        y = class_labels(signals, "SHE", n_classes=C)
        correct = f.argmax(dim=1) == y
        patterns = torch.zeros(C, h.shape[1], dtype=torch.float64)
        fallback = []
        for c in range(C):
            sel = correct & (y == c)
            if not bool(sel.any()):
                sel = y == c
                if not bool(sel.any()):
                    raise InputError(f"the ID fit data has no sample of class {c}: SHE needs every class's pattern. "
                                     "Fit on data covering all classes.")
                fallback.append(c)
            patterns[c] = h[sel].mean(dim=0)
        if fallback:
            warnings.warn(f"SHE: classes {fallback[:10]} have no correctly classified fit sample; their pattern is "
                          "the mean of all their fit samples.", UserWarning, stacklevel=3)
        self.patterns_ = patterns
        self.fallback_classes_ = fallback

    def _score(self, signals: Signals) -> torch.Tensor:
        h = signals.features.double()
        return (h * self.patterns_[signals.logits.argmax(dim=1)]).sum(dim=1)
