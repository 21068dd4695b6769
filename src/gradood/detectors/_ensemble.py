"""Combining per-layer scores into one (FSSD-Ensem, Mahalanobis feature ensemble)."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..signals import Request, Signals

COMBINE_MODES = ("mean-z", "lr")


def split_halves(signals: Signals, share: float, seed: int) -> tuple[Signals, Signals]:
    """A seeded split of validation signals into a part that fits and a part that selects."""
    n = len(signals)
    if n < 4:
        raise InputError(f"the validation split {signals.name!r} has {n} samples; tuning needs at least 4.")
    perm = np.random.default_rng(seed).permutation(n)
    cut = min(max(1, int(round(share * n))), n - 1)
    return signals.subset(perm[:cut], name=f"{signals.name}[a]"), signals.subset(perm[cut:], name=f"{signals.name}[b]")


def select_on_halves(candidates: Sequence[float], id_val: Signals, ood_val: Signals | None, *, share: float,
                     seed: int, auroc_of: Callable[..., float]) -> float:
    """The candidate whose ``auroc_of(candidate, id_a, id_b, ood_a, ood_b)`` is highest: fit on the "a" halves,
    select on the "b" halves (the official FSSD/Mahalanobis protocol; ``ood_*`` are None without OOD data).
    Callers compute their whole grid on the full splits first, so the halves only index cached signals."""
    id_a, id_b = split_halves(id_val, share, seed)
    ood_a, ood_b = split_halves(ood_val, share, seed + 1) if ood_val is not None else (None, None)
    scores = [auroc_of(c, id_a, id_b, ood_a, ood_b) for c in candidates]
    return candidates[int(np.argmax(scores))]


def check_combine(combine: str) -> str:
    if not isinstance(combine, str) or not combine:
        raise ConfigError(f"combine must be 'mean-z', 'lr' or a layer name, got {combine!r}.")
    return combine


class LayerCombiner:
    """Turns an ``N x L`` matrix of per-layer ID-scores into one ID-score per sample.

    * ``"mean-z"`` (OOD-agnostic): z-score each layer with the mean/std of the ID fit values, average.
    * ``"lr"`` (OOD-tuned): ``sklearn.linear_model.LogisticRegressionCV(random_state=42)`` on per-layer scores
      of the ID validation split (label 1) and the OOD validation split (label 0), as the FSSD and
      Mahalanobis codes do; the score is the decision function (the log-odds: ranks like
      ``predict_proba[:, 1]`` without saturating to ties).
    * a layer name: that layer's column alone.
    """

    def __init__(self, mode: str, layers: Sequence[str], seed: int = 42) -> None:
        self.mode = mode
        self.layers = tuple(layers)
        self.seed = seed

    def fit(self, request: Request, *, fit: Signals, id_val: Signals | None, ood_val: Signals | None,
            negatives: torch.Tensor | None = None) -> "LayerCombiner":
        """Fit on the per-layer scores ``request`` yields: ID fit data for "mean-z"; the ID validation split
        (default: the fit data) against ``ood_val`` (or explicit ``negatives``) for "lr". Only what the mode
        uses is computed."""
        if self.mode == "mean-z":
            v = fit.get(request).double()
            self.mean_ = v.mean(dim=0)
            self.std_ = v.std(dim=0).clamp_min(1e-12)
        elif self.mode == "lr":
            from sklearn.linear_model import LogisticRegressionCV

            pos = (id_val if id_val is not None else fit).get(request).double().numpy()
            if negatives is None:
                if ood_val is None:
                    raise InputError("the 'lr' layer ensemble needs ood_val= (OOD validation signals).")
                negatives = ood_val.get(request)
            neg = negatives.double().numpy()
            X = np.concatenate([pos, neg])
            y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
            from threadpoolctl import threadpool_limits

            # one BLAS thread: these problems are tiny and threads only add overhead (30x under load)
            with warnings.catch_warnings(), threadpool_limits(limits=1):
                # sklearn >= 1.8 announces default changes; we want today's defaults, as the official codes used
                warnings.simplefilter("ignore", FutureWarning)
                self.lr_ = LogisticRegressionCV(random_state=42, max_iter=2000).fit(X, y)
        elif self.mode in self.layers:
            self.column_ = self.layers.index(self.mode)
        else:
            raise ConfigError(f"combine={self.mode!r} is neither {COMBINE_MODES} nor one of the layers {list(self.layers)}.")
        return self

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        v = values.double()
        if self.mode == "mean-z":
            return ((v - self.mean_) / self.std_).mean(dim=1)
        if self.mode == "lr":
            return torch.from_numpy(self.lr_.decision_function(v.numpy()))
        return v[:, self.column_]
