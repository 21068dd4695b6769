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

from ..errors import ConfigError, InputError
from ..grads import GradBasis, GradMoments, grad_moments, per_sample_grad_projections, weighted_grad_sums
from ..signals import FEATURES, LOGITS, ProbeBatch, Request, Signals
from . import _papers
from . import _hyperparams as hp
from ._checks import check_label_values, class_labels
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


def fit_indices(n: int, n_fit: int | None, seed: int) -> np.ndarray | None:
    """The sorted seeded subset of ``n`` fit samples the subspace is fitted on (None: all of them)."""
    if n_fit is None or n_fit >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_fit])


def _iter_fit_batches(signals: Signals, n_fit: int | None, seed: int):
    """Batches of the fit data (a seeded subset when n_fit < N), in a fixed order, on the model's device."""
    if signals.probe is None or signals.source is None:
        raise InputError("low-dimensional gradients need the model and the data: build the fit signals with "
                         "probe.signals(data), not from arrays.")
    idx = fit_indices(len(signals), n_fit, seed)
    return signals if idx is None else signals.subset(idx, name=f"{signals.name}[lowdim fit]")


# ------------------------------------------------------------------ the subspace fit as mergeable passes
# Each pass of the fit is a sum over samples. A pass is described by a SubspacePass (small but for the P x K
# directions it carries); `subspace_block` computes its partial sums over consecutive batches from the model and
# the batches alone (here, or in a Ray actor holding the model); partials merge in data order (`merge`), so a
# fit over any split of the data into consecutive blocks gives the same basis up to float64 round-off. Every
# partial is O(P x K) whatever the number of samples: the memory bound of the fit.

MOMENTS, CLASS_SUMS, SKETCH = "moments", "class-sums", "sketch"


def _r_factor(rows: torch.Tensor) -> torch.Tensor:
    """The R factor of a Householder QR (LAPACK geqrf, as torch.linalg.qr), ``min(m, K) x K``."""
    return torch.linalg.qr(rows, mode="r")[1]


@dataclass
class RowsQR:
    """The R factor of a tall ``N x K`` matrix streamed by rows, mergeable (TSQR), keeping the sign convention of
    a Householder QR of the whole matrix.

    Holds the first K rows as they are (``head``) and the R factor of the other rows (``tail``): a Householder QR
    of ``[head; tail]`` gives the same R as one of all N rows, signs included (the reflectors only ever read the
    first K rows one by one and inner products of the columns, which ``tail^T tail`` keeps). O(K^2) memory.
    """

    k: int
    head: torch.Tensor
    tail: torch.Tensor | None = None

    @classmethod
    def of(cls, rows: torch.Tensor, k: int) -> "RowsQR":
        rows = rows.double()
        return cls(k, rows[:k].clone(), _r_factor(rows[k:]) if len(rows) > k else None)

    def merge(self, other: "RowsQR") -> "RowsQR":
        """``self`` followed by ``other`` (order matters for the head); returns self."""
        rows = torch.cat([self.head, other.head])
        self.head, spill = rows[: self.k], rows[self.k:]
        parts = [t for t in (self.tail, spill, other.tail) if t is not None and len(t)]
        self.tail = _r_factor(torch.cat(parts)) if parts else None
        return self

    @property
    def rows(self) -> int:
        return len(self.head) + (0 if self.tail is None else len(self.tail))

    def r(self) -> torch.Tensor:
        parts = [self.head] + ([self.tail] if self.tail is not None else [])
        return _r_factor(torch.cat(parts))


def _add_into(acc: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    if set(acc) != set(other):
        raise ConfigError("cannot merge partial gradient sums of different parameter sets.")
    for n, v in other.items():
        acc[n] += v.to(acc[n])


@dataclass
class MomentSums:
    """Pass 1: count, sum and sum of squares of the per-sample gradients (``GradMoments``) and the labels seen,
    in data order (mergeable)."""

    moments: GradMoments
    labels: torch.Tensor | None

    def merge(self, other: "MomentSums") -> "MomentSums":
        self.moments.merge(other.moments)
        self.labels = None if self.labels is None or other.labels is None else torch.cat([self.labels, other.labels])
        return self


@dataclass
class ClassSums:
    """The "average" subspace's pass: per-class counts and per-class sums of the gradients ``(*shape, C)``."""

    counts: torch.Tensor
    sums: dict[str, torch.Tensor]

    def merge(self, other: "ClassSums") -> "ClassSums":
        self.counts += other.counts
        _add_into(self.sums, other.sums)
        return self


@dataclass
class SketchSums:
    """A power-iteration pass with the P x K block W: ``sum_i g_i y_i^T`` per parameter (``(*shape, K)``),
    ``sum_i y_i`` and the R factor of ``Y`` (:class:`RowsQR`), where ``y_i = z_i^T W`` are the projections of
    the normalised gradients. With them ``Z^T Q = ((G^T Y) - mu (1^T Y)) * I2 R^-1`` for ``Q R = Y``."""

    n: int
    sums: dict[str, torch.Tensor]
    ysum: torch.Tensor
    qr: RowsQR

    def merge(self, other: "SketchSums") -> "SketchSums":
        self.n += other.n
        _add_into(self.sums, other.sums)
        self.ysum += other.ysum
        self.qr.merge(other.qr)
        return self


@dataclass(frozen=True, eq=False)
class SubspacePass:
    """One pass of the subspace fit: what every batch contributes. ``kind``: "moments", "class-sums" (with
    ``n_classes``) or "sketch" (with ``basis``: W and the normalisation); ``labels``: collect and check labels."""

    kind: str
    params: Any = "all"
    basis: GradBasis | None = field(default=None, repr=False)
    n_classes: int = 0
    labels: bool = False
    desc: str = "lowdim"

    def add_batch(self, model: nn.Module, loss: Any, x: Any, y: torch.Tensor | None, acc: Any) -> Any:
        if self.kind == MOMENTS:
            if acc is None:
                acc = MomentSums(GradMoments(), torch.zeros(0, dtype=torch.long) if self.labels else None)
            grad_moments(model, x, loss, params=self.params, into=acc.moments)
            if acc.labels is not None:
                if y is None:
                    raise InputError("lowdim fits class statistics on true labels, but the fit data has none: pass "
                                     "a tuple (inputs, labels), a Dataset or a loader yielding (x, y).")
                acc.labels = torch.cat([acc.labels, y.detach().cpu().long().view(-1)])
            return acc
        if self.kind == CLASS_SUMS:
            if y is None:
                raise InputError("lowdim (average-gradient subspace) needs labels in every batch of the fit data.")
            yl = y.detach().cpu().long().view(-1)
            onehot = torch.zeros(len(yl), self.n_classes, dtype=torch.float64).scatter_(1, yl.view(-1, 1), 1.0)
            sums = weighted_grad_sums(model, x, loss, onehot, params=self.params, into=None if acc is None else acc[1])
            return (onehot.sum(0) if acc is None else acc[0] + onehot.sum(0), sums)
        if self.kind == SKETCH:
            assert self.basis is not None
            y_proj = per_sample_grad_projections(model, x, loss, self.basis)
            sums = weighted_grad_sums(model, x, loss, y_proj, params=self.params, into=None if acc is None else acc[1])
            yd = y_proj.detach().double().cpu()
            if acc is None:
                return [len(yd), sums, yd.sum(0), RowsQR.of(yd, self.basis.k)]
            acc[0] += len(yd)
            acc[2] += yd.sum(0)
            acc[3].merge(RowsQR.of(yd, self.basis.k))
            return acc
        raise ConfigError(f"unknown subspace pass {self.kind!r}.")

    def finish(self, acc: Any) -> Any:
        """The block's partial sums, float64 on the CPU (what is merged and sent between processes)."""
        if acc is None:
            raise InputError("a block of the lowdim fit data has no batches.")
        cpu = lambda d: {k: v.double().cpu() for k, v in d.items()}  # noqa: E731
        if self.kind == MOMENTS:
            m = acc.moments
            return MomentSums(GradMoments(m.count, cpu(m.sum), cpu(m.sumsq)), acc.labels)
        if self.kind == CLASS_SUMS:
            return ClassSums(acc[0], cpu(acc[1]))
        return SketchSums(acc[0], cpu(acc[1]), acc[2], acc[3])


def subspace_block(spec: SubspacePass, probe: Any, batches: Any, *, first_batch: int = 0) -> Any:
    """The partial sums of pass ``spec`` over ``batches`` (an iterable of ``(x, y)``, in data order), computed
    with the probe's model alone: what a worker holding the model runs on its block of the fit data."""
    loss = probe_energy_loss(probe)
    acc = None
    with probe.eval_mode():
        for b, (x, y) in enumerate(batches):
            acc = spec.add_batch(probe.model, loss, probe.prepare(x, batch_index=first_batch + b), y, acc)
    return spec.finish(acc)


def merge_in_order(parts: Any) -> Any:
    """Merge partial sums in the order given (only the running total and one part alive at a time)."""
    out = None
    for p in parts:
        out = p if out is None else out.merge(p)
        del p  # else the merged part stays alive while the next one is computed
    if out is None:
        raise InputError("the lowdim fit data has no batches.")
    return out


class SubspaceFit:
    """Runs the passes of the subspace fit over in-memory ``Signals`` (their data source), as one block."""

    def __init__(self, signals: Signals, params: Any, progress: bool) -> None:
        self.signals = signals
        self.params = params
        self.progress = progress

    def __call__(self, spec: SubspacePass) -> Any:
        from tqdm.auto import tqdm

        bar = tqdm(self.signals.source.iter_batches(), total=self.signals.source.num_batches, desc=spec.desc,
                   leave=False, disable=None if self.progress else True)
        return subspace_block(spec, self.signals.probe, bar)


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
    y = class_labels(signals, "lowdim (average-gradient subspace)") if subspace == "average" else None
    return fit_subspace_passes(SubspaceFit(signals, params, progress), subspace=subspace, k_dims=k_dims,
                               power_iters=power_iters, params=params, seed=seed,
                               dtype=next(signals.probe.model.parameters()).dtype,
                               n_classes=None if y is None else int(y.max()) + 1)


def fit_subspace_passes(run: Any, *, subspace: str, k_dims: int, power_iters: int, params: Any, seed: int,
                        dtype: torch.dtype, n_classes: int | None = None, labels: bool = False,
                        data: str = "the lowdim fit data") -> GradientBasis:
    """:func:`fit_subspace` with the passes run by ``run(SubspacePass) -> merged partial sums`` (in memory, shard
    by shard, or on a Ray actor pool); the driver holds the P x K sketch and does the QR between passes.
    ``labels``: collect the labels in the first pass and check them there (streamed fits); the "average"
    subspace takes its class count from them unless ``n_classes`` is given."""
    labels = labels or (subspace == "average" and n_classes is None)
    first = run(SubspacePass(MOMENTS, params, labels=labels, desc="lowdim: gradient moments"))
    if labels:
        check_label_values(first.labels, "lowdim", data, None)
    mom: GradMoments = first.moments
    mu, inv = mom.mean(), mom.inverse_std()
    P = sum(v.numel() for v in mu.values())
    n = mom.count
    if subspace == "pca":
        if k_dims > min(P, n - 1):
            raise ConfigError(
                f"k_dims={k_dims} is too large for #fit samples={n} (their centred gradients span at most {n - 1} "
                f"directions) and #parameters={P}: use k_dims <= {min(P, n - 1)} or fit on more samples."
            )
        v = _power_iteration(run, mu, inv, k_dims, power_iters, seed, params)
    else:
        if n_classes is None:
            n_classes = int(first.labels.max()) + 1
        C = n_classes
        cs = run(SubspacePass(CLASS_SUMS, params, n_classes=C, desc="lowdim: class mean gradients"))
        counts = cs.counts.clamp_min(1)
        sums = _flat(cs.sums, C)
        mu_f, inv_f = _flat_vec(mu), _flat_vec(inv)
        v = (sums / counts - mu_f[:, None]) * inv_f[:, None]
        v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-30)  # L2-normalised columns, not orthogonalised
    digest = hashlib.sha256(v[:: max(1, v.shape[0] // 4096)].numpy().tobytes()).hexdigest()[:16]
    basis = GradBasis({k: t.to(dtype) for k, t in _unflat(v, mu).items()},
                      center={k: t.to(dtype) for k, t in mu.items()}, scale={k: t.to(dtype) for k, t in inv.items()})
    return GradientBasis(basis, digest)


def _flat_vec(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def _power_iteration(run: Any, mu: dict, inv: dict, k: int, iters: int, seed: int, params: Any) -> torch.Tensor:
    """Top-k right singular vectors of Z = (G - mu) * inv via randomised block power iteration:
    Y = Z W (projections), Q = orth(Y), W = Z^T Q, repeated; never forms Z, nor Y or Q (N x K).

    Each iteration is one pass of mergeable sums (:class:`SketchSums`): ``G^T Y``, ``1^T Y`` and the R factor
    of Y, so ``Z^T Q = (G^T Y - mu 1^T Y) * inv R^-1`` with ``Q = Y R^-1`` the Householder Q of Y (same signs as
    the in-memory QR this replaced: :class:`RowsQR`)."""
    mu_f, inv_f = _flat_vec(mu), _flat_vec(inv)
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(mu_f.numel(), k, generator=g, dtype=torch.float64))[0]
    for it in range(iters + 1):
        spec = SubspacePass(SKETCH, params, basis=GradBasis(_unflat(W, mu), center=mu, scale=inv),
                            desc=f"lowdim: Z^T Z W ({it + 1}/{iters + 1})")
        s: SketchSums = run(spec)
        del spec
        R, ysum = s.qr.r(), s.ysum
        ZtY = _flat(s.sums, k)
        del s  # in place from here: a few P x K matrices at most
        ZtY.sub_(mu_f[:, None] * ysum[None, :]).mul_(inv_f[:, None])
        ZtQ = torch.linalg.solve_triangular(_invertible(R), ZtY, upper=True, left=False)
        del ZtY
        W = torch.linalg.qr(ZtQ)[0] if it < iters else ZtQ
    # B = Q^T Z = W^T (k x P); right singular vectors of B from its k x k Gram matrix.
    gram = W.T @ W
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(1e-30), evecs[:, order]
    return (W @ evecs) / evals.sqrt()[None, :]


def _invertible(R: torch.Tensor) -> torch.Tensor:
    """R, with a warning and its zero pivots replaced when Y = Z W has rank < K (the normalised gradients span
    fewer than K directions): the matching directions of the basis are then arbitrary."""
    d = R.diagonal().abs()
    tiny = d <= d.max() * R.shape[0] * torch.finfo(R.dtype).eps
    if bool(tiny.any()):
        import warnings

        from ._checks import DegenerateFitWarning

        warnings.warn(f"lowdim: the fit samples' normalised gradients span only {int((~tiny).sum())} of the "
                      f"k_dims={R.shape[0]} directions sketched (rank-deficient Z W): the other basis directions are "
                      "arbitrary. Lower k_dims or fit on more (varied) samples.", DegenerateFitWarning, stacklevel=3)
        R = R.clone()
        R.diagonal().copy_(torch.where(tiny, d.max().clamp_min(1.0), R.diagonal()))
    return R


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
        if self._needs_labels():
            class_labels(signals, self.label)  # before the gradient passes, not after them
        self.basis_, fit_data = self._basis_for(signals)
        self._fit_head(fit_data)

    def _needs_labels(self) -> bool:
        return self.subspace == "average" or self.head != "knn"

    def fit_from_passes(self, probe: Any, run: Any, fit_signals: Any, *, data: str = "the lowdim fit data"
                        ) -> "LowDimGradient":
        """Fit with the subspace's passes run by ``run(SubspacePass) -> partial sums merged in data order`` (shard
        by shard here, or on a Ray actor pool: :func:`gradood.stream.fit_from_data`,
        :func:`gradood.distributed.fit_from_data`), then the head on ``fit_signals(requests)``: Signals of the
        fit samples (the seeded ``n_fit`` subset) holding those requests' rows and the labels. Returns self."""
        self.basis_ = fit_subspace_passes(run, subspace=self.subspace, k_dims=self.k_dims,
                                          power_iters=self.power_iters, params=self.params, seed=self.seed,
                                          dtype=next(probe.model.parameters()).dtype, labels=self._needs_labels(),
                                          data=data)
        self.request_ = GradProjections(self.basis_, self.params)
        fit_data = fit_signals([self.request_] + ([LOGITS, FEATURES] if self.ensemble > 0 else []))
        self._record_shapes(fit_data)
        self._fit_head(fit_data)
        self._after_fit(fit_data)
        self.fitted_ = True
        return self

    def _fit_head(self, fit_data: Signals) -> None:
        """Everything after the basis: the projections of the fit samples and the head fitted on them."""
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
