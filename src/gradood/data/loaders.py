"""Loaders for datasets the user already has on disk: CIFAR-10/100 (python pickle batches), SVHN (``.mat``)
and image folders (one sub-folder of PNG/JPEG files per class).

gradood cannot fetch these here; get them from their authors (CIFAR: https://www.cs.toronto.edu/~kriz/cifar.html,
SVHN: http://ufldl.stanford.edu/housenumbers/) and pass the folder. The CIFAR batches are pickles; they are
read with gradood's restricted unpickler, which refuses anything but plain arrays.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ._safe_pickle import safe_loads
from .arrays import ArrayDataset
from .builtin import (CIFAR100_CLASSES, CIFAR100_MEAN, CIFAR100_STD, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD,
                      DIGIT_CLASSES, _decode_image)

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


# ------------------------------------------------------------------------------------------ CIFAR
def _read_members(root: str | Path, folder: str, names: Sequence[str]) -> dict[str, bytes]:
    """The raw bytes of CIFAR batch files from a folder, its ``folder`` sub-folder, or the release tar.gz."""
    root = Path(root).expanduser()
    if root.is_file() and tarfile.is_tarfile(root):
        out = {}
        with tarfile.open(root) as tar:
            for info in tar:
                base = Path(info.name).name
                if info.isfile() and base in names:
                    f = tar.extractfile(info)
                    assert f is not None
                    out[base] = f.read()
        missing = [n for n in names if n not in out]
        if missing:
            raise InputError(f"{root} lacks {', '.join(missing)}; is it the CIFAR python release?")
        return out
    for d in (root, root / folder):
        if all((d / n).is_file() for n in names):
            return {n: (d / n).read_bytes() for n in names}
    raise ConfigError(
        f"cannot find {', '.join(names)} in {root} or {root / folder}. Download the CIFAR python version "
        "(https://www.cs.toronto.edu/~kriz/cifar.html), and pass root= the extracted folder or the .tar.gz."
    )


def _get(d: dict, key: str) -> Any:
    # Batches written by Python 2 have bytes keys (read with encoding="bytes"); re-pickled ones may have str.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise InputError(f"the CIFAR batch has no '{key}' entry (keys: {sorted(map(str, d))}).")


def _cifar_batch(raw: bytes, name: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_loads(raw, encoding="bytes", source=name)
    if not isinstance(d, dict):
        raise InputError(f"{name} is not a CIFAR batch (a dict), got {type(d).__name__}.")
    x = np.asarray(_get(d, "data"))
    y = np.asarray(_get(d, label_key), dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise InputError(f"{name}: expected uint8 N x 3072 data and N labels, got {x.dtype} {x.shape}, {y.shape}.")
    return x.reshape(-1, 3, 32, 32), y


def _class_names(raw: bytes | None, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return default
    names = _get(safe_loads(raw, encoding="bytes", source="meta"), key)
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(root: str | Path, split: str = "test") -> ArrayDataset:
    """CIFAR-10 from the python release: ``data_batch_1..5`` (train, 50,000) or ``test_batch`` (10,000).

    ``root``: the extracted ``cifar-10-batches-py`` folder, its parent, or ``cifar-10-python.tar.gz``.
    Normalisation: the training set's per-channel mean/std.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    raw = _read_members(root, "cifar-10-batches-py", names)
    parts = [_cifar_batch(raw[n], n, "labels") for n in names]
    meta = _optional_member(root, "cifar-10-batches-py", "batches.meta")
    classes = _class_names(meta, "label_names", CIFAR10_CLASSES)
    return ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes,
                        CIFAR10_MEAN, CIFAR10_STD, name="cifar10", split=split, source=str(root),
                        licence="CIFAR-10 (Krizhevsky 2009); see the authors' page for terms")


def load_cifar100(root: str | Path, split: str = "test", *, labels: str = "fine") -> ArrayDataset:
    """CIFAR-100 from the python release: ``train`` (50,000) or ``test`` (10,000), with ``fine`` (100) or
    ``coarse`` (20) labels. ``root``: ``cifar-100-python``, its parent, or ``cifar-100-python.tar.gz``."""
    if labels not in ("fine", "coarse"):
        raise ConfigError(f"labels must be 'fine' or 'coarse', got {labels!r}.")
    name = "train" if split == "train" else "test"
    raw = _read_members(root, "cifar-100-python", [name])
    x, y = _cifar_batch(raw[name], name, f"{labels}_labels")
    default = CIFAR100_CLASSES if labels == "fine" else CIFAR100_COARSE_CLASSES
    classes = _class_names(_optional_member(root, "cifar-100-python", "meta"), f"{labels}_label_names", default)
    return ArrayDataset(x, y, classes, CIFAR100_MEAN, CIFAR100_STD, name="cifar100", split=split, source=str(root),
                        licence="CIFAR-100 (Krizhevsky 2009); see the authors' page for terms")


def _optional_member(root: str | Path, folder: str, name: str) -> bytes | None:
    try:
        return _read_members(root, folder, [name])[name]
    except (ConfigError, InputError):
        return None


# ------------------------------------------------------------------------------------------ SVHN
def load_svhn(root: str | Path, split: str = "test") -> ArrayDataset:
    """SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``), read with scipy.

    The files store ``X`` as 32 x 32 x 3 x N and label 10 for the digit 0; both are converted (N x 3 x 32 x 32,
    label 0). ``root``: the folder holding the ``.mat`` file, or the file itself.
    """
    from scipy.io import loadmat

    root = Path(root).expanduser()
    path = root if root.is_file() else root / f"{split}_32x32.mat"
    if not path.is_file():
        raise ConfigError(f"cannot find {path}. Download {split}_32x32.mat from http://ufldl.stanford.edu/housenumbers/"
                          " and pass root= its folder.")
    try:
        m = loadmat(path)
    except Exception as e:  # scipy raises several unrelated types for damaged files
        raise InputError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}).") from e
    if "X" not in m or "y" not in m:
        raise InputError(f"{path} has no X/y arrays; is it an SVHN *_32x32.mat file?")
    x = np.ascontiguousarray(np.asarray(m["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
    y = np.asarray(m["y"], dtype=np.int64).reshape(-1)
    y[y == 10] = 0
    if x.shape[1:] != (3, 32, 32) or len(y) != len(x):
        raise InputError(f"{path}: X has shape {m['X'].shape} and y {m['y'].shape}; expected 32x32x3xN and N.")
    return ArrayDataset(x, y, DIGIT_CLASSES, SVHN_MEAN, SVHN_STD, name="svhn", split=split, source=str(path),
                        licence="SVHN (Netzer et al. 2011): non-commercial use")


# ------------------------------------------------------------------------------------------ image folder
def load_image_folder(root: str | Path, *, size: int | None = None, grayscale: bool | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      name: str | None = None) -> ArrayDataset:
    """Images in class sub-folders (``root/<class>/*.png|jpg|jpeg``); classes sorted by name, labels their index.

    ``size`` resizes every image to ``size x size`` (needed when sizes differ). ``grayscale``: ``None`` keeps
    1 channel only when every image is grey. ``mean``/``std`` default to the data's own statistics.
    """
    root = Path(root).expanduser()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [(c, f) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ConfigError(f"{root} has no class sub-folders with .png/.jpg/.jpeg images.")
    images = [_decode_image(f.read_bytes(), size, str(f)) for _, f in files]
    want_grey = all(im.shape[0] == 1 for im in images) if grayscale is None else grayscale
    images = [_to_channels(im, 1 if want_grey else 3) for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(f"images in {root} have different sizes {sorted(shapes)[:3]}...; pass size=.")
    x = np.stack(images)
    y = np.array([classes.index(c) for c, _ in files], dtype=np.int64)
    xf = x.astype(np.float32) / 255.0
    mean = tuple(mean) if mean is not None else tuple(float(v) for v in xf.mean(axis=(0, 2, 3)))
    std = tuple(std) if std is not None else tuple(max(float(v), 1e-6) for v in xf.std(axis=(0, 2, 3)))
    return ArrayDataset(x, y, tuple(classes), mean, std, name=name or root.name, split="all", source=str(root))


def _to_channels(img: np.ndarray, c: int) -> np.ndarray:
    if img.shape[0] == c:
        return img
    if c == 3:
        return np.repeat(img, 3, axis=0)
    w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)
    return np.clip(np.rint((img.astype(np.float32) * w).sum(0, keepdims=True)), 0, 255).astype(np.uint8)
