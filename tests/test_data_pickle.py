"""The restricted unpickler: plain numpy arrays load at every protocol; anything else is refused before it runs."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from gradood.data import UnsafePickleError, safe_load_file, safe_loads
from gradood.data.builtin import _mnist_arrays
from gradood.errors import InputError


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_arrays_round_trip(protocol):
    obj = ({b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2, 3]},
           np.linspace(0, 1, 5, dtype=np.float32), np.int64(7))
    out = safe_loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(out[0][b"data"], obj[0][b"data"])
    np.testing.assert_array_equal(out[1], obj[1])
    assert out[0]["labels"] == [1, 2, 3] and out[2] == 7


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"x": np.zeros(3), "y": _RunsCommand(marker)})
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(payload)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="eval"):
        safe_loads(pickle.dumps(_Evaluates(), protocol=2))
    # A user-defined class is refused as well, even a harmless one.
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(InputError("x")))
    assert isinstance(UnsafePickleError("x"), InputError)


def test_object_arrays_are_refused():
    with pytest.raises(UnsafePickleError, match="object array"):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))


def test_corrupt_and_truncated_pickles_raise_input_error(tmp_path):
    good = gzip.compress(pickle.dumps(np.arange(1000), protocol=2))
    truncated = tmp_path / "t.pkl.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="t.pkl.gz.*corrupt or truncated"):
        safe_load_file(truncated)
    garbage = tmp_path / "g.pkl"
    garbage.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(InputError, match="corrupt or truncated"):
        safe_load_file(garbage)
    whole = tmp_path / "w.pkl.gz"
    whole.write_bytes(good)
    np.testing.assert_array_equal(safe_load_file(whole), np.arange(1000))


def test_mnist_pickle_conversion_recovers_bytes(tmp_path):
    """mnist.pkl.gz stores byte/256 as float32; the conversion gives back the bytes exactly."""
    rng = np.random.default_rng(0)
    parts = []
    for n in (5, 3, 4):
        b = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        parts.append((b.astype(np.float32) / 256.0, rng.integers(0, 10, n).astype(np.int64)))
    f = tmp_path / "mnist.pkl.gz"
    f.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    arrays = _mnist_arrays(f)
    for split, (x, y) in zip(("train", "val", "test"), parts):
        np.testing.assert_array_equal(arrays[f"{split}_x"].reshape(len(x), -1), np.rint(x * 256).astype(np.uint8))
        np.testing.assert_array_equal(arrays[f"{split}_y"], y)
    f.write_bytes(gzip.compress(pickle.dumps((parts[0], parts[1]), protocol=2)))
    with pytest.raises(InputError, match="not the"):
        _mnist_arrays(f)
