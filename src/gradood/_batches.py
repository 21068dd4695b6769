"""Turning whatever the user passes as data into a stream of ``(inputs, labels)`` batches.

Accepted: a ``torch.utils.data.DataLoader`` (yielding ``x``, ``(x, y)``, ``[x, y, ...]`` or a dict), a
``torch.utils.data.Dataset``, a tensor or numpy array of inputs, a tuple ``(inputs, labels)`` of
tensors/arrays, or a dict of equal-length tensors such as a tokenizer's output (a transformers
``BatchEncoding``): ``{"input_ids": N x L, "attention_mask": N x L, ...}``, N samples along dim 0.

*Inputs* are either one tensor (the model is called as ``model(x)``) or a dict of tensors (called as
``model(**x)``, as HuggingFace models expect). A dict batch with an ``"x"``/``"input"``/``"image"`` entry is
read the old way (that entry is the input tensor); any other dict is the model's keyword arguments, minus its
labels (``"labels"`` or ``"label"``), which are never passed to the model (a HuggingFace model would
otherwise compute its training loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .errors import InputError


#: what a model is called with: one tensor (``model(x)``) or keyword tensors (``model(**x)``)
Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]

#: keys of a dict batch that hold the labels (removed from the model's keyword arguments)
LABEL_KEYS = ("labels", "label")
#: keys of a dict batch whose entry is the (single) input tensor, read the old way
_INPUT_KEYS = ("x", "input", "inputs", "image", "images")
_OLD_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise InputError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}.")


def as_inputs(a: Any, name: str = "inputs") -> Inputs:
    """A tensor, or a plain dict of tensors (numpy arrays converted) for mapping inputs."""
    if isinstance(a, Mapping):
        out: dict[str, torch.Tensor] = {}
        for k, v in a.items():
            if not isinstance(k, str):
                raise InputError(f"{name} dict keys must be strings (the model's keyword arguments), got {k!r}.")
            if not isinstance(v, (torch.Tensor, np.ndarray)):
                raise InputError(
                    f"{name} entry {k!r} is a {type(v).__name__}, not a tensor. Every entry of a dict input is "
                    "passed to the model: tokenize with return_tensors='pt' and drop non-tensor columns "
                    "(e.g. the raw text) before scoring."
                )
            out[k] = _as_tensor(v, f"{name} entry {k!r}")
        if not out:
            raise InputError(f"{name} is an empty dict: there is nothing to pass to the model.")
        return out
    return _as_tensor(a, name)


def num_rows(x: Inputs) -> int:
    """Number of samples in a batch of inputs (dim 0)."""
    if isinstance(x, dict):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take_rows(x: Inputs, rows: Any) -> Inputs:
    """Rows (a slice or an index tensor) of every input tensor."""
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def check_equal_lengths(x: dict[str, torch.Tensor], what: str = "inputs") -> int:
    """The common number of samples of a dict of tensors, or an InputError naming every length."""
    lengths = {k: (int(v.shape[0]) if v.ndim else None) for k, v in x.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise InputError(
            f"the {what} dict has entries of different lengths along dim 0 ({lengths}); every entry must hold "
            "one row per sample (N samples batched along dim 0)."
        )
    return next(iter(lengths.values()))  # type: ignore[return-value]


def split_mapping(d: Mapping[str, Any], what: str = "data") -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, labels or None)`` from a dict: the old ``{"x": ..., "y": ...}`` form, or model keyword
    arguments with the labels under ``"labels"``/``"label"``."""
    if any(k in d for k in _INPUT_KEYS):
        x = next(d[k] for k in _INPUT_KEYS if k in d)
        y = next((d[k] for k in _OLD_LABEL_KEYS if k in d), None)
        return _as_tensor(x, "inputs"), (None if y is None else _as_tensor(y, "labels"))
    labels = [k for k in LABEL_KEYS if k in d]
    if len(labels) > 1:
        raise InputError(f"the {what} dict has both 'labels' and 'label'; keep one of them.")
    y = _as_tensor(d[labels[0]], "labels") if labels else None
    x = as_inputs({k: v for k, v in d.items() if k not in LABEL_KEYS}, "inputs")
    return x, y


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
        if isinstance(d, Mapping):
            self._arrays: tuple[Inputs, torch.Tensor | None] | None = self._checked(*split_mapping(d))
        elif isinstance(d, (tuple, list)) and len(d) == 2 and not isinstance(d[0], (int, float)):
            x, y = as_inputs(d[0], "inputs"), (None if d[1] is None else _as_tensor(d[1], "labels"))
            self._arrays = self._checked(x, y)
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

    @staticmethod
    def _checked(x: Inputs, y: torch.Tensor | None) -> tuple[Inputs, torch.Tensor | None]:
        n = check_equal_lengths(x) if isinstance(x, dict) else len(x)
        if y is not None and len(y) != n:
            raise InputError(f"inputs have {n} samples but labels have {len(y)}; pass matching arrays.")
        return x, y

    @property
    def num_samples(self) -> int | None:
        if self._arrays is not None:
            return num_rows(self._arrays[0])
        ds = getattr(self.data, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None

    @property
    def num_batches(self) -> int | None:
        if self._arrays is not None:
            n = num_rows(self._arrays[0])
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
            return BatchSource((take_rows(x, idx), None if y is None else y[idx]), batch_size=self.batch_size)
        loader = self.data
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, torch.utils.data.IterableDataset):
            sub = DataLoader(torch.utils.data.Subset(loader.dataset, indices), batch_size=loader.batch_size or 1,
                             collate_fn=loader.collate_fn, num_workers=loader.num_workers, shuffle=False)
            return BatchSource(sub, batch_size=self.batch_size)
        return None

    def iter_batches(self, start_batch: int = 0) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
        """Yield ``(x, y)`` batches, ``y`` None when the source has no labels; skip the first ``start_batch``."""
        if self._arrays is not None:
            x, y = self._arrays
            for i in range(start_batch * self.batch_size, num_rows(x), self.batch_size):
                sl = slice(i, i + self.batch_size)
                yield take_rows(x, sl), (None if y is None else y[sl])
            return
        for b, item in enumerate(self.data):
            if b < start_batch:
                continue
            yield split_batch(item)


def split_batch(item: Any) -> tuple[Inputs, torch.Tensor | None]:
    """Split one item of a DataLoader into ``(inputs, labels or None)``."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, Mapping):
        return split_mapping(item, "batch")
    if isinstance(item, (tuple, list)) and len(item) >= 1:
        x = as_inputs(item[0], "inputs")
        y = item[1] if len(item) > 1 else None
        if y is not None and not isinstance(y, (torch.Tensor, np.ndarray)):
            y = None  # e.g. file names; labels are optional
        return x, (None if y is None else _as_tensor(y, "labels"))
    raise InputError(
        f"cannot read a batch of type {type(item).__name__}; the loader should yield x, (x, y) or a dict "
        "(model keyword arguments such as input_ids/attention_mask, labels under 'labels' or 'label')."
    )
