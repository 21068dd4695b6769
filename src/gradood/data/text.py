"""In-memory text datasets: texts, labels, class names; tokenised into the model's keyword tensors on demand.

A :class:`TextDataset` is the text counterpart of :class:`~gradood.data.ArrayDataset`: the same ``subset`` /
``sample`` / ``head`` methods, and :meth:`TextDataset.encode` instead of ``tensors`` (a model-specific
tokenizer turns the texts into ``{"input_ids", "attention_mask", ...}``). No tokenizer library is imported
here: the core of gradood does not need one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from .arrays import UNLABELLED

#: texts -> keyword tensors of equal length (a tokenizer with padding, return_tensors="pt")
Encoder = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with int64 labels (``-1`` = no class, e.g. out-of-scope queries) and provenance.

    ``val_rows``: for a split that concatenates an official validation part and a test part (CLINC150's
    out-of-scope ``oos`` split), the rows of the validation part; the benchmark uses them instead of a random
    hold-out.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str
    split: str = "all"
    source: str = ""
    licence: str = ""
    val_rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "classes", tuple(self.classes))
        if not all(isinstance(t, str) for t in self.texts):
            raise InputError(f"{self.name}: every text must be a str.")
        y = self.labels
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(self.texts),):
            raise InputError(f"{self.name}: labels must be int64 of shape ({len(self.texts)},), got "
                             f"{getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}.")
        if len(y) and (y.min() < UNLABELLED or (self.classes and y.max() >= len(self.classes))):
            raise InputError(f"{self.name}: labels must lie in [-1, {len(self.classes) - 1}].")

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"TextDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "TextDataset":
        idx = np.asarray(idx, dtype=np.int64)
        val = None
        if self.val_rows is not None:  # keep the official validation rows that survive, renumbered
            where = {int(r): i for i, r in enumerate(idx)}
            val = np.array(sorted(where[int(r)] for r in self.val_rows if int(r) in where), dtype=np.int64)
        return replace(self, texts=tuple(self.texts[i] for i in idx), labels=self.labels[idx], val_rows=val)

    def head(self, n: int) -> "TextDataset":
        return self.subset(np.arange(min(n, len(self))))

    def sample(self, n: int, seed: int = 0) -> "TextDataset":
        """``n`` samples drawn without replacement (seeded), in their original order."""
        if n > len(self):
            raise InputError(f"{self.name}: cannot sample {n} of {len(self)} texts.")
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    def encode(self, encoder: Encoder) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(keyword tensors for the model, labels)``: the texts through the model's tokenizer."""
        enc = {k: v for k, v in encoder(list(self.texts)).items()}
        n = {k: int(v.shape[0]) for k, v in enc.items()}
        if set(n.values()) != {len(self)}:
            raise InputError(f"{self.name}: the tokenizer returned {n} rows for {len(self)} texts.")
        return enc, torch.from_numpy(self.labels.copy())
