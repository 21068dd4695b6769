"""Per-sample parameter gradients of one layer, kept in factored form.

For a layer ``y = layer(a; theta)`` and per-sample losses ``l_i``, the gradient of ``sum_i l_i`` w.r.t. the
layer's output, ``g = d(sum_i l_i)/dy``, has in row i exactly ``d l_i / d y_i`` (in eval mode sample i's loss
depends on no other sample). Each sample's parameter gradient is then a small function of ``(a_i, g_i)``:

* Linear: ``dW_i = sum_t g_it a_it^T`` (t runs over sequence positions, one position for 2-D inputs);
* Conv: the same with ``a_it`` the unfolded input patch at output position t;
* BatchNorm / GroupNorm / InstanceNorm / LayerNorm / RMSNorm: ``dw_i = sum g_i * xhat_i``, ``db_i = sum g_i``
  over the non-parameter dimensions, with ``xhat`` the normalised input;
* Embedding: ``dW_i[r] = sum_{t: idx_it = r} g_it``.

A :class:`LayerGrads` holds ``(a, g)`` for one batch and answers the four questions the engine asks
(squared norms, projections, weighted sums over samples, first and second moments) by the cheapest exact
route for the layer's shapes. The generic route forms the per-sample gradient of a chunk of samples
(never more than :data:`CHUNK_ELEMENTS` numbers at a time) and reduces it; layers override it where a
factored form is cheaper. Every method returns flattened parameter dimensions: ``(P,)`` or ``(P, K)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Largest intermediate (in numbers) a layer forms at once; chunks over samples keep below it.
CHUNK_ELEMENTS = 1 << 24

#: Cost of writing and re-reading one number, in multiply-adds. CPU GEMMs run far faster than memory, so a
#: path that writes a big tensor (a per-sample weight gradient, unfolded patches) pays for every element.
MEMORY_COST = 16.0

#: Tests and benchmarks set this to "materialize" or "factored" to force one route where a layer has two
#: (Linear on sequences, Conv); None lets each layer choose by cost.
FORCE_ROUTE: str | None = None


def _prefer_materialize(mat_cost: float, factored_cost: float) -> bool:
    if FORCE_ROUTE is not None:
        return FORCE_ROUTE == "materialize"
    return mat_cost <= factored_cost


Call = tuple[torch.Tensor, torch.Tensor]  # (layer input, gradient w.r.t. the layer output), one per call


def row_chunks(n: int, per_row: int, budget: int | None = None) -> Iterator[slice]:
    """Slices of ``range(n)`` whose rows hold at most ``budget`` numbers in total (at least one row each)."""
    most = max(1, (budget or CHUNK_ELEMENTS) // max(1, per_row))
    # equal chunks: a small remainder chunk would run its GEMMs slowly and re-read the operands
    step = -(-n // -(-n // most))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_j x[i, j] y[i, j]`` for 2-D ``x``, ``y``."""
    return (x * y).sum(1)


def row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """``sum_j x[i, j]^2`` for 2-D ``x``: one fused reduction, no squared copy."""
    return torch.linalg.vector_norm(x, dim=1).square()


def forward_is(module: nn.Module, base: type) -> bool:
    """True when ``module`` runs ``base``'s own forward (a subclass that overrides it may compute anything)."""
    return isinstance(module, base) and type(module).forward is base.forward


class LayerGrads:
    """Per-sample gradients of some parameters (``attrs``) of one layer, for one batch.

    Subclasses set ``attrs_supported`` and implement :meth:`_prepare` (turn the calls' ``(input, output
    gradient)`` pairs into the layer's factors) and :meth:`materialize`; they override the reductions where
    a factored form beats materialising.
    """

    attrs_supported: ClassVar[frozenset[str]] = frozenset()
    #: A call on one row shared by the batch (input and output with first dimension 1, e.g. HF position ids)
    #: may be broadcast to the batch: true for lookups whose output is added to per-sample activations.
    broadcasts: ClassVar[bool] = False

    def __init__(self, module: nn.Module, attrs: Sequence[str], calls: Sequence[Call], batch_size: int) -> None:
        self.module = module
        self.attrs = tuple(attrs)
        self.B = batch_size
        self.dtype = calls[0][1].dtype
        self.device = calls[0][1].device
        self._prepare(list(calls))

    # ------------------------------------------------------------------ to implement
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this module (though of a supported type) cannot use the fast path, or None."""
        return None

    @classmethod
    def unsupported_call(cls, module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> str | None:
        """Why one call of the module (its input and output) cannot use the fast path, or None."""
        return None

    def _prepare(self, calls: list[Call]) -> None:
        raise NotImplementedError

    def materialize(self, attr: str, rows: slice) -> torch.Tensor:
        """Per-sample gradients of parameter ``attr`` for samples ``rows``: ``(rows, P)``."""
        raise NotImplementedError

    def materialize_param(self, attr: str, rows: slice) -> torch.Tensor:
        """:meth:`materialize` in the parameter's own element order (what the engine's callers index by)."""
        return self.materialize(attr, rows)

    # ------------------------------------------------------------------ helpers
    def numel(self, attr: str) -> int:
        return getattr(self.module, attr).numel()

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _chunks(self, per_row: int) -> Iterator[slice]:
        return row_chunks(self.B, per_row)

    def row_slices(self, attr: str) -> Iterator[slice]:
        """Chunks of samples for the materialising routes (override when blocks are smaller than rows)."""
        return self._chunks(self.numel(attr))

    def materialize_blocks(self, attr: str, rows: slice) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(columns, per-sample gradient of those parameter entries for samples rows)`` blocks covering the
        parameter. One block by default; a layer may tile its columns to keep each block small."""
        yield slice(0, self.numel(attr)), self.materialize(attr, rows)

    # ------------------------------------------------------------------ the four reductions
    def sqnorms(self) -> torch.Tensor:
        """``||grad_i||^2`` over this layer's selected parameters, ``(B,)``."""
        return sum(self._sqnorm(a) for a in self.attrs)  # type: ignore[return-value]

    def project(self, dirs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``grad_i . V`` for ``dirs[attr]`` of shape ``(P, K)``; returns ``(B, K)``."""
        return sum(self._project(a, dirs[a]) for a in self.attrs)  # type: ignore[return-value]

    def weighted_sum(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_i w[i, k] grad_i`` as ``(P, K)`` per parameter."""
        return {a: self._weighted_sum(a, w) for a in self.attrs}

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(sum_i grad_i, sum_i grad_i**2)`` as ``(P,)`` each, per parameter."""
        return {a: self._moments(a) for a in self.attrs}

    # generic routes: materialise blocks of per-sample gradients, reduce each, drop it
    def _sqnorm(self, attr: str) -> torch.Tensor:
        out = self._zeros(self.B)
        for rows in self.row_slices(attr):
            for _, m in self.materialize_blocks(attr, rows):
                out[rows] += row_sqnorms(m)
        return out

    def _project(self, attr: str, V: torch.Tensor) -> torch.Tensor:
        out = self._zeros(self.B, V.shape[1])
        for rows in self.row_slices(attr):
            for cols, m in self.materialize_blocks(attr, rows):
                out[rows].addmm_(m, V[cols])
        return out

    def _weighted_sum(self, attr: str, w: torch.Tensor) -> torch.Tensor:
        acc = self._zeros(self.numel(attr), w.shape[1])
        for rows in self.row_slices(attr):
            for cols, m in self.materialize_blocks(attr, rows):
                acc[cols].addmm_(m.T, w[rows])
        return acc

    def _moments(self, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, ss = self._zeros(self.numel(attr)), self._zeros(self.numel(attr))
        for rows in self.row_slices(attr):
            for cols, m in self.materialize_blocks(attr, rows):
                s[cols] += m.sum(0)
                ss[cols] += (m * m).sum(0)
        return s, ss


# ---------------------------------------------------------------------------------------------- small layers
class _SmallGrads(LayerGrads):
    """Layers whose per-sample gradients are small (``B x C``): form them all once, then just slice."""

    def _prepare(self, calls: list[Call]) -> None:
        self._grads: dict[str, torch.Tensor] = {}
        for a, g in calls:
            for attr, v in self._per_sample(a, g).items():
                self._grads[attr] = v if attr not in self._grads else self._grads[attr] + v

    def _per_sample(self, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def materialize(self, attr: str, rows: slice) -> torch.Tensor:
        return self._grads[attr][rows]


class ChannelNormGrads(_SmallGrads):
    """BatchNorm (eval: running statistics), GroupNorm and InstanceNorm: per-channel affine parameters.

    Per sample and channel, ``dw = sum g * (a - mean) / sqrt(var + eps)`` and ``db = sum g`` over positions.
    Both come from BatchNorm's own fused backward kernel run on the batch folded into channels
    (``1 x (B C) x ...``) with the per-(sample, channel) statistics as "running" statistics: one pass over
    the activations, no normalised copy.
    """

    attrs_supported = frozenset({"weight", "bias"})

    def _stats(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance used to normalise each (sample, channel), flattened ``(B C,)``."""
        m, B, C = self.module, a.shape[0], a.shape[1]
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.running_mean.repeat(B), m.running_var.repeat(B)
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats and not m.training:
            return m.running_mean.repeat(B), m.running_var.repeat(B)
        groups = m.num_groups if isinstance(m, nn.GroupNorm) else C
        var, mean = torch.var_mean(a.reshape(B, groups, -1), dim=2, unbiased=False)
        per = C // groups
        return mean.repeat_interleave(per, dim=1).reshape(-1), var.repeat_interleave(per, dim=1).reshape(-1)

    def _per_sample(self, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        B, C = g.shape[0], g.shape[1]
        mean, var = self._stats(a)
        folded = (1, B * C, *a.shape[2:])
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g.reshape(folded), a.reshape(folded), None, mean, var, None, None, False, self.module.eps,
            [False, "weight" in self.attrs, "bias" in self.attrs])
        out = {}
        if "weight" in self.attrs:
            out["weight"] = gw.reshape(B, C)
        if "bias" in self.attrs:
            out["bias"] = gb.reshape(B, C)
        return out


class LayerNormGrads(_SmallGrads):
    """LayerNorm and RMSNorm: affine parameters over the trailing ``normalized_shape`` dimensions."""

    attrs_supported = frozenset({"weight", "bias"})

    def _normalize(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
        return F.rms_norm(a, m.normalized_shape, None, m.eps)

    def _per_sample(self, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        B, P = g.shape[0], math.prod(self.module.normalized_shape)
        out = {}
        if "weight" in self.attrs:
            # dimensions between the batch and the normalised ones are positions: their gradients add up
            out["weight"] = (g * self._normalize(a)).reshape(B, -1, P).sum(1)
        if "bias" in self.attrs:
            out["bias"] = g.reshape(B, -1, P).sum(1)
        return out


# ---------------------------------------------------------------------------------------------- linear
class LinearGrads(LayerGrads):
    """``nn.Linear`` on ``B x I`` or ``B x ... x I`` inputs (positions t = the middle dimensions)."""

    attrs_supported = frozenset({"weight", "bias"})

    def _in_out(self) -> tuple[int, int]:
        return self.module.in_features, self.module.out_features

    def _prepare(self, calls: list[Call]) -> None:
        I, O = self._in_out()
        a = [c[0].reshape(self.B, -1, I) for c in calls]
        g = [c[1].reshape(self.B, -1, O) for c in calls]
        # Repeated calls of one layer add their gradients: as extra positions they are exactly that.
        self.a = a[0] if len(a) == 1 else torch.cat(a, 1)
        self.g = g[0] if len(g) == 1 else torch.cat(g, 1)
        self.T, self.I, self.O = self.a.shape[1], I, O
        self.gsum = self.g.sum(1) if "bias" in self.attrs else None

    def materialize(self, attr: str, rows: slice) -> torch.Tensor:
        if attr == "bias":
            return self.gsum[rows]
        return torch.bmm(self.g[rows].transpose(1, 2), self.a[rows]).reshape(-1, self.O * self.I)

    # -- squared norms
    def _sqnorm(self, attr: str) -> torch.Tensor:
        if attr == "bias":
            return row_sqnorms(self.gsum)
        if self.T == 1 and FORCE_ROUTE != "materialize":
            return row_sqnorms(self.a[:, 0]) * row_sqnorms(self.g[:, 0])
        T, I, O = self.T, self.I, self.O
        gram = T * T * (I + O) + MEMORY_COST * T * T
        mat = T * O * I + MEMORY_COST * O * I
        if _prefer_materialize(mat, gram):
            return super()._sqnorm(attr)
        out = self._zeros(self.B)
        for rows in self._chunks(2 * T * T):
            ga = torch.bmm(self.a[rows], self.a[rows].transpose(1, 2))
            gg = torch.bmm(self.g[rows], self.g[rows].transpose(1, 2))
            out[rows] = rowdot(ga.flatten(1), gg.flatten(1))
        return out

    # -- projections: contract g with V first (no B x O x I tensor); materialise only when positions are many
    def _project(self, attr: str, V: torch.Tensor) -> torch.Tensor:
        if attr == "bias":
            return self.gsum @ V
        T, I, O, K = self.T, self.I, self.O, V.shape[1]
        direct = T * O * I * K + MEMORY_COST * T * I * K
        mat = O * I * (T + K) + MEMORY_COST * O * I
        if _prefer_materialize(mat, direct):
            return super()._project(attr, V)
        V3 = V.reshape(O, I * K)
        out = self._zeros(self.B, K)
        for rows in self._chunks(T * I * K):
            b = rows.stop - rows.start
            x = (self.g[rows].reshape(b * T, O) @ V3).reshape(b, T * I, K)
            out[rows] = torch.bmm(self.a[rows].reshape(b, 1, T * I), x).reshape(b, K)
        return out

    # -- weighted sums: (g (x) w)^T a is one GEMM over samples and positions
    def _weighted_sum(self, attr: str, w: torch.Tensor) -> torch.Tensor:
        if attr == "bias":
            return self.gsum.T @ w
        T, I, O, K = self.T, self.I, self.O, w.shape[1]
        direct = T * O * K * I + MEMORY_COST * T * O * K
        mat = O * I * (T + K) + MEMORY_COST * O * I
        if _prefer_materialize(mat, direct):
            return super()._weighted_sum(attr, w)
        acc = self._zeros(O * K, I)
        for rows in self._chunks(T * O * K):
            b = rows.stop - rows.start
            gw = (self.g[rows].unsqueeze(3) * w[rows].reshape(b, 1, 1, K)).reshape(b * T, O * K)
            acc.addmm_(gw.T, self.a[rows].reshape(b * T, I))
        return acc.reshape(O, K, I).transpose(1, 2).reshape(O * I, K)

    # -- moments: for one position, sum_i (g_i a_i^T)^2 = (g^2)^T (a^2), one GEMM
    def _moments(self, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
        if attr == "bias":
            return self.gsum.sum(0), (self.gsum * self.gsum).sum(0)
        if self.T > 1 or FORCE_ROUTE == "materialize":
            return super()._moments(attr)
        a, g = self.a[:, 0], self.g[:, 0]
        return (g.T @ a).reshape(-1), ((g * g).T @ (a * a)).reshape(-1)


class TransposedLinearGrads(LinearGrads):
    """transformers' ``Conv1D`` (GPT-2's attention and MLP layers): ``y = x W + b`` with ``W`` stored
    ``in x out``, i.e. a Linear layer with a transposed weight. The Linear rules run in ``out x in`` order;
    directions are transposed on the way in and results on the way out."""

    def _in_out(self) -> tuple[int, int]:
        return self.module.nx, self.module.nf

    def _to_linear(self, V: torch.Tensor) -> torch.Tensor:
        """``(I*O, K)`` rows in the stored (in, out) order -> ``(O*I, K)`` in Linear's (out, in) order."""
        return V.reshape(self.I, self.O, -1).transpose(0, 1).reshape(self.O * self.I, -1)

    def _from_linear(self, R: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_linear` (also for ``(O*I,)`` vectors)."""
        return R.reshape(self.O, self.I, -1).transpose(0, 1).reshape(R.shape)

    def materialize_param(self, attr: str, rows: slice) -> torch.Tensor:
        m = self.materialize(attr, rows)
        if attr == "bias":
            return m
        return m.reshape(-1, self.O, self.I).transpose(1, 2).reshape(m.shape)

    def _project(self, attr: str, V: torch.Tensor) -> torch.Tensor:
        return super()._project(attr, V if attr == "bias" else self._to_linear(V))

    def _weighted_sum(self, attr: str, w: torch.Tensor) -> torch.Tensor:
        r = super()._weighted_sum(attr, w)
        return r if attr == "bias" else self._from_linear(r)

    def _moments(self, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, ss = super()._moments(attr)
        return (s, ss) if attr == "bias" else (self._from_linear(s), self._from_linear(ss))


def _is_hf_conv1d(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"


# ---------------------------------------------------------------------------------------------- convolution
class ConvGrads(LayerGrads):
    """``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups).

    A sample's weight gradient is ``sum_t g_t U_t^T`` over output positions t, ``U_t`` the input patch.
    Squared norms come from one of two routes, chosen per layer by operation count:

    * materialise the per-sample gradients (``B x O x I k^2``, in chunks of samples): cheap when positions
      are many (early, high-resolution layers);
    * the Gram form ``sum_{t,t'} (U_t . U_t')(g_t . g_t')`` with the patch Gram built from pixel inner
      products (:meth:`_gram_sqnorm`): cheap when positions are few (late, low-resolution layers).

    Materialising itself uses the convolution weight-gradient kernel with samples folded into groups when
    positions are many, and unfolded patches x output gradients per block of output channels when they are
    few (:meth:`materialize_blocks`); projections, weighted sums and moments always materialise.
    """

    attrs_supported = frozenset({"weight", "bias"})

    def _prepare(self, calls: list[Call]) -> None:
        m = self.module
        self.d = len(m.kernel_size)
        self.G = m.groups
        self.O = m.out_channels
        self.Ig = m.in_channels // m.groups
        self.kk = 1
        for k in m.kernel_size:
            self.kk *= k
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            # Same input the layer convolved: pad explicitly (as _ConvNd does), then convolve without padding.
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            self.calls = [(F.pad(a, m._reversed_padding_repeated_twice, mode=mode), g) for a, g in calls]
            self.padding = (0,) * self.d
        else:
            self.calls = list(calls)
            self.padding = tuple(m.padding)
        self.gsum = None
        if "bias" in self.attrs:
            self.gsum = sum(g.reshape(self.B, self.O, -1).sum(2) for _, g in self.calls)

    def _positions(self) -> list[int]:
        return [g[0].numel() // self.O for _, g in self.calls]

    def materialize(self, attr: str, rows: slice) -> torch.Tensor:
        if attr == "bias":
            return self.gsum[rows]
        out = None
        for a, g in self.calls:
            w = self._per_sample_weight(a[rows], g[rows])
            out = w if out is None else out + w
        return out

    # -- materialising: the weight-gradient kernel with samples as groups (many positions), or unfolded
    #    patches x output gradients per block of output channels (few positions: the patches are then
    #    smaller than the per-sample gradient, and blocks keep the big per-sample gradient off memory)
    def _depthwise(self) -> bool:
        """Each output channel reads one input channel (``groups == in_channels > 1``, MobileNet/EfficientNet).
        The weight-gradient kernel with samples folded into groups is then the depthwise kernel, which runs
        about as fast as the backward pass's own; tiling would loop over hundreds of one-channel groups."""
        return self.Ig == 1 and self.G > 1

    def _tiled(self, attr: str) -> bool:
        if attr != "weight" or len(self.calls) > 1 or self._depthwise():
            return False
        if FORCE_ROUTE is not None:
            return FORCE_ROUTE == "factored"
        # Patches no bigger than the per-sample gradient, or groups too thin for the grouped kernel (with
        # 3 input channels it runs one tiny task per sample and stalls when threads are contended).
        return self._positions()[0] <= self.O // self.G or self.Ig * self.kk < 64

    def row_slices(self, attr: str) -> Iterator[slice]:
        if self._tiled(attr):
            return self._chunks(self.G * self.Ig * self.kk * self._positions()[0])
        return super().row_slices(attr)

    def materialize_blocks(self, attr: str, rows: slice) -> Iterator[tuple[slice, torch.Tensor]]:
        if not self._tiled(attr):
            yield from super().materialize_blocks(attr, rows)
            return
        a, g = self.calls[0]
        b, G, Og, Igkk = rows.stop - rows.start, self.G, self.O // self.G, self.Ig * self.kk
        u = self._unfold(a[rows]).transpose(2, 3)  # b, G, L, Igkk
        gg = g[rows].reshape(b, G, Og, -1)
        step = max(1, CHUNK_ELEMENTS // (b * Igkk))
        for grp in range(G):
            for o0 in range(0, Og, step):
                o1 = min(Og, o0 + step)
                m = torch.bmm(gg[:, grp, o0:o1], u[:, grp])  # b, o1-o0, Igkk
                first = (grp * Og + o0) * Igkk
                yield slice(first, first + (o1 - o0) * Igkk), m.reshape(b, -1)

    def _unfold(self, a: torch.Tensor) -> torch.Tensor:
        """Input patches ``(b, G, Ig*k..., L)``, in the weight's (channel, kernel offsets) order.

        One strided view and one copy (``F.unfold`` runs a parallel region per sample, which stalls when
        threads are contended, and exists only for 2-D).
        """
        m = self.module
        if any(self.padding):
            pads: list[int] = []
            for p in reversed(self.padding):
                pads += [p, p]
            a = F.pad(a, pads)
        a = a.contiguous()
        b, sp_in = a.shape[0], a.shape[2:]
        sp_out = [(n - dl * (k - 1) - 1) // st + 1 for n, k, dl, st in zip(sp_in, m.kernel_size, m.dilation, m.stride)]
        st_in = a.stride()[2:]
        view = a.as_strided(
            (b, a.shape[1], *m.kernel_size, *sp_out),
            (a.stride(0), a.stride(1), *[s * dl for s, dl in zip(st_in, m.dilation)],
             *[s * st for s, st in zip(st_in, m.stride)]))
        return view.reshape(b, self.G, self.Ig * self.kk, math.prod(sp_out))

    def _per_sample_weight(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-sample weight gradients ``(b, O*Ig*k...)``: the weight-gradient kernel with samples as groups."""
        m, b = self.module, a.shape[0]
        a1 = a.reshape(1, b * a.shape[1], *a.shape[2:])
        g1 = g.reshape(1, b * self.O, *g.shape[2:])
        # Only the weight's shape is read when only the weight gradient is asked for: a zero-stride stand-in.
        w = m.weight.new_zeros(()).expand(b * self.O, self.Ig, *m.kernel_size)
        gw = torch.ops.aten.convolution_backward(
            g1, a1, w, None, list(m.stride), list(self.padding), list(m.dilation), False, [0] * self.d,
            b * self.G, [False, True, False])[1]
        return gw.reshape(b, -1)

    def _sqnorm(self, attr: str) -> torch.Tensor:
        if attr == "bias":
            return row_sqnorms(self.gsum)
        if self._depthwise():  # the grouped kernel IS the depthwise kernel here: as fast as the backward's own
            return super()._sqnorm(attr)
        Ls = self._positions()
        Igkk, Og, G = self.Ig * self.kk, self.O // self.G, self.G
        # the weight-gradient kernel run with samples as groups reaches about 2/3 of dense-GEMM speed
        mat = 1.5 * sum(G * Og * Igkk * l for l in Ls) + MEMORY_COST * self.O * Igkk * len(Ls)
        if len(self.calls) > 1:  # the Gram form would need cross terms between calls: materialise
            return super()._sqnorm(attr)
        L, classes = Ls[0], self._phase_classes()
        sub = [math.prod(c.extent) for c in classes]
        gram = G * (sum(n * n for n in sub) * self.Ig + L * L * Og) \
            + MEMORY_COST * G * (sum(n * n + n * self.Ig for n in sub) + (2 * self.kk + 1) * L * L)
        if _prefer_materialize(mat, gram):
            return super()._sqnorm(attr)
        return self._gram_sqnorm(classes)

    def _phase_classes(self) -> list["_Phase"]:
        """Kernel offsets grouped by the phase (residue modulo the stride) of the input pixels they read.

        Output position t reads padded pixel ``t * stride + off * dilation`` (per spatial dimension). Writing
        ``off * dilation = phase + stride * q``, an offset reads pixel ``phase + stride * (t + q)``: a window
        at shift q of the sub-grid of pixels with that phase. Per dimension the shifts q of one phase form an
        arithmetic progression, so a phase class is a product of progressions.
        """
        m = self.module
        sp_out = self.calls[0][1].shape[2:]
        per_dim: list[dict[int, list[int]]] = []
        for k, dl, st in zip(m.kernel_size, m.dilation, m.stride):
            by_phase: dict[int, list[int]] = {}
            for o in range(k):
                by_phase.setdefault(o * dl % st, []).append(o * dl // st)
            per_dim.append(by_phase)
        classes = []
        for phases in itertools.product(*[sorted(d) for d in per_dim]):
            qs = [per_dim[i][ph] for i, ph in enumerate(phases)]
            step = tuple(q[1] - q[0] if len(q) > 1 else 1 for q in qs)
            classes.append(_Phase(phase=phases, first=tuple(q[0] for q in qs), step=step,
                                  count=tuple(len(q) for q in qs),
                                  extent=tuple(q[-1] + n for q, n in zip(qs, sp_out))))
        return classes

    def _gram_sqnorm(self, classes: list["_Phase"]) -> torch.Tensor:
        """``sum_{t,t'} (U_t . U_t')(g_t . g_t')`` without unfolding the input into patches.

        A patch inner product is a sum over kernel offsets of pixel inner products (over channels):
        ``U_t . U_t' = sum_off a[p(t) + off] . a[p(t') + off]``. Pixels at different phases modulo the
        stride never meet, so per phase the Gram matrix of that sub-grid's pixels is formed (one bmm; for
        stride 1 it is the whole padded input) and the offsets' shifted windows of it are summed (one strided
        reduction). This costs about ``L'^2 I`` per phase instead of ``L^2 I k^2``, and writes nothing
        ``k^2`` times the input.
        """
        m = self.module
        a, g = self.calls[0]
        G, Og, Ig, d = self.G, self.O // self.G, self.Ig, self.d
        sp_out = tuple(g.shape[2:])
        L = math.prod(sp_out)
        pads: list[int] = []
        for p in reversed(self.padding):
            pads += [p, p]
        sub_max = max(math.prod(c.extent) for c in classes)
        out = self._zeros(self.B)
        for rows in self._chunks(G * (sub_max * sub_max + 2 * L * L + Ig * sub_max)):
            b = rows.stop - rows.start
            ap = F.pad(a[rows], pads) if any(pads) else a[rows]
            gram_u = None
            for c in classes:
                pick = tuple(slice(ph, ph + st * (n - 1) + 1, st) for ph, st, n in zip(c.phase, m.stride, c.extent))
                sub = ap[(slice(None), slice(None)) + pick].reshape(b * G, Ig, math.prod(c.extent))
                gp = torch.bmm(sub.transpose(1, 2), sub).reshape(b * G, *c.extent, *c.extent)
                part = c.window_sum(gp, sp_out)
                gram_u = part if gram_u is None else gram_u.add_(part)
                del gp, sub
            gg = g[rows].reshape(b * G, Og, L)
            gram_g = torch.bmm(gg.transpose(1, 2), gg)
            out[rows] = rowdot(gram_u.reshape(b, -1), gram_g.reshape(b, -1))
        return out


@dataclass(frozen=True)
class _Phase:
    """Kernel offsets of one phase: per dimension, shifts ``first + step * j`` for ``j < count``."""

    phase: tuple[int, ...]
    first: tuple[int, ...]
    step: tuple[int, ...]
    count: tuple[int, ...]
    extent: tuple[int, ...]  # sub-grid size the windows need

    def window_sum(self, gp: torch.Tensor, sp_out: tuple[int, ...]) -> torch.Tensor:
        """``sum_q gp[:, t + q, t' + q]`` over this phase's shifts q, ``(n, *sp_out, *sp_out)``.

        The shifts are a product over dimensions, so the sum is separable: one dimension at a time (3 + 3
        slice-adds instead of 9 for a 3 x 3 kernel). A shift moves a pixel's row and column index together.
        """
        d = len(sp_out)
        x = gp
        for i in range(d):
            acc = None
            for j in range(self.count[i]):
                q = self.first[i] + j * self.step[i]
                block = x.narrow(1 + i, q, sp_out[i]).narrow(1 + d + i, q, sp_out[i])
                acc = block.clone() if acc is None else acc.add_(block)
            x = acc
        return x


# ---------------------------------------------------------------------------------------------- embedding
class EmbeddingGrads(LayerGrads):
    """``nn.Embedding``: a sample's gradient is non-zero only in the rows it looked up.

    Positions of one sample that look up the same row add up, so gradients are aggregated per (sample, row)
    pair first; every reduction then works on those pairs (``U x D``, U <= B x T), never on ``B x V x D``.
    """

    attrs_supported = frozenset({"weight"})
    broadcasts = True

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises looked-up rows in place during the forward pass"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by word counts of the whole batch"
        return None

    def _prepare(self, calls: list[Call]) -> None:
        Vn, D = self.module.num_embeddings, self.module.embedding_dim
        idx = torch.cat([a.reshape(self.B, -1) for a, _ in calls], 1)
        g = torch.cat([gr.reshape(self.B, -1, D) for _, gr in calls], 1)
        sample = torch.arange(self.B, device=idx.device).unsqueeze(1).expand_as(idx)
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.module.padding_idx is not None:
            keep = idx != self.module.padding_idx  # the padding row never receives a gradient
        key = (sample * Vn + idx)[keep]
        uniq, inverse = torch.unique(key, return_inverse=True)
        self.rows_sum = torch.zeros(uniq.numel(), D, dtype=g.dtype, device=g.device).index_add_(
            0, inverse, g[keep])
        self.pair_sample = uniq // Vn
        self.pair_row = uniq % Vn
        self.D, self.Vn = D, Vn

    def materialize(self, attr: str, rows: slice) -> torch.Tensor:
        b = rows.stop - rows.start
        out = self._zeros(b, self.Vn, self.D)
        sel = (self.pair_sample >= rows.start) & (self.pair_sample < rows.stop)
        out[self.pair_sample[sel] - rows.start, self.pair_row[sel]] = self.rows_sum[sel]
        return out.reshape(b, -1)

    def _sqnorm(self, attr: str) -> torch.Tensor:
        per_pair = (self.rows_sum * self.rows_sum).sum(1)
        return self._zeros(self.B).index_add_(0, self.pair_sample, per_pair)

    def _project(self, attr: str, V: torch.Tensor) -> torch.Tensor:
        K = V.shape[1]
        V3 = V.reshape(self.Vn, self.D, K)
        out = self._zeros(self.B, K)
        n = self.rows_sum.shape[0]
        for sl in row_chunks(n, self.D * K):
            per_pair = torch.bmm(self.rows_sum[sl].unsqueeze(1), V3[self.pair_row[sl]]).squeeze(1)
            out.index_add_(0, self.pair_sample[sl], per_pair)
        return out

    def _weighted_sum(self, attr: str, w: torch.Tensor) -> torch.Tensor:
        K = w.shape[1]
        acc = self._zeros(self.Vn, self.D * K)
        n = self.rows_sum.shape[0]
        for sl in row_chunks(n, self.D * K):
            contrib = self.rows_sum[sl].unsqueeze(2) * w[self.pair_sample[sl]].unsqueeze(1)
            acc.index_add_(0, self.pair_row[sl], contrib.reshape(-1, self.D * K))
        return acc.reshape(self.Vn * self.D, K)

    def _moments(self, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._zeros(self.Vn, self.D).index_add_(0, self.pair_row, self.rows_sum)
        ss = self._zeros(self.Vn, self.D).index_add_(0, self.pair_row, self.rows_sum * self.rows_sum)
        return s.reshape(-1), ss.reshape(-1)


# ---------------------------------------------------------------------------------------------- token tables
class ClsPositionGrads(_SmallGrads):
    """HF ``ViTEmbeddings``: ``[cls_token; patches] + position_embeddings``, both parameters ``1 x ...``.

    The output is ``cat(cls, patch_embeddings(x)) + pos`` (dropout is the identity in eval mode; a masked
    patch is replaced before the sum), so a sample's gradient of ``position_embeddings`` is its whole output
    gradient and that of ``cls_token`` the output gradient at position 0. The patch projection is a Conv2d
    with its own rule. Interpolated position encodings (other image sizes) fall back.
    """

    attrs_supported = frozenset({"cls_token", "position_embeddings"})

    @classmethod
    def unsupported_call(cls, module: nn.Module, a: torch.Tensor, output: torch.Tensor) -> str | None:
        if tuple(output.shape[1:]) != tuple(module.position_embeddings.shape[1:]):
            return "position embeddings interpolated to another image size"
        return None

    def _per_sample(self, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if "cls_token" in self.attrs:
            out["cls_token"] = g[:, 0].reshape(g.shape[0], -1)
        if "position_embeddings" in self.attrs:
            out["position_embeddings"] = g.reshape(g.shape[0], -1)
        return out


def _is_hf_vit_embeddings(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "ViTEmbeddings" and t.__module__ == "transformers.models.vit.modeling_vit"


# ---------------------------------------------------------------------------------------------- registry
def handler_for(module: nn.Module) -> type[LayerGrads] | None:
    """The fast-path class for a module, or None when only the torch.func fallback applies."""
    if forward_is(module, nn.Linear):
        return LinearGrads
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if forward_is(module, base):
            return ConvGrads
    batchnorm = nn.modules.batchnorm._BatchNorm
    if isinstance(module, batchnorm) and type(module).forward is batchnorm.forward:
        return ChannelNormGrads
    if forward_is(module, nn.GroupNorm):
        return ChannelNormGrads
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and \
            type(module).forward is nn.modules.instancenorm._InstanceNorm.forward:
        return ChannelNormGrads
    if forward_is(module, nn.LayerNorm):
        return LayerNormGrads
    if hasattr(nn, "RMSNorm") and forward_is(module, nn.RMSNorm):
        return LayerNormGrads
    if forward_is(module, nn.Embedding):
        return EmbeddingGrads
    # transformers classes by exact name and module (never imported here: transformers is optional)
    if _is_hf_conv1d(module):
        return TransposedLinearGrads
    if _is_hf_vit_embeddings(module):
        return ClsPositionGrads
    return None


#: Layers with a native (factored, exact) per-sample rule; anything else uses the torch.func fallback.
NATIVE_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d/2d/3d (eval)", "GroupNorm",
                 "InstanceNorm1d/2d/3d", "LayerNorm", "RMSNorm", "Embedding", "transformers Conv1D (GPT-2)",
                 "transformers ViTEmbeddings (cls token, position table)")
