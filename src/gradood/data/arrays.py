"""In-memory image datasets: arrays, labels, class names and the normalisation that goes with them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError

UNLABELLED = -1  # label of samples without a class (noise, unlabelled OOD sets)


def _as_tuple(v: float | Sequence[float]) -> tuple[float, ...]:
    return (float(v),) if np.isscalar(v) else tuple(float(a) for a in v)


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An image dataset held as numpy arrays.

    Attributes
    ----------
    images:
        ``N x C x H x W``, either ``uint8`` (0..255) or ``float32`` in [0, 1].
    labels:
        ``int64``, length ``N``; ``-1`` (:data:`UNLABELLED`) for samples without a class.
    classes:
        Class names, index = label.
    mean, std:
        Per-channel normalisation (in [0, 1] pixel units) conventionally used for models trained on this
        dataset. For OOD evaluation use the *model's* normalisation: ``tensors(mean=..., std=...)`` or
        :meth:`with_normalization`.
    name, split, source, licence:
        Provenance, for reports.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    split: str = "all"
    source: str = ""
    licence: str = ""

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise InputError(f"{self.name}: images must be an N x C x H x W array, "
                             f"got shape {getattr(x, 'shape', None)}.")
        if x.dtype not in (np.uint8, np.float32):
            raise InputError(f"{self.name}: images must be uint8 or float32, got {x.dtype}.")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
            raise InputError(f"{self.name}: labels must be int64 of shape ({len(x)},), got "
                             f"{getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}.")
        c = x.shape[1]
        object.__setattr__(self, "mean", _as_tuple(self.mean))
        object.__setattr__(self, "std", _as_tuple(self.std))
        object.__setattr__(self, "classes", tuple(self.classes))
        for what, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, c):
                raise InputError(f"{self.name}: {what} has {len(v)} values for {c} channels.")
        if any(s <= 0 for s in self.std):
            raise InputError(f"{self.name}: std must be positive, got {self.std}.")
        if len(y) and (y.min() < UNLABELLED or (self.classes and y.max() >= len(self.classes))):
            raise InputError(f"{self.name}: labels must lie in [-1, {len(self.classes) - 1}].")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={self.shape}, dtype={self.images.dtype}, classes={len(self.classes)})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def float_images(self) -> np.ndarray:
        """Images as float32 in [0, 1] (``uint8`` divided by 255, as torchvision's ``ToTensor``)."""
        if self.images.dtype == np.uint8:
            return self.images.astype(np.float32) / np.float32(255.0)
        return self.images

    # ------------------------------------------------------------------ torch
    def _normalize(self, x: torch.Tensor, mean, std) -> torch.Tensor:
        m = torch.tensor(_as_tuple(self.mean if mean is None else mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(_as_tuple(self.std if std is None else std), dtype=torch.float32).view(1, -1, 1, 1)
        return (x - m) / s

    def batch(self, indices: np.ndarray | slice, *, normalize: bool = True, mean=None, std=None) -> torch.Tensor:
        """Inputs ``indices`` as a float32 tensor, normalised with ``mean``/``std`` (default: the dataset's)."""
        raw = torch.from_numpy(np.ascontiguousarray(self.images[indices]))
        x = raw.float().div_(255.0) if raw.dtype == torch.uint8 else raw.float()
        return self._normalize(x, mean, std) if normalize else x

    def tensors(self, *, normalize: bool = True, mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as ``(x, y)`` tensors: x float32 ``N x C x H x W`` (normalised), y int64."""
        return self.batch(slice(None), normalize=normalize, mean=mean, std=std), torch.from_numpy(self.labels)

    def torch_dataset(self, *, normalize: bool = True, mean=None, std=None) -> "NormalizedArrayDataset":
        """A ``torch.utils.data.Dataset`` of ``(x, y)`` that normalises on the fly (no full float copy)."""
        return NormalizedArrayDataset(self, normalize=normalize, mean=mean, std=std)

    def loader(self, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0, normalize: bool = True,
               mean=None, std=None, drop_last: bool = False) -> DataLoader:
        """A ``DataLoader`` of normalised ``(x, y)`` batches; ``shuffle`` is seeded (reproducible)."""
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.torch_dataset(normalize=normalize, mean=mean, std=std), batch_size=batch_size,
                          shuffle=shuffle, generator=gen, drop_last=drop_last)

    # ------------------------------------------------------------------ derived datasets
    def with_normalization(self, mean: float | Sequence[float], std: float | Sequence[float]) -> "ArrayDataset":
        """The same data, normalised with another (e.g. the ID model's) ``mean``/``std``."""
        return replace(self, mean=_as_tuple(mean), std=_as_tuple(std))

    def subset(self, indices: np.ndarray | Sequence[int], *, split: str | None = None) -> "ArrayDataset":
        """The samples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, images=self.images[idx], labels=self.labels[idx], split=split or self.split)

    def head(self, n: int) -> "ArrayDataset":
        """The first ``n`` samples (handy for smoke tests)."""
        return self.subset(np.arange(min(n, len(self))))

    def sample(self, n: int, *, seed: int = 0) -> "ArrayDataset":
        """``n`` samples drawn without replacement, seeded."""
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        return self.subset(np.sort(idx))

    def resized(self, size: int | tuple[int, int]) -> "ArrayDataset":
        """Images resized (bilinear, antialiased) to ``size``; the result is float32 in [0, 1].

        Used to feed an OOD dataset of another resolution to a model (e.g. 8x8 digits to a 28x28 MNIST net).
        """
        hw = (size, size) if isinstance(size, int) else tuple(size)
        x = torch.from_numpy(self.float_images())
        y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
        return replace(self, images=y.numpy().astype(np.float32, copy=False))

    def with_channels(self, channels: int) -> "ArrayDataset":
        """Grey -> RGB (repeat) or RGB -> grey (ITU-R 601 luma), so OOD sets match the model's input."""
        c = self.images.shape[1]
        if c == channels:
            return self
        x = self.float_images()
        if c == 1:
            out = np.repeat(x, channels, axis=1)
            mean, std = self.mean * channels, self.std * channels  # 1-tuples repeated per channel
        elif c == 3 and channels == 1:
            w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
            out = (x * w).sum(axis=1, keepdims=True).astype(np.float32)
            mean, std = (float(np.mean(self.mean)),), (float(np.mean(self.std)),)
        else:
            raise InputError(f"{self.name}: cannot convert {c} channels to {channels}.")
        return replace(self, images=np.ascontiguousarray(out), mean=mean, std=std)


class NormalizedArrayDataset(Dataset):
    """Map-style torch dataset over an :class:`ArrayDataset`; batched reads normalise a whole batch at once."""

    def __init__(self, data: ArrayDataset, *, normalize: bool = True, mean=None, std=None) -> None:
        self.data = data
        self.normalize, self.mean, self.std = normalize, mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data.batch(slice(i, i + 1), normalize=self.normalize, mean=self.mean, std=self.std)[0]
        return x, torch.tensor(self.data.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # DataLoader calls this with a whole batch of indices: one vectorised normalisation per batch.
        idx = np.asarray(indices, dtype=np.int64)
        xb = self.data.batch(idx, normalize=self.normalize, mean=self.mean, std=self.std)
        yb = torch.from_numpy(self.data.labels[idx])
        return list(zip(xb.unbind(0), yb.unbind(0)))


def open_set_split(data: ArrayDataset, id_classes: Sequence[int], *, relabel: bool = True
                   ) -> tuple[ArrayDataset, ArrayDataset]:
    """Split a labelled dataset into an in-distribution part (classes ``id_classes``) and an OOD part
    (all other classes), as in open-set recognition benchmarks (e.g. MNIST 0-5 vs 6-9).

    With ``relabel`` the ID labels become ``0..k-1`` in the order of ``id_classes`` (so a k-way classifier
    can be trained on them); the OOD part keeps its original labels and class names.
    """
    ids = [int(c) for c in id_classes]
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"id_classes must be non-empty and distinct, got {list(id_classes)}.")
    bad = [c for c in ids if not 0 <= c < data.num_classes]
    if bad:
        raise InputError(f"{data.name} has classes 0..{data.num_classes - 1}; {bad} are not among them.")
    is_id = np.isin(data.labels, ids)
    id_part = data.subset(np.flatnonzero(is_id))
    ood_part = data.subset(np.flatnonzero(~is_id))
    tag = "classes " + ",".join(map(str, ids))
    if relabel:
        lut = np.full(max(data.num_classes, 1), UNLABELLED, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        id_part = replace(id_part, labels=lut[id_part.labels], classes=tuple(data.classes[c] for c in ids))
    id_part = replace(id_part, name=f"{data.name}[{tag}]")
    ood_part = replace(ood_part, name=f"{data.name}[not {tag}]")
    return id_part, ood_part
