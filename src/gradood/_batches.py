"""Turning whatever the user passes as data into a stream of ``(inputs, labels)`` batches.

Accepted: a ``torch.utils.data.DataLoader`` (yielding ``x``, ``(x, y)``, ``[x, y, ...]`` or a dict with
``"x"``/``"input"`` and ``"y"``/``"label"``), a ``torch.utils.data.Dataset``, a tensor or numpy array of
inputs, or a tuple ``(inputs, labels)`` of tensors/arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .errors import InputError


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise InputError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}.")


@dataclass
class BatchSource:
    """A re-iterable, ordered source of ``(x, y)`` batches with a known length when possible.

    ``deterministic`` says whether two iterations give the same samples in the same order (needed to
    resume an interrupted extraction by skipping finished batches).
    """

    data: Any
    batch_size: int = 128

    def __post_init__(self) -> None:
        d = self.data
        if isinstance(d, (tuple, list)) and len(d) == 2 and not isinstance(d[0], (int, float)):
            x, y = _as_tensor(d[0], "inputs"), (None if d[1] is None else _as_tensor(d[1], "labels"))
            if y is not None and len(y) != len(x):
                raise InputError(f"inputs have {len(x)} samples but labels have {len(y)}; pass matching arrays.")
            self._arrays: tuple[torch.Tensor, torch.Tensor | None] | None = (x, y)
        elif isinstance(d, (torch.Tensor, np.ndarray)):
            self._arrays = (_as_tensor(d, "inputs"), None)
        else:
            self._arrays = None
            if isinstance(d, Dataset) and not isinstance(d, DataLoader):
                self.data = DataLoader(d, batch_size=self.batch_size, shuffle=False)
            elif not isinstance(d, DataLoader) and not hasattr(d, "__iter__"):
                raise InputError(
                    f"cannot read data of type {type(d).__name__}: pass a DataLoader, a Dataset, a tensor/array "
                    "of inputs, or a tuple (inputs, labels)."
                )
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")

    @property
    def num_samples(self) -> int | None:
        if self._arrays is not None:
            return len(self._arrays[0])
        ds = getattr(self.data, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None

    @property
    def num_batches(self) -> int | None:
        if self._arrays is not None:
            n = len(self._arrays[0])
            return (n + self.batch_size - 1) // self.batch_size
        try:
            return len(self.data)
        except TypeError:
            return None

    @property
    def deterministic(self) -> bool:
        if self._arrays is not None:
            return True
        return isinstance(self.data, DataLoader) and isinstance(self.data.sampler, SequentialSampler)

    def subset(self, indices: list[int]) -> "BatchSource | None":
        """A source over the given sample indices, or None when the source cannot be indexed (a generator,
        an iterable-style dataset)."""
        if self._arrays is not None:
            x, y = self._arrays
            idx = torch.as_tensor(indices, dtype=torch.long)
            return BatchSource((x[idx], None if y is None else y[idx]), batch_size=self.batch_size)
        loader = self.data
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
            sub = DataLoader(torch.utils.data.Subset(loader.dataset, indices), batch_size=loader.batch_size or 1,
                             collate_fn=loader.collate_fn, num_workers=loader.num_workers, shuffle=False)
            return BatchSource(sub, batch_size=self.batch_size)
        return None

    def iter_batches(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(x, y)`` batches, ``y`` None when the source has no labels; skip the first ``start_batch``."""
        if self._arrays is not None:
            x, y = self._arrays
            for i in range(start_batch * self.batch_size, len(x), self.batch_size):
                sl = slice(i, i + self.batch_size)
                yield x[sl], (None if y is None else y[sl])
            return
        for b, item in enumerate(self.data):
            if b < start_batch:
                continue
            yield split_batch(item)


def split_batch(item: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split one item of a DataLoader into ``(inputs, labels or None)``."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, dict):
        x = next((item[k] for k in ("x", "input", "inputs", "image", "images") if k in item), None)
        y = next((item[k] for k in ("y", "label", "labels", "target", "targets") if k in item), None)
        if x is None:
            raise InputError(f"a batch dict needs an 'x'/'input'/'image' entry; it has keys {sorted(item)}.")
        return _as_tensor(x, "inputs"), (None if y is None else _as_tensor(y, "labels"))
    if isinstance(item, (tuple, list)) and len(item) >= 1:
        x = _as_tensor(item[0], "inputs")
        y = item[1] if len(item) > 1 else None
        if y is not None and not isinstance(y, (torch.Tensor, np.ndarray)):
            y = None  # e.g. file names; labels are optional
        return x, (None if y is None else _as_tensor(y, "labels"))
    raise InputError(
        f"cannot read a batch of type {type(item).__name__}; the loader should yield x, (x, y) or a dict."
    )
