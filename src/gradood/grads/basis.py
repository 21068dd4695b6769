"""A fixed set of K directions in parameter space, stored per parameter (a P x K matrix split by layer)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ModelError

Tensors = Mapping[str, torch.Tensor]


class GradBasis:
    """K directions ``V`` (``P x K``) in the space of some parameters, stored as ``{name: (*param.shape, K)}``.

    Optional element-wise ``center`` (mu) and ``scale`` (I2), each ``{name: param.shape}``, turn the projection
    of a gradient ``g`` into ``((g - mu) * I2) . v`` -- the "NFK" normalisation of Wu et al. (low-dimensional
    gradients). Since ``((g - mu) * I2) . v = g . (I2 * v) - mu . (I2 * v)``, the scale is folded into the
    directions and the centre becomes one constant per direction (:meth:`folded`), so projecting costs the same
    with or without normalisation.

    Treat a basis as immutable: the folded form is cached.
    """

    def __init__(self, directions: Tensors, *, center: Tensors | None = None, scale: Tensors | None = None) -> None:
        if not isinstance(directions, Mapping) or not directions:
            raise ConfigError("a GradBasis needs a non-empty dict {parameter name: tensor of shape (*param.shape, K)}.")
        ks = {n: int(v.shape[-1]) if isinstance(v, torch.Tensor) and v.ndim >= 1 else None
              for n, v in directions.items()}
        if None in ks.values() or any(not v.is_floating_point() for v in directions.values()):
            raise ConfigError("every direction must be a floating-point tensor of shape (*param.shape, K).")
        if len(set(ks.values())) != 1:
            raise ConfigError(f"all directions must have the same K (last dimension); got {ks}.")
        self.directions = dict(directions)
        self.k = next(iter(ks.values()))
        self.param_shapes = {n: tuple(v.shape[:-1]) for n, v in self.directions.items()}
        self.num_params = sum(math.prod(s) for s in self.param_shapes.values())
        if self.k < 1:
            raise ConfigError("a GradBasis needs at least one direction (K >= 1).")
        if self.k > self.num_params:
            raise ConfigError(
                f"K = {self.k} directions in a space of P = {self.num_params} parameters: at most P directions "
                "can be independent. Use K <= P (or select more parameters)."
            )
        self.center = self._check_elementwise(center, "center")
        self.scale = self._check_elementwise(scale, "scale")
        self._folded_cache: tuple[Any, ...] | None = None

    def _check_elementwise(self, t: Tensors | None, what: str) -> dict[str, torch.Tensor] | None:
        if t is None:
            return None
        if set(t) != set(self.directions):
            raise ConfigError(f"{what} must have exactly the basis' parameters {sorted(self.directions)[:5]}..., "
                              f"got {sorted(t)[:5]}...")
        for n, v in t.items():
            if tuple(v.shape) != self.param_shapes[n]:
                raise ConfigError(f"{what}[{n!r}] has shape {tuple(v.shape)}, expected {self.param_shapes[n]}.")
            if not torch.isfinite(v).all():
                raise ConfigError(f"{what}[{n!r}] contains NaN or Inf (replace infinite inverse std values, e.g. "
                                  "by the largest finite one, before building the basis).")
        return dict(t)

    @property
    def names(self) -> list[str]:
        return list(self.directions)

    def __repr__(self) -> str:
        norm = ", centred" * (self.center is not None) + ", scaled" * (self.scale is not None)
        return f"GradBasis(K={self.k}, P={self.num_params}, {len(self.directions)} tensors{norm})"

    # ------------------------------------------------------------------ use
    def check_model(self, model: nn.Module) -> None:
        named = dict(model.named_parameters())
        for n, shape in self.param_shapes.items():
            if n not in named:
                raise ModelError(f"the basis has a direction block for {n!r}, which is not a parameter of the model "
                                 f"(e.g. {list(named)[:5]}).")
            if tuple(named[n].shape) != shape:
                raise ModelError(f"basis block {n!r} has parameter shape {shape}, the model's is "
                                 f"{tuple(named[n].shape)}.")

    def folded(self, dtype: torch.dtype, device: torch.device, center: Tensors | None = None,
               scale: Tensors | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: (P_n, K) matrix of I2 * V}, offset (K,) = sum mu . (I2 * V))`` on ``device`` in ``dtype``.

        ``center``/``scale`` replace the basis' own (they may not both be given); the result is cached per
        (dtype, device, identity of center and scale).
        """
        if (center is not None and self.center is not None) or (scale is not None and self.scale is not None):
            raise ConfigError("center/scale were given both in the GradBasis and as arguments; give them once.")
        mu = self._check_elementwise(center, "center") if center is not None else self.center
        i2 = self._check_elementwise(scale, "scale") if scale is not None else self.scale
        key = (dtype, str(device))
        c = self._folded_cache
        if c is not None and c[0] == key and c[1] is center and c[2] is scale:
            return c[3], c[4]
        mats: dict[str, torch.Tensor] = {}
        offset = torch.zeros(self.k, dtype=dtype, device=device)
        for n, v in self.directions.items():
            m = v.to(device=device, dtype=dtype).reshape(-1, self.k)
            if i2 is not None:
                m = m * i2[n].to(device=device, dtype=dtype).reshape(-1, 1)
            if mu is not None:
                offset += mu[n].to(device=device, dtype=dtype).reshape(-1) @ m
            mats[n] = m.contiguous()
        # Keep center/scale referenced so that the identity test above cannot match a recycled object.
        self._folded_cache = (key, center, scale, mats, offset)
        return mats, offset

    # ------------------------------------------------------------------ construction and linear algebra
    @classmethod
    def random(cls, model: nn.Module, k: int, *, params: Any = "all", example: torch.Tensor | None = None,
               generator: torch.Generator | None = None, orthonormal: bool = True) -> "GradBasis":
        """K random directions over the selected parameters (Gaussian; orthonormalised by default)."""
        from ._capture import resolve_params

        names = resolve_params(model, params, example)
        named = dict(model.named_parameters())
        dirs = {n: torch.randn(*named[n].shape, k, generator=generator, dtype=named[n].dtype).to(named[n].device)
                for n in names}
        basis = cls(dirs)
        return basis.orthonormalized() if orthonormal else basis

    @classmethod
    def from_matrix(cls, model_or_shapes: nn.Module | Mapping[str, Sequence[int]], matrix: torch.Tensor,
                    names: Sequence[str] | None = None, **kwargs: Any) -> "GradBasis":
        """Split a ``P x K`` matrix into per-parameter blocks (rows in ``names`` order, each block row-major)."""
        if isinstance(model_or_shapes, nn.Module):
            named = dict(model_or_shapes.named_parameters())
            names = list(names) if names is not None else [n for n, p in named.items() if p.requires_grad]
            shapes = {n: tuple(named[n].shape) for n in names}
        else:
            shapes = {n: tuple(s) for n, s in model_or_shapes.items()}
            names = list(names) if names is not None else list(shapes)
        P = sum(math.prod(shapes[n]) for n in names)
        if matrix.ndim != 2 or matrix.shape[0] != P:
            raise ConfigError(f"matrix must be P x K with P = {P} (the parameters' total size); got "
                              f"{tuple(matrix.shape)}.")
        out, r = {}, 0
        for n in names:
            size = math.prod(shapes[n])
            out[n] = matrix[r:r + size].reshape(*shapes[n], matrix.shape[1])
            r += size
        return cls(out, **kwargs)

    def to_matrix(self) -> torch.Tensor:
        """The ``P x K`` matrix (rows in :attr:`names` order). Allocates P x K numbers."""
        return torch.cat([v.reshape(-1, self.k) for v in self.directions.values()])

    def _row_blocks(self) -> Any:
        """``(name, rows slice, float64 copy of those rows)`` over every block, a few MB at a time."""
        step = max(1, (1 << 22) // self.k)
        for n, v in self.directions.items():
            m = v.reshape(-1, self.k)
            for r in range(0, m.shape[0], step):
                yield n, slice(r, r + step), m[r:r + step].double()

    def gram(self) -> torch.Tensor:
        """``V^T V`` (``K x K``, float64), summed over row blocks (never forms V)."""
        g = torch.zeros(self.k, self.k, dtype=torch.float64)
        for _, _, c in self._row_blocks():
            g += (c.T @ c).cpu()
        return g

    def orthonormalized(self) -> "GradBasis":
        """Orthonormal columns spanning the same space: ``V R^{-1}`` with ``V^T V = R^T R`` (Cholesky),
        applied block by block. Raises when the directions are (numerically) dependent."""
        gram = self.gram().double().cpu()
        chol, info = torch.linalg.cholesky_ex(gram)
        # a pivot tiny next to its column's norm means that direction is (numerically) a mix of the others
        pivots = chol.diagonal() / gram.diagonal().clamp_min(1e-300).sqrt()
        if int(info) != 0 or not bool((pivots > 1e-7).all()):
            raise ConfigError("the directions are linearly dependent; cannot orthonormalise them.")
        inv = torch.linalg.solve_triangular(chol.T, torch.eye(self.k, dtype=gram.dtype), upper=True)
        dirs = {n: torch.empty(v.shape, dtype=v.dtype, device=v.device) for n, v in self.directions.items()}
        for n, rows, c in self._row_blocks():
            dirs[n].view(-1, self.k)[rows] = (c @ inv.to(c.device)).to(dirs[n].dtype)
        return GradBasis(dirs, center=self.center, scale=self.scale)

    def normalized(self) -> "GradBasis":
        """Each direction scaled to unit L2 norm (not orthogonalised)."""
        norms = self.gram().diagonal().sqrt()
        if not bool((norms > 0).all()):
            raise ConfigError("a direction is zero and cannot be normalised.")
        dirs = {n: v / norms.to(device=v.device, dtype=v.dtype) for n, v in self.directions.items()}
        return GradBasis(dirs, center=self.center, scale=self.scale)
