"""OpenMax (Bendale & Boult, CVPR 2016): extreme-value recalibration of the logits with an "unknown" class."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import InputError
from ..signals import LOGITS, Request, Signals
from ._papers import Citation
from . import _hyperparams as hp
from ._checks import class_labels
from .base import Detector, register

DISTANCES = ("eucos", "euclidean", "cosine")


def av_distances(v: torch.Tensor, means: torch.Tensor, distance: str) -> torch.Tensor:
    """``N x C`` distances of activation vectors to every class's mean activation vector: ``"eucos"`` is the
    official ``||v - mu||_2 / 200 + (1 - cos(v, mu))``."""
    v, means = v.double(), means.double()
    eu = torch.cdist(v, means)
    if distance == "euclidean":
        return eu
    cos = 1.0 - (v @ means.T) / (v.norm(dim=1, keepdim=True) * means.norm(dim=1)[None]).clamp_min(1e-300)
    return cos if distance == "cosine" else eu / 200.0 + cos


def fit_weibull_high(distances: np.ndarray, tailsize: int, translate: float) -> tuple[float, float, float]:
    """libMR's ``FitHigh``: a two-parameter Weibull fitted by maximum likelihood to the ``tailsize`` largest
    distances after shifting them by ``translate - min(tail)``; returned as scipy's ``(shape, loc, scale)``
    with ``loc = min(tail) - translate`` so that ``weibull_min.cdf(d, shape, loc, scale)`` is libMR's
    ``W_score(d)``."""
    from scipy.stats import weibull_min

    from scipy.optimize import fmin

    tail = np.sort(np.asarray(distances, dtype=np.float64))[-tailsize:]
    loc = float(tail.min()) - translate
    x = tail - loc
    unit = float(x.mean())  # fit in units of the mean, where the scale is O(1); the shape is unit-free

    def tight(func, x0, args=(), disp=0):  # scipy's default Nelder-Mead stops at ~1e-4: converge fully
        return fmin(func, x0, args=args, disp=0, xtol=1e-11 * max(1.0, float(np.abs(x0).max())), ftol=1e-13,
                    maxiter=5000, maxfun=10000)

    shape, _, scale = weibull_min.fit(x / unit, floc=0.0, optimizer=tight)
    return float(shape), loc, float(scale) * unit


@register("openmax")
class OpenMax(Detector):
    """OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016, https://arxiv.org/abs/1511.06233).

    Fit, per class c: the mean activation vector ``mu_c`` (mean logits of the ID fit samples of class c that
    the model classifies correctly; all samples of c if none is), their distances to ``mu_c``, and a
    Weibull model of the ``tailsize`` largest distances (libMR's ``FitHigh``: shift by ``translate - min``,
    two-parameter maximum likelihood, here with ``scipy.stats.weibull_min``). Score: with the classes ranked
    by logit, the top ``alpha`` get weights ``(alpha - i + 1) / alpha`` (i = 1..alpha) and
    ``v_hat_c = v_c (1 - weight_c * W_c(d(v, mu_c)))``; the unknown class gets ``sum_c (v_c - v_hat_c)``;
    the score is ``1 - P(unknown)`` under the softmax over ``[v_hat, unknown]``; higher = more ID.
    Inputs: logits (+ labels at fit). Fitted state: ``means_`` (C x D), ``weibull_`` (C x 3: shape, loc,
    scale). Hyperparameters: ``tailsize`` (20), ``alpha`` (10; ``min(alpha, C)`` used), ``distance``
    ("eucos", the official; or "euclidean", "cosine"), ``translate`` (10000, libMR's translate_amount).
    """

    paper = "Bendale & Boult, Towards Open Set Deep Networks, CVPR 2016"
    citation = Citation(("Bendale", "Boult"), "Towards Open Set Deep Networks", "CVPR", 2016,
                        "https://arxiv.org/abs/1511.06233")
    signals = ("logits",)
    fits_on_id = True

    hyperparams = {"tailsize": hp.integer(minimum=2), "alpha": hp.integer(minimum=1),
                   "distance": hp.choice(*DISTANCES), "translate": hp.positive()}

    def __init__(self, tailsize: int = 20, alpha: int = 10, distance: str = "eucos", translate: float = 10000.0
                 ) -> None:
        self.tailsize = tailsize
        self.alpha = alpha
        self.distance = distance
        self.translate = translate

    def requests(self) -> list[Request]:
        return [LOGITS]

    def _fit(self, signals: Signals, **_: object) -> None:
        v = signals.logits.double()
        C = v.shape[1]
        y = class_labels(signals, "OpenMax", n_classes=C).long()
        correct = v.argmax(dim=1) == y
        means = torch.zeros(C, C, dtype=torch.float64)
        weibull = torch.zeros(C, 3, dtype=torch.float64)
        fallback = []
        for c in range(C):
            sel = correct & (y == c)
            if int(sel.sum()) < 2:
                sel = y == c
                fallback.append(c)
            if int(sel.sum()) < 2:
                raise InputError(f"the ID fit data has {int(sel.sum())} sample(s) of class {c}: OpenMax fits a Weibull "
                                 "model per class and needs at least 2. Fit on more data.")
            means[c] = v[sel].mean(dim=0)
            d = av_distances(v[sel], means[c: c + 1], self.distance)[:, 0].numpy()
            weibull[c] = torch.tensor(fit_weibull_high(d, min(self.tailsize, len(d)), self.translate))
        if fallback:
            warnings.warn(f"OpenMax: classes {fallback[:10]} have fewer than 2 correctly classified fit samples; "
                          "their model uses all their fit samples.", UserWarning, stacklevel=3)
        self.means_ = means
        self.weibull_ = weibull
        self.fallback_classes_ = fallback

    def wscores(self, v: torch.Tensor) -> torch.Tensor:
        """``N x C`` Weibull CDFs of each sample's distance to every class mean (libMR's W_score)."""
        from scipy.stats import weibull_min

        d = av_distances(v, self.means_, self.distance).numpy()
        k, loc, lam = (self.weibull_[:, i].numpy()[None, :] for i in range(3))
        return torch.from_numpy(weibull_min.cdf(d, k, loc, lam))

    def _score(self, signals: Signals) -> torch.Tensor:
        v = signals.logits.double()
        N, C = v.shape
        a = min(int(self.alpha), C)
        ranks = torch.argsort(torch.argsort(v, dim=1, descending=True), dim=1)  # 0 = largest logit
        weights = torch.where(ranks < a, (a - ranks).double() / a, torch.zeros_like(v))
        v_hat = v * (1.0 - weights * self.wscores(v))
        unknown = (v - v_hat).sum(dim=1, keepdim=True)
        return 1.0 - torch.softmax(torch.cat([v_hat, unknown], dim=1), dim=1)[:, -1]
