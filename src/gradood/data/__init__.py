"""Datasets for OOD benchmarks: arrays + labels + normalisation, from verified (sha256) sources.

Quick use::

    from gradood import data
    data.available()                          # ['animal_mnist', 'cifar10', ..., 'mnist', ...]
    mnist = data.load("mnist", split="test")  # ArrayDataset, uint8 N x 1 x 28 x 28
    loader = mnist.loader(batch_size=256)     # normalised (x, y) batches
    ood = data.load("fashion_mnist").with_normalization(mnist.mean, mnist.std)
    id_part, ood_part = data.open_set_split(mnist, [0, 1, 2, 3, 4, 5])

Files are cached under ``$GRADOOD_CACHE`` (default ``~/.cache/gradood``). Licences: MNIST CC BY-SA 3.0,
Fashion-MNIST MIT, Animal-MNIST MIT, foolbox samples MIT (images from their datasets).
"""

from ._cache import CACHE_ENV, cache_dir, sha256_file
from ._safe_pickle import UnsafePickleError, safe_load_file, safe_loads
from .arrays import UNLABELLED, ArrayDataset, NormalizedArrayDataset, open_set_split
from .builtin import (load_animal_mnist, load_digits, load_fashion_mnist, load_foolbox_samples,
                      load_gaussian_noise, load_mnist, load_uniform_noise, read_idx)
from .loaders import load_cifar10, load_cifar100, load_image_folder, load_svhn
from .clinc150 import load_clinc150
from .text import TextDataset
from .registry import DatasetSpec, available, describe, load, register
from .sources import (AptDeb, DataUnavailableError, DebMember, PipWheel, Resource, SystemFile, Url, WheelMember,
                      deb_resource, download_url, fetch, wheel_resource)

__all__ = [
    "ArrayDataset", "NormalizedArrayDataset", "UNLABELLED", "open_set_split",
    "available", "describe", "load", "register", "DatasetSpec",
    "load_mnist", "load_fashion_mnist", "load_animal_mnist", "load_digits", "load_uniform_noise",
    "load_gaussian_noise", "load_foolbox_samples", "load_cifar10", "load_cifar100", "load_svhn",
    "load_image_folder", "read_idx", "TextDataset", "load_clinc150",
    "Resource", "SystemFile", "PipWheel", "WheelMember", "AptDeb", "DebMember", "Url", "fetch", "download_url",
    "wheel_resource", "deb_resource", "DataUnavailableError", "UnsafePickleError", "safe_loads", "safe_load_file",
    "cache_dir", "sha256_file", "CACHE_ENV",
]
