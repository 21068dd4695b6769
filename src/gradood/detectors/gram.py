"""Gram matrices (Sastry & Oore, ICML 2020): deviations of higher-order feature correlations from their ID range.
Higher = more in-distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, NotApplicableError
from ..signals import LOGITS, ProbeBatch, Request, Signals, Tap, sequence_mask
from . import _hyperparams as hp
from ._papers import Citation
from .base import Detector, register


def gram_row_sums(a: torch.Tensor, max_power: int) -> list[torch.Tensor]:
    """The official per-layer features of orders p = 1..max_power: ``G = (A^p)(A^p)^T`` over positions (``A``:
    channels x positions, element-wise power), summed over its rows and mapped back by ``sign(g) |g|^(1/p)``:
    one ``B x C`` tensor per order, in the activations' precision (float32 models: float32, which holds
    ``A^(2p)`` sums for activations up to ~1e1.9 at p = 10; half precision is promoted to float32)."""
    a = a.reshape(a.shape[0], a.shape[1], -1)
    a = a if a.dtype in (torch.float32, torch.float64) else a.float()
    out, t = [], a
    for p in range(1, max_power + 1):
        if p > 1:
            t = t * a  # A^p by one product per order (pow(p) on every order is several times slower)
        # row sums of T T^T without forming it: (T T^T 1)_c = sum_s T_cs (sum_c' T_c's), O(C S), not O(C^2 S)
        g = torch.bmm(t, t.sum(dim=1).unsqueeze(2)).squeeze(2)
        out.append(g if p == 1 else g.sign() * g.abs().pow(1.0 / p))
    return out


@dataclass(frozen=True)
class GramFeatures(Request):
    """Every layer's Gram row sums for orders ``1..max_power``, concatenated (layer-major, then order, then
    channel): ``B x sum_l (max_power * C_l)``, from the taps of the shared forward pass."""

    layers: tuple[str, ...]
    max_power: int

    @property
    def taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.layers

    @property
    def key(self) -> str:
        return f"gram:{','.join(self.layers)}:p<={self.max_power}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        cols = []
        for layer in self.layers:
            a = batch.taps[layer]
            mask = sequence_mask(batch.x, a)
            if mask is not None:  # B x T x H over tokens: channels H x positions T, padded positions zeroed
                a = (a * mask.unsqueeze(-1)).transpose(1, 2)
            a = a if a.ndim > 2 else a[:, :, None]
            cols += gram_row_sums(a, self.max_power)
        return torch.cat(cols, dim=1)


def _deviation(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Official deviation of values ``g`` from ``[lo, hi]`` relative to the bounds (``|bound + 1e-6|``)."""
    return (torch.relu(lo - g) / (lo + 1e-6).abs() + torch.relu(g - hi) / (hi + 1e-6).abs())


@register("gram")
class Gram(Detector):
    """Gram matrices (Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020,
    https://arxiv.org/abs/1912.12510; the official code's row-sum form).

    Per tapped layer l and order p = 1..``max_power``: ``g_lp = sign(s) |s|^(1/p)`` with ``s`` the row sums of
    ``(A^p)(A^p)^T`` (A = the layer's channels x positions; for the ``B x T x H`` activations of a transformer
    on token inputs, the H channels over the real tokens, padding excluded). Fit: the ID fit data is split (seeded) into a part
    that sets, per PREDICTED class, the min and max of every ``g_lp`` entry, and a held-out part (``val_split``)
    on which each layer's mean total deviation ``E_l`` is measured. Deviation of a value from its class range:
    ``relu(min - g)/|min + 1e-6| + relu(g - max)/|max + 1e-6|``, summed over orders and channels per layer.
    Score ``-sum_l dev_l(x) / E_l`` (the class is the predicted one); higher = more ID. (A layer on which no
    held-out ID sample deviates has ``E_l = 0`` and is not normalised.) Inputs: logits and layer taps.
    Fitted state: ``layers_``, ``mins_``/``maxs_`` (C x K), ``norms_`` (one per layer).
    Hyperparameters: ``layers`` (None = the probe's default activation layers), ``max_power`` (10, the paper's),
    ``val_split`` (0.2), ``seed`` (0). A class that no fit sample is predicted as uses the range of all
    fit samples.
    """

    paper = "Sastry & Oore, Detecting Out-of-Distribution Examples with Gram Matrices, ICML 2020"
    citation = Citation(("Sastry", "Oore"), "Detecting Out-of-Distribution Examples with Gram Matrices", "ICML", 2020,
                        "https://arxiv.org/abs/1912.12510")
    signals = ("logits", "taps")
    fits_on_id = True

    hyperparams = {"layers": hp.names(none=True), "max_power": hp.integer(minimum=1), "seed": hp.SEED,
                   "val_split": hp.real(low=0, high=1, low_open=True, high_open=True)}

    def __init__(self, layers: Sequence[str] | None = None, max_power: int = 10, val_split: float = 0.2,
                 seed: int = 0) -> None:
        self.layers = None if layers is None else tuple(layers)
        self.max_power = max_power
        self.val_split = val_split
        self.seed = seed

    def _resolve_layers(self, signals: Signals) -> tuple[str, ...]:
        if self.layers is not None:
            return self.layers
        if signals.probe is None:
            raise InputError("gram reads layer activations: build the signals with probe.signals(data), or pass "
                             "layers= naming taps given to Signals.from_arrays.")
        signals.warm_up()
        layers = tuple(signals.probe.default_layers())
        if not layers:
            raise NotApplicableError(
                f"gram found no layer to take Gram matrices of in {type(signals.probe.model).__name__}: no "
                "activation module (ReLU, GELU, ...) and no top-level child that outputs a tensor is reached once "
                "per forward pass. Pass layers=[<module names>] whose outputs are B x C x ... maps.")
        return layers

    def _request(self) -> GramFeatures:
        return GramFeatures(self.layers_, int(self.max_power))

    def fit_requests(self) -> list[Request]:
        return [LOGITS]

    def requests(self) -> list[Request]:
        return [LOGITS, self._request()]

    def _fit(self, signals: Signals, **_: object) -> None:
        self.layers_ = self._resolve_layers(signals)
        channels = [Tap(layer, "mean") for layer in self.layers_]
        signals.require([self._request(), *channels])  # one pass over the fit data
        G = signals.get(self._request()).double()
        self.sizes_ = tuple(int(self.max_power) * int(signals.get(t).shape[1]) for t in channels)
        pred = signals.logits.argmax(dim=1)
        N, C = len(G), signals.logits.shape[1]
        n_val = int(round(float(self.val_split) * N))
        if n_val < 1 or N - n_val < 1:
            raise InputError(f"gram needs ID fit samples for both the class ranges and the held-out normalisation: "
                             f"{N} samples with val_split={self.val_split} leave {N - n_val} and {n_val}. Fit on more "
                             "data or change val_split.")
        perm = torch.from_numpy(np.random.default_rng(int(self.seed)).permutation(N))
        val, train = perm[:n_val], perm[n_val:]
        Gt, pt = G[train], pred[train]
        lo_all, hi_all = Gt.amin(dim=0), Gt.amax(dim=0)
        self.mins_ = lo_all.repeat(C, 1)
        self.maxs_ = hi_all.repeat(C, 1)
        for c in range(C):
            sel = pt == c
            if bool(sel.any()):
                self.mins_[c], self.maxs_[c] = Gt[sel].amin(dim=0), Gt[sel].amax(dim=0)
        dev = self._layer_deviations(G[val], pred[val])
        mean = dev.mean(dim=0)
        self.norms_ = torch.where(mean > 0, mean, torch.ones_like(mean))

    def _layer_deviations(self, G: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        d = _deviation(G, self.mins_[pred], self.maxs_[pred])
        return torch.stack([blk.sum(dim=1) for blk in torch.split(d, list(self.sizes_), dim=1)], dim=1)

    def _score(self, signals: Signals) -> torch.Tensor:
        G = signals.get(self._request()).double()
        dev = self._layer_deviations(G, signals.logits.argmax(dim=1))
        return -(dev / self.norms_).sum(dim=1)
