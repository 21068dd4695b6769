"""The dataset registry, the built-in datasets (real files, fetched once into the user cache) and ArrayDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradood import data
from gradood.data import ArrayDataset, open_set_split
from gradood.errors import ConfigError, InputError


def test_registry_lists_names_and_rejects_unknown():
    names = data.available()
    for n in ("mnist", "fashion_mnist", "animal_mnist", "digits", "uniform_noise", "gaussian_noise",
              "foolbox_mnist", "foolbox_fashion_mnist", "foolbox_cifar10", "foolbox_cifar100", "foolbox_imagenet",
              "cifar10", "cifar100", "svhn", "image_folder"):
        assert n in names
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*mnist"):
        data.load("nope")
    with pytest.raises(ConfigError, match="no split 'dev'.*train"):
        data.load("mnist", "dev")
    with pytest.raises(ConfigError, match="does not take"):
        data.load("digits", bogus=1)


def test_mnist_splits():
    test = data.load("mnist")
    assert test.split == "test" and test.images.shape == (10000, 1, 28, 28) and test.images.dtype == np.uint8
    assert len(data.load("mnist", "val")) == 10000
    full = data.load("mnist", "train+val")
    assert len(full) == 60000 and np.bincount(full.labels).tolist()[:2] == [5923, 6742]  # official MNIST counts
    assert test.mean == (0.1307,) and test.std == (0.3081,)
    assert "CC BY-SA 3.0" in test.licence


def test_fashion_mnist():
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert abs(train.images.mean() / 255 - 0.2860) < 1e-3 and test.classes[9] == "Ankle boot"
    assert test.licence == "MIT"


def test_fashion_mnist_sources_and_local_root(tmp_path):
    from gradood.data.builtin import FASHION_FILES, fashion_mnist_resource
    from gradood.data.sources import DebMember, SystemFile, Url, fetch

    res = fashion_mnist_resource("t10k-labels-idx1-ubyte.gz")
    assert [type(s) for s in res.sources] == [SystemFile, DebMember, Url]
    assert res.sources[0].path == "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    for name in ("t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (tmp_path / name).write_bytes(fetch(fashion_mnist_resource(name)).read_bytes())
    local = data.load("fashion_mnist", "test", root=str(tmp_path))
    assert np.array_equal(local.labels, data.load("fashion_mnist", "test").labels)
    assert len(FASHION_FILES) == 4


def test_animal_mnist_and_digits():
    animals = data.load("animal_mnist")
    assert animals.images.shape == (10000, 1, 28, 28) and np.bincount(animals.labels).tolist() == [1000] * 10
    digits = data.load("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.max() == 1.0
    assert digits.resized(28).images.shape == (1797, 1, 28, 28)


@pytest.mark.parametrize("name, shape, first_labels", [
    ("foolbox_mnist", (1, 28, 28), [7, 2, 1, 0, 4]),
    ("foolbox_fashion_mnist", (1, 28, 28), [9, 2, 1, 1, 6]),
    ("foolbox_cifar10", (3, 32, 32), [3, 8, 8, 0, 6]),
    ("foolbox_cifar100", (3, 32, 32), [49, 33, 72, 51, 71]),
    ("foolbox_imagenet", (3, 224, 224), [243, 559, 438, 990, 949]),
])
def test_foolbox_samples(name, shape, first_labels):
    ds = data.load(name)
    assert len(ds) == 20 and ds.shape == shape and ds.labels[:5].tolist() == first_labels


def test_noise_is_seeded_and_shaped():
    a = data.load("uniform_noise", n=7, shape=(3, 5, 4), seed=3)
    b = data.load("uniform_noise", n=7, shape=(3, 5, 4), seed=3)
    assert a.images.shape == (7, 3, 5, 4) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, data.load("uniform_noise", n=7, shape=(3, 5, 4), seed=4).images)
    g = data.load("gaussian_noise", n=200, seed=0)
    assert 0 <= g.images.min() and g.images.max() <= 1 and (g.labels == -1).all()
    # ODIN's N(0.5, 1) clipped: about 31% of pixels at each bound
    assert 0.25 < (g.images == 0).mean() < 0.37
    with pytest.raises(ConfigError):
        data.load("gaussian_noise", shape=(28, 28))


def tiny(n=6, c=1, dtype=np.uint8) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, c, 4, 4)).astype(np.uint8)
    if dtype == np.float32:
        x = x.astype(np.float32) / 255
    return ArrayDataset(x, np.arange(n, dtype=np.int64) % 3, ("a", "b", "c"), (0.5,) * c, (0.25,) * c, name="tiny")


def test_normalisation_and_loader_agree():
    ds = tiny()
    x, y = ds.tensors()
    expected = (torch.from_numpy(ds.images).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    xs, ys = zip(*ds.loader(batch_size=4))
    torch.testing.assert_close(torch.cat(xs), x)
    assert torch.equal(torch.cat(ys), y) and ys[0].dtype == torch.int64
    x2, _ = ds.tensors(mean=0.0, std=1.0)
    torch.testing.assert_close(x2, torch.from_numpy(ds.images).float() / 255)
    assert torch.equal(ds.tensors(normalize=False)[0], tiny(dtype=np.float32).tensors(normalize=False)[0])
    shuffled = torch.cat([b[1] for b in ds.loader(batch_size=2, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == sorted(y.tolist())
    assert torch.equal(shuffled, torch.cat([b[1] for b in ds.loader(batch_size=2, shuffle=True, seed=1)]))
    item_x, item_y = ds.torch_dataset()[2]
    torch.testing.assert_close(item_x, x[2])
    assert int(item_y) == 2


def test_derived_datasets():
    ds = tiny(c=1)
    rgb = ds.with_channels(3)
    assert rgb.shape == (3, 4, 4) and rgb.mean == (0.5, 0.5, 0.5)
    assert rgb.with_channels(1).shape == (1, 4, 4)
    assert ds.with_normalization(0.1, 0.2).std == (0.2,)
    assert len(ds.head(2)) == 2 and len(ds.sample(3, seed=0)) == 3
    assert ds.resized((8, 6)).images.shape == (6, 1, 8, 6)


def test_open_set_split():
    ds = tiny(n=9)
    id_part, ood_part = open_set_split(ds, [2, 0])
    assert id_part.classes == ("c", "a") and sorted(set(id_part.labels.tolist())) == [0, 1]
    assert set(ood_part.labels.tolist()) == {1} and len(id_part) + len(ood_part) == 9
    assert open_set_split(ds, [2], relabel=False)[0].labels.tolist() == [2, 2, 2]
    with pytest.raises(InputError):
        open_set_split(ds, [5])


def test_validation_errors():
    x = np.zeros((2, 1, 3, 3), np.uint8)
    with pytest.raises(InputError, match="int64"):
        ArrayDataset(x, np.zeros(2, np.int32), ("a",), (0.5,), (0.5,), name="bad")
    with pytest.raises(InputError, match="N x C x H x W"):
        ArrayDataset(x[0], np.zeros(1, np.int64), ("a",), (0.5,), (0.5,), name="bad")
    with pytest.raises(InputError, match="channels"):
        ArrayDataset(x, np.zeros(2, np.int64), ("a",), (0.5, 0.5), (0.5,), name="bad")
    with pytest.raises(InputError, match="labels must lie"):
        ArrayDataset(x, np.array([0, 3]), ("a",), (0.5,), (0.5,), name="bad")
