"""Loaders for user files, tested on small synthetic files written in the exact on-disk formats: CIFAR python
batches (Python 2 pickles with bytes keys), SVHN .mat, image folders, IDX."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from gradood.data import (load, load_cifar10, load_cifar100, load_image_folder, load_svhn, read_idx)
from gradood.errors import ConfigError, InputError


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as in the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(n: int, seed: int, label_keys: dict[str, int]) -> tuple[bytes, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = {k: rng.integers(0, m, n).tolist() for k, m in label_keys.items()}
    d = {b"batch_label": b"testing batch", b"data": data, b"filenames": [b"f%d.png" % i for i in range(n)],
         **{k.encode(): v for k, v in labels.items()}}
    return py2_pickle(d), data, labels


@pytest.fixture
def cifar10_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    expected = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        raw, data, labels = cifar_batch(4, i, {"labels": 10})
        (root / name).write_bytes(raw)
        expected[name] = (data, labels["labels"])
    (root / "batches.meta").write_bytes(py2_pickle({b"label_names": [b"a%d" % i for i in range(10)],
                                                     b"num_vis": 3072}))
    return root, expected


def test_cifar10_batches(cifar10_dir):
    root, expected = cifar10_dir
    test = load_cifar10(root.parent, "test")  # the parent folder works too
    data, labels = expected["test_batch"]
    assert test.images.shape == (4, 3, 32, 32) and test.images.dtype == np.uint8
    np.testing.assert_array_equal(test.images.reshape(4, -1), data)  # channel-major, as the format says
    assert test.labels.tolist() == labels and test.classes[3] == "a3"
    train = load("cifar10", "train", root=str(root))
    assert len(train) == 20
    np.testing.assert_array_equal(train.images[4:8].reshape(4, -1), expected["data_batch_2"][0])


def test_cifar10_from_release_tarball(cifar10_dir, tmp_path):
    root, expected = cifar10_dir
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    test = load_cifar10(tgz, "test")
    np.testing.assert_array_equal(test.images.reshape(4, -1), expected["test_batch"][0])


def test_cifar100_fine_and_coarse(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    raw, data, labels = cifar_batch(6, 1, {"fine_labels": 100, "coarse_labels": 20})
    (root / "test").write_bytes(raw)
    fine = load_cifar100(root, "test")
    assert fine.labels.tolist() == labels["fine_labels"] and fine.num_classes == 100 and fine.classes[0] == "apple"
    coarse = load_cifar100(tmp_path, "test", labels="coarse")
    assert coarse.labels.tolist() == labels["coarse_labels"] and coarse.num_classes == 20


def test_cifar_errors(tmp_path, cifar10_dir):
    with pytest.raises(ConfigError, match="test_batch"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="root="):
        load("cifar10")
    root, _ = cifar10_dir
    (root / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_cifar10(root)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    svhn = load("svhn", root=str(tmp_path))
    assert svhn.images.shape == (5, 3, 32, 32)
    assert svhn.labels.tolist() == [0, 1, 2, 0, 9]
    np.testing.assert_array_equal(svhn.images[2, 1], x[:, :, 1, 2])
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(InputError, match="MATLAB"):
        load_svhn(tmp_path, "train")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls, fmt in (("cats", "PNG"), ("dogs", "JPEG")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 3, 10, 12) and len(ds.mean) == 3
    grey = load("image_folder", root=str(tmp_path), size=8, grayscale=True)
    assert grey.images.shape == (6, 1, 8, 8)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "cats" / "odd.png")
    with pytest.raises(InputError, match="size="):
        load_image_folder(tmp_path)
    with pytest.raises(ConfigError):
        load_image_folder(tmp_path / "cats")  # no class sub-folders


def test_idx_reader(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2, 3, 4) + x.tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), x)
    (tmp_path / "b-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(InputError, match="truncated"):
        read_idx(tmp_path / "b-idx3-ubyte")
    (tmp_path / "c.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(InputError, match="corrupt"):
        read_idx(tmp_path / "c.gz")
