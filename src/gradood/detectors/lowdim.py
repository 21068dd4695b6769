"""Low-dimensional gradients (Wu et al., "Low-Dimensional Gradient Helps Out-of-Distribution Detection",
arXiv 2310.17163; docs/methods.md 2.7, filled in from the official code).

Per-sample gradients ``g(x) = grad_theta LSE(f(x))`` over all parameters are normalised element-wise by the
ID training gradients' mean and std (the "NFK" form, ``z = (g - mu) / sigma``) and projected onto K
directions: the top-K principal directions of the ID ``z`` (randomised block power iteration from matrix
products, never the N x P matrix) or the per-class mean gradients (the "average-gradient" subspace).
The K-dim projections feed an existing score: KNN, or a linear probe (BatchNorm1d -> Linear) giving
MSP / Energy / Mahalanobis. Everything streams over batches; only P x K basis and N x K projections are held.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._batches import num_rows
from ..errors import ConfigError, InputError
from ..grads import GradBasis, GradMoments, grad_moments, per_sample_grad_projections, weighted_grad_sums
from ..signals import FEATURES, LOGITS, ProbeBatch, Request, Signals
from . import _papers
from . import _hyperparams as hp
from ._checks import class_labels
from .base import Detector, register, register_variant
from .knn import kth_neighbour_sqdist, normalize_rows
from .mahalanobis import TiedGaussian
from .output_feature import _percentile

HEADS = ("knn", "msp", "energy", "mahalanobis", "react", "bats", "gradnorm", "odin")
#: heads that read the linear probe's BN output ``b = bn(z)`` as its penultimate features (see probe_head_scores)
SHAPED_HEADS = ("react", "bats", "gradnorm", "odin")


def energy_loss(out: torch.Tensor) -> torch.Tensor:
    """Wu et al.'s gradient target: the energy ``LSE(f)`` at T = 1, not negated."""
    return torch.logsumexp(out, dim=1)


def probe_energy_loss(probe: Any) -> Any:
    """:func:`energy_loss` of the logits in the model's output (a tensor, tuple, dict or ``ModelOutput``)."""
    return lambda out: energy_loss(probe.output_logits(out))


@dataclass(frozen=True, eq=False)
class GradientBasis:
    """The fitted P x K basis with its NFK normalisation (an engine :class:`~gradood.grads.GradBasis` whose
    directions, centre mu and scale 1/sigma are stored per parameter) and a content digest for cache keys."""

    basis: GradBasis = field(repr=False)
    digest: str = ""

    @property
    def k(self) -> int:
        return self.basis.k


@dataclass(frozen=True, eq=False)
class GradProjections(Request):
    """``z(x)^T V`` (``B x K``) from the batched engine."""

    basis: GradientBasis = field(repr=False)
    params: Any = "all"

    @property
    def key(self) -> str:
        return f"gradproj:{self.basis.digest}"

    def compute(self, batch: ProbeBatch) -> torch.Tensor:
        with batch.probe.eval_mode():
            return per_sample_grad_projections(batch.probe.model, batch.x, probe_energy_loss(batch.probe),
                                               self.basis.basis).double()


def _iter_fit_batches(signals: Signals, n_fit: int | None, seed: int):
    """Batches of the fit data (a seeded subset when n_fit < N), in a fixed order, on the model's device."""
    if signals.probe is None or signals.source is None:
        raise InputError("low-dimensional gradients need the model and the data: build the fit signals with "
                         "probe.signals(data), not from arrays.")
    return signals if n_fit is None or n_fit >= len(signals) else signals.subset(
        np.sort(np.random.default_rng(seed).permutation(len(signals))[:n_fit]), name=f"{signals.name}[lowdim fit]")


def _stream(signals: Signals):
    probe = signals.probe
    for b, (x, y) in enumerate(signals.source.iter_batches()):
        yield probe.prepare(x, batch_index=b), y


class SubspaceFit:
    """Fits mu, sigma and the basis from streamed per-sample gradient statistics."""

    def __init__(self, signals: Signals, params: Any, progress: bool) -> None:
        self.signals = signals
        self.model = signals.probe.model
        self.loss = probe_energy_loss(signals.probe)
        self.params = params
        self.progress = progress

    def _bar(self, desc: str):
        from tqdm.auto import tqdm

        return tqdm(_stream(self.signals), total=self.signals.source.num_batches, desc=desc, leave=False,
                    disable=None if self.progress else True)

    def moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Element-wise mean and 1/std of the per-sample gradients (zero-variance entries get the largest
        finite 1/std, as in the official code), float64."""
        mom = GradMoments()
        with self.signals.probe.eval_mode():
            for x, _ in self._bar("lowdim: gradient moments"):
                grad_moments(self.model, x, self.loss, params=self.params, into=mom)
        return {k: v.cpu() for k, v in mom.mean().items()}, {k: v.cpu() for k, v in mom.inverse_std().items()}

    def weighted(self, weights: torch.Tensor, desc: str) -> dict[str, torch.Tensor]:
        """``sum_i w_ik g_i`` per parameter (``(*shape, K)``), weights ``N x K`` aligned with the data order."""
        out: dict[str, torch.Tensor] | None = None
        start = 0
        with self.signals.probe.eval_mode():
            for x, _ in self._bar(desc):
                n = num_rows(x)
                w = weights[start: start + n]
                start += n
                out = weighted_grad_sums(self.model, x, self.loss, w, params=self.params, into=out)
        assert out is not None
        return {k: v.double().cpu() for k, v in out.items()}

    def project(self, directions: dict[str, torch.Tensor], center: dict[str, torch.Tensor],
                scale: dict[str, torch.Tensor], desc: str) -> torch.Tensor:
        """``z(x)^T V`` of every fit sample (``N x K``)."""
        basis = GradBasis(directions, center=center, scale=scale)
        rows = []
        with self.signals.probe.eval_mode():
            for x, _ in self._bar(desc):
                rows.append(per_sample_grad_projections(self.model, x, self.loss, basis).double().cpu())
        return torch.cat(rows)


def _flat(d: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    return torch.cat([v.reshape(-1, k) for v in d.values()])


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = flat[i: i + n].reshape(*ref.shape, flat.shape[1])
        i += n
    return out


def fit_subspace(signals: Signals, *, subspace: str, k_dims: int, power_iters: int, params: Any, seed: int,
                 progress: bool = True) -> GradientBasis:
    """mu, sigma and the P x K basis V, as a :class:`GradientBasis` with the normalisation folded in."""
    fit = SubspaceFit(signals, params, progress)
    mu, inv = fit.moments()
    P = sum(v.numel() for v in mu.values())
    n = len(signals)
    if subspace == "pca":
        if k_dims > min(P, n - 1):
            raise ConfigError(
                f"k_dims={k_dims} is too large for #fit samples={n} (their centred gradients span at most {n - 1} "
                f"directions) and #parameters={P}: use k_dims <= {min(P, n - 1)} or fit on more samples."
            )
        v = _power_iteration(fit, mu, inv, k_dims, power_iters, seed, n)
    else:
        y = class_labels(signals, "lowdim (average-gradient subspace)")
        C = int(y.max()) + 1
        onehot = torch.zeros(n, C, dtype=torch.float64).scatter_(1, y.long().view(-1, 1), 1.0)
        counts = onehot.sum(0).clamp_min(1)
        sums = _flat(fit.weighted(onehot, "lowdim: class mean gradients"), C)
        mu_f, inv_f = _flat_vec(mu), _flat_vec(inv)
        v = (sums / counts - mu_f[:, None]) * inv_f[:, None]
        v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-30)  # L2-normalised columns, not orthogonalised
    digest = hashlib.sha256(v[:: max(1, v.shape[0] // 4096)].numpy().tobytes()).hexdigest()[:16]
    dtype = next(signals.probe.model.parameters()).dtype
    basis = GradBasis({k: t.to(dtype) for k, t in _unflat(v, mu).items()},
                      center={k: t.to(dtype) for k, t in mu.items()}, scale={k: t.to(dtype) for k, t in inv.items()})
    return GradientBasis(basis, digest)


def _flat_vec(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def _power_iteration(fit: SubspaceFit, mu: dict, inv: dict, k: int, iters: int, seed: int, n: int) -> torch.Tensor:
    """Top-k right singular vectors of Z = (G - mu) * inv via randomised block power iteration:
    Y = Z W (projections), Q = orth(Y), W = Z^T Q (weighted gradient sums), repeated; never forms Z."""
    mu_f, inv_f = _flat_vec(mu), _flat_vec(inv)
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(mu_f.numel(), k, generator=g, dtype=torch.float64))[0]
    for it in range(iters + 1):
        Y = fit.project(_unflat(W, mu), mu, inv, f"lowdim: Z V ({it + 1}/{iters + 1})")
        Q = torch.linalg.qr(Y)[0]
        ZtQ = _flat(fit.weighted(Q, f"lowdim: Z^T Q ({it + 1}/{iters + 1})"), k)
        ZtQ = (ZtQ - mu_f[:, None] * Q.sum(0)[None, :]) * inv_f[:, None]
        W = torch.linalg.qr(ZtQ)[0] if it < iters else ZtQ
    # B = Q^T Z = W^T (k x P); right singular vectors of B from its k x k Gram matrix.
    gram = W.T @ W
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(1e-30), evecs[:, order]
    return (W @ evecs) / evals.sqrt()[None, :]


class LinearProbe(nn.Module):
    """The official code's probe on the reduced gradients: BatchNorm1d(K) -> Linear(K, C)."""

    def __init__(self, k: int, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(k)
        self.fc = nn.Linear(k, c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(z))


def train_probe(z: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> LinearProbe:
    """SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128 (the official recipe), seeded."""
    torch.manual_seed(seed)
    C = int(y.max()) + 1
    probe = LinearProbe(z.shape[1], C)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    zf, yl = z.float(), y.long()
    probe.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(zf), generator=g).split(128):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(probe(zf[idx]), yl[idx]).backward()
            opt.step()
    return probe.eval()


def probe_head_scores(probe: LinearProbe, z: torch.Tensor, head: str, *, clip: float = float("inf"),
                      start_dim: int = 0, lam: float = 1.0, temperature: float = 1.0, eps: float = 0.0
                      ) -> torch.Tensor:
    """The post-hoc scores of Wu et al.'s other heads (as their official code builds them), with the trained
    probe ``fc(bn(z))`` as the classifier (float64; higher = more ID):

    * "react": energy of ``fc(bn(z'))``, ``z'`` = the projections with dimensions ``start_dim:`` clipped at
      ``clip`` (fitted as a percentile of those ID values; the leading principal directions stay unclipped);
    * "bats": energy of ``fc(clamp(b, beta - lam |gamma|, beta + lam |gamma|))``, ``b = bn(z)`` (BATS: the BN's
      own shift and scale are the typical range of its outputs);
    * "gradnorm": ``||p_T - u||_1 * ||b||_1 / T``, the L1 norm of the gradient of ``KL(u || softmax(fc(b) / T))``
      w.r.t. the probe's FC weight (GradNorm, closed form of ``(p_T - u) b^T / T``), per sample;
    * "odin": ODIN with the perturbation applied to the projections themselves:
      ``z' = z - eps * sign(-grad_z log max softmax(fc(bn(z)) / T))``, scored by ``max softmax(fc(bn(z')) / T)``.
    """
    bn, fc = probe.bn, probe.fc
    W, c = fc.weight.detach().double(), fc.bias.detach().double()
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    sigma = (bn.running_var.detach().double() + bn.eps).sqrt()

    def normed(v: torch.Tensor) -> torch.Tensor:
        return (v.double() - bn.running_mean.detach().double()) / sigma * gamma + beta

    if head == "react":
        z = z.double().clone()
        z[:, start_dim:] = z[:, start_dim:].clamp(max=clip)
        return torch.logsumexp(normed(z) @ W.T + c, dim=1)
    if head == "bats":
        lo, hi = beta - lam * gamma.abs(), beta + lam * gamma.abs()
        return torch.logsumexp(torch.maximum(torch.minimum(normed(z), hi), lo) @ W.T + c, dim=1)
    if head == "gradnorm":
        b = normed(z)
        p = torch.softmax((b @ W.T + c) / temperature, dim=1)
        return (p - 1.0 / p.shape[1]).abs().sum(dim=1) * b.abs().sum(dim=1) / temperature
    if head == "odin":
        zz = z.double().detach().requires_grad_(eps > 0)
        with torch.enable_grad():
            logp = torch.log_softmax((normed(zz) @ W.T + c) / temperature, dim=1).amax(dim=1)
            if eps > 0:
                (g,) = torch.autograd.grad(logp.sum(), zz)
                zz = (zz + eps * g.sign()).detach()  # z - eps * sign(-grad)
        with torch.no_grad():
            return torch.softmax((normed(zz) @ W.T + c) / temperature, dim=1).amax(dim=1)
    raise ConfigError(f"unknown probe head {head!r}; one of {SHAPED_HEADS}.")


@register("lowdim")
class LowDimGradient(Detector):
    """Low-dimensional gradient OOD score (Wu et al., arXiv 2310.17163). Higher = more ID.

    Fit (streaming, bounded memory) on ID training data: mu and sigma of per-sample energy gradients; the
    P x K basis (``subspace``: "pca" = top ``k_dims`` principal directions by randomised block power
    iteration with ``power_iters`` refinements, or "average" = per-class mean gradients, K = C, L2-normalised
    columns); the ID projections; then the head.

    Heads (``head``): "knn" (L2-normalised projections, ``knn_k``-th neighbour distance, default 5 as the
    official CIFAR setting), or a linear probe trained on the projections (``probe_epochs`` 10) scored by
    "msp", "energy" or "mahalanobis" (tied covariance on the projections, true labels), or by the post-hoc
    heads the paper combines with its gradients, with the probe as the classifier and its BN output
    ``b = bn(z)`` as the penultimate features (:func:`probe_head_scores`), defaults the official code's CIFAR-10
    values: "react" (projection dimensions ``react_start_dim``: onwards -- None: 10, the code's value, when
    there are more than 10 directions, else 0 -- clipped at their
    ``react_percentile`` (90) ID percentile -- fitted on the ID fit data, not on ID test data as the code
    does -- then energy), "bats" (``b`` clamped to the BN's ``beta -/+ bats_lam * |gamma|``, ``bats_lam``
    0.1), "gradnorm" (L1 norm of the probe FC weight's KL-to-uniform gradient, T = 1, per sample -- the code
    scores whole batches) and "odin" (``odin_temperature`` 100, ``odin_eps`` 50 applied to the projections;
    fixed values, not tuned on OOD data). ``ensemble`` a
    (default 0): the forward + backward ensemble described in the paper summary but absent from the official
    code -- ``z(S_grad) + a * z(S_fwd)`` with S_fwd the same head on the penultimate features (KNN on
    normalised features; energy/MSP on the logits; Mahalanobis on the features), z-scored with ID fit
    statistics; NOT verified against the paper. ``n_fit`` (5000; None = all fit samples), ``params``
    ("all"), ``seed`` (0).

    Inputs: the model (per-sample full-network gradients, one batched backward per batch) + labels for the
    probe / average subspace / Mahalanobis.
    """

    paper = "Wu et al., Low-Dimensional Gradient Helps Out-of-Distribution Detection, arXiv 2310.17163"
    citation = _papers.LOWDIM
    signals = ("param-grads", "features")
    fits_on_id = True
    needs_model = True

    hyperparams = {"subspace": hp.choice("pca", "average"), "k_dims": hp.integer(minimum=1), "head": hp.choice(*HEADS),
                   "knn_k": hp.integer(minimum=1), "power_iters": hp.integer(minimum=0),
                   "probe_epochs": hp.integer(minimum=1), "ensemble": hp.non_negative(),
                   "n_fit": hp.integer(minimum=2, none=True), "params": hp.PARAM_SCOPE, "seed": hp.SEED,
                   "react_percentile": hp.real(low=0, high=100, low_open=True),
                   "react_start_dim": hp.integer(minimum=0, none=True), "bats_lam": hp.non_negative(),
                   "odin_temperature": hp.positive(), "odin_eps": hp.non_negative()}

    def __init__(self, subspace: str = "pca", k_dims: int = 32, head: str = "knn", knn_k: int = 5,
                 power_iters: int = 2, probe_epochs: int = 10, ensemble: float = 0.0, n_fit: int | None = 5000,
                 params: Any = "all", seed: int = 0, react_percentile: float = 90.0,
                 react_start_dim: int | None = None, bats_lam: float = 0.1, odin_temperature: float = 100.0,
                 odin_eps: float = 50.0) -> None:
        self.subspace = subspace
        self.k_dims = k_dims
        self.head = head
        self.knn_k = knn_k
        self.power_iters = power_iters
        self.probe_epochs = probe_epochs
        self.ensemble = ensemble
        self.n_fit = n_fit
        self.params = tuple(params) if isinstance(params, list) else params
        self.seed = seed
        self.react_percentile = react_percentile
        self.react_start_dim = react_start_dim
        self.bats_lam = bats_lam
        self.odin_temperature = odin_temperature
        self.odin_eps = odin_eps
        if ensemble and head in SHAPED_HEADS:
            raise ConfigError(f"lowdim: ensemble= combines the gradient score with the same head on the forward "
                              f"features, defined for the heads knn, msp, energy and mahalanobis, not {head!r}: "
                              "pass ensemble=0 or one of those heads.")

    def fit_requests(self) -> list[Request]:
        return [LOGITS, FEATURES]

    def _basis_for(self, signals: Signals) -> GradientBasis:
        """The fitted basis, shared by every lowdim detector fitted on the same signals with the same
        subspace settings (the expensive part: several passes over the fit data)."""
        memo = signals.__dict__.setdefault("_lowdim_bases", {})
        key = (self.subspace, self.k_dims if self.subspace == "pca" else None, self.power_iters, str(self.params),
               self.n_fit, self.seed)
        if key not in memo:
            fit_data = _iter_fit_batches(signals, self.n_fit, self.seed)
            memo[key] = (fit_subspace(fit_data, subspace=self.subspace, k_dims=self.k_dims,
                                      power_iters=self.power_iters, params=self.params, seed=self.seed,
                                      progress=signals.progress), fit_data)
        return memo[key]

    def _fit(self, signals: Signals, **_: object) -> None:
        if self.subspace == "average" or self.head != "knn":
            class_labels(signals, self.label)  # before the gradient passes, not after them
        self.basis_, fit_data = self._basis_for(signals)
        self.request_ = GradProjections(self.basis_, self.params)
        z = fit_data.get(self.request_)
        self.k_dims_ = z.shape[1]
        if self.head == "knn":
            self.bank_ = normalize_rows(z.float())
            if self.knn_k > len(self.bank_):
                raise InputError(f"knn_k={self.knn_k} exceeds the {len(self.bank_)} fit samples.")
        else:
            y = class_labels(fit_data, self.label)
            self.probe_ = train_probe(z, y, self.probe_epochs, self.seed)
            if self.head == "mahalanobis":
                self.gaussian_ = TiedGaussian.fit(z, y, who=self.label, data=f"{fit_data.name!r} (gradient projections)")
            if self.head == "react":
                self.react_start_dim_ = self._react_start(z.shape[1])
                self.react_clip_ = _percentile(z[:, self.react_start_dim_:], float(self.react_percentile))
        if self.ensemble > 0:
            self._fit_forward(fit_data, z)

    def _react_start(self, k: int) -> int:
        """The first clipped projection dimension: as given, or (None) the code's CIFAR-10 value 10 when the
        subspace has more than 10 directions, else 0 (every dimension clipped)."""
        if self.react_start_dim is None:
            return 10 if k > 10 else 0
        if self.react_start_dim >= k:
            raise ConfigError(f"lowdim: react_start_dim={self.react_start_dim} leaves none of the {k} projection "
                              f"dimensions to clip: use react_start_dim < {k} (the number of directions, k_dims "
                              "or #classes), or None.")
        return int(self.react_start_dim)

    def _grad_scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.head == "knn":
            return -kth_neighbour_sqdist(normalize_rows(z.float()), self.bank_, self.knn_k).double().sqrt()
        if self.head == "mahalanobis":
            return -self.gaussian_.sqdists(z).amin(dim=1)
        if self.head in SHAPED_HEADS:
            T = self.odin_temperature if self.head == "odin" else 1.0
            return probe_head_scores(self.probe_, z, self.head, clip=getattr(self, "react_clip_", float("inf")),
                                     start_dim=getattr(self, "react_start_dim_", 0), lam=self.bats_lam, temperature=T,
                                     eps=self.odin_eps)
        with torch.no_grad():
            logits = self.probe_(z.float()).double()
        if self.head == "msp":
            return torch.softmax(logits, dim=1).amax(dim=1)
        return torch.logsumexp(logits, dim=1)

    def _forward_scores(self, signals: Signals) -> torch.Tensor:
        if self.head == "knn":
            q = normalize_rows(signals.features.float())
            return -kth_neighbour_sqdist(q, self.fwd_bank_, self.knn_k).double().sqrt()
        if self.head == "mahalanobis":
            return -self.fwd_gaussian_.sqdists(signals.features).amin(dim=1)
        if self.head == "msp":
            return torch.softmax(signals.logits.double(), dim=1).amax(dim=1)
        return torch.logsumexp(signals.logits.double(), dim=1)

    def _fit_forward(self, fit_data: Signals, z: torch.Tensor) -> None:
        if self.head == "knn":
            self.fwd_bank_ = normalize_rows(fit_data.features.float())
        if self.head == "mahalanobis":
            self.fwd_gaussian_ = TiedGaussian.fit(fit_data.features, class_labels(fit_data, self.label), who=self.label,
                                                  data=f"{fit_data.name!r} (penultimate features)")
        sg, sf = self._grad_scores(z), self._forward_scores(fit_data)
        self.z_stats_ = (float(sg.mean()), float(sg.std()) or 1.0, float(sf.mean()), float(sf.std()) or 1.0)

    def requests(self) -> list[Request]:
        return [self.request_, LOGITS, FEATURES] if self.ensemble > 0 else [self.request_]

    def _score(self, signals: Signals) -> torch.Tensor:
        sg = self._grad_scores(signals.get(self.request_))
        if self.ensemble == 0:
            return sg
        mg, sdg, mf, sdf = self.z_stats_
        return (sg - mg) / sdg + self.ensemble * (self._forward_scores(signals) - mf) / sdf


register_variant("lowdim-pca-energy", LowDimGradient, head="energy")
register_variant("lowdim-pca-msp", LowDimGradient, head="msp")
register_variant("lowdim-pca-mahalanobis", LowDimGradient, head="mahalanobis")
register_variant("lowdim-avg-knn", LowDimGradient, subspace="average")
register_variant("lowdim-avg-energy", LowDimGradient, subspace="average", head="energy")
register_variant("lowdim-pca-knn-ensemble", LowDimGradient, ensemble=1.0)
register_variant("lowdim-pca-react", LowDimGradient, head="react")
register_variant("lowdim-pca-bats", LowDimGradient, head="bats")
register_variant("lowdim-pca-gradnorm", LowDimGradient, head="gradnorm")
register_variant("lowdim-pca-odin", LowDimGradient, head="odin")
