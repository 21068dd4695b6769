"""Mergeable sufficient statistics: computed per shard (or per worker), merged in a fixed order.

Every statistic here has ``merge(other)`` such that merging the statistics of any partition of the data gives
the statistic of the whole (up to float64 round-off), so a fit from shards does not depend on how the shards
were split among workers. Means and scatter matrices use the pairwise update of Chan, Golub & LeVeque
(1979), which stays accurate when features have a large common offset (a raw sum of squares would not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Count, mean and scatter ``sum (x - mean)(x - mean)^T`` of rows (float64); ``outer=False`` keeps only
    the per-column scatter (variances)."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, outer: bool = True) -> "Moments":
        x = x.double().reshape(x.shape[0], -1)
        mean = x.mean(dim=0)
        c = x - mean
        return cls(int(x.shape[0]), mean, c.T @ c if outer else (c * c).sum(dim=0))

    def merge(self, other: "Moments") -> "Moments":
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        cross = torch.outer(delta, delta) if self.m2.ndim == 2 else delta * delta
        return Moments(n, mean, self.m2 + other.m2 + cross * (self.n * other.n / n))

    def covariance(self) -> torch.Tensor:
        """The maximum-likelihood covariance ``scatter / n``."""
        return self.m2 / self.n

    def std(self) -> torch.Tensor:
        """Unbiased standard deviation (``torch.std``'s default)."""
        return (self.m2 / (self.n - 1)).sqrt()


@dataclass
class ClassMoments:
    """:class:`Moments` per class label; ``tied_covariance`` is the pooled within-class covariance."""

    per_class: dict[int, Moments]

    @classmethod
    def of(cls, x: torch.Tensor, labels: torch.Tensor) -> "ClassMoments":
        y = labels.long()
        return cls({int(c): Moments.of(x[y == c]) for c in torch.unique(y).tolist()})

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        out = dict(self.per_class)
        for c, m in other.per_class.items():
            out[c] = out[c].merge(m) if c in out else m
        return ClassMoments(out)

    def counts(self, n_classes: int) -> torch.Tensor:
        return torch.tensor([self.per_class[c].n if c in self.per_class else 0 for c in range(n_classes)])

    def means(self, n_classes: int) -> torch.Tensor:
        return torch.stack([self.per_class[c].mean for c in range(n_classes)])

    def constant_units(self) -> int:
        """Feature dimensions that take one value on every sample: no spread within any class, equal class means."""
        moments = list(self.per_class.values())
        flat = torch.stack([m.m2.diagonal() == 0 for m in moments]).all(dim=0)
        means = torch.stack([m.mean for m in moments])
        return int((flat & (means == means[0]).all(dim=0)).sum())

    def tied_covariance(self) -> torch.Tensor:
        n = sum(m.n for m in self.per_class.values())
        return sum(m.m2 for m in self.per_class.values()) / n  # type: ignore[return-value]


@dataclass
class Sums:
    """Named float64 sums and a count (e.g. KL-matching's per-class softmax sums)."""

    n: int
    values: dict[str, torch.Tensor]

    def merge(self, other: "Sums") -> "Sums":
        keys = set(self.values) | set(other.values)
        return Sums(self.n + other.n, {k: self.values.get(k, 0) + other.values.get(k, 0) for k in keys})


# ---------------------------------------------------------------------- exact order statistics
def _sort_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers that sort like the floats (IEEE-754 sign-magnitude -> two's-complement order)."""
    if values.dtype == np.float64:
        u = values.view(np.uint64)
        sign = np.uint64(1) << np.uint64(63)
    else:
        u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        sign = np.uint32(1) << np.uint32(31)
    return np.where(u & sign, ~u, u | sign)


def _from_sort_key(key: int, dtype: np.dtype) -> float:
    bits = 64 if dtype == np.float64 else 32
    sign = 1 << (bits - 1)
    u = key & ~sign if key & sign else ~key & ((1 << bits) - 1)
    arr = np.array([u], dtype=np.uint64 if bits == 64 else np.uint32)
    return float(arr.view(np.float64 if bits == 64 else np.float32)[0])


class ExactRankSelector:
    """The exact values at given ranks of all values of a stream of arrays, in passes of 16 bits of each value's
    sort key: pass p histograms the next 16 bits of the values whose higher bits match the target so far.
    float32 data needs 2 passes (float64: 4); memory is 65 536 counters per target rank.

    Use: ``sel = ExactRankSelector(ranks, dtype)``; while ``not sel.done``: ``sel.start_pass()``, feed every
    array with ``sel.update(a)`` (or merge per-shard ``sel.counts_of(a)``), then ``sel.end_pass()``;
    ``sel.values`` are the order statistics (0-based ranks)."""

    BITS = 16

    def __init__(self, ranks: list[int], dtype: np.dtype) -> None:
        self.dtype = np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)
        self.total_bits = 64 if self.dtype == np.float64 else 32
        self.ranks = list(ranks)
        self.prefix = [0] * len(ranks)  # known high bits of each target's key
        self.below = [0] * len(ranks)  # values strictly below the known prefix
        self.pass_index = 0
        self._counts: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self.pass_index * self.BITS >= self.total_bits

    def counts_of(self, a: np.ndarray) -> list[np.ndarray]:
        """This pass's histogram of ``a`` for each target rank (mergeable by addition)."""
        keys = _sort_keys(np.asarray(a).ravel().astype(self.dtype, copy=False)).astype(np.uint64)
        shift = np.uint64(self.total_bits - self.BITS * (self.pass_index + 1))
        known = self.BITS * self.pass_index
        out = []
        for prefix in self.prefix:
            k = keys
            if known:
                k = keys[(keys >> np.uint64(self.total_bits - known)) == np.uint64(prefix)]
            out.append(np.bincount(((k >> shift) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << self.BITS))
        return out

    def start_pass(self) -> None:
        self._counts = [np.zeros(1 << self.BITS, dtype=np.int64) for _ in self.ranks]

    def add_counts(self, counts: list[np.ndarray]) -> None:
        for acc, c in zip(self._counts, counts):
            acc += c

    def update(self, a: np.ndarray) -> None:
        self.add_counts(self.counts_of(a))

    def end_pass(self) -> None:
        for i, (rank, counts) in enumerate(zip(self.ranks, self._counts)):
            cum = np.cumsum(counts)
            target = rank - self.below[i]
            digit = int(np.searchsorted(cum, target, side="right"))
            self.below[i] += int(cum[digit - 1]) if digit > 0 else 0
            self.prefix[i] = (self.prefix[i] << self.BITS) | digit
        self.pass_index += 1

    @property
    def values(self) -> list[float]:
        return [_from_sort_key(p, self.dtype) for p in self.prefix]


def numpy_linear_percentile(lo: float, hi: float, n: int, q: float) -> float:
    """numpy's ``percentile(..., method="linear")`` from the two order statistics around its virtual index
    (the same float64 arithmetic as numpy's ``_lerp``)."""
    virtual = (n - 1) * (np.float64(q) / 100)
    gamma = virtual - np.floor(virtual)
    a, b = np.float64(lo), np.float64(hi)
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def percentile_ranks(n: int, q: float) -> tuple[int, int]:
    virtual = (n - 1) * (np.float64(q) / 100)
    lo = int(np.floor(virtual))
    return lo, min(lo + 1, n - 1)


# ---------------------------------------------------------------------- nearest neighbours
def merge_smallest(best: torch.Tensor | None, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest values per row of ``best`` and ``candidates`` together, sorted ascending."""
    cand = candidates if best is None else torch.cat([best, candidates], dim=1)
    return torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
