"""The content-addressed signal cache (gradood.cache) behind ``probe.signals(data, cache_dir=...)``.

Issue 9, item 1: another data set of the same length, or another model, in the same ``cache_dir`` is computed
afresh (never the first one's signals), with one warning. Item 2: the key covers the code of the module that
computes a signal (a perturbation or gradient request), not only the forward pass. Item 3: every cached file is
checked against its checksum; a flipped, truncated or garbled file is named, discarded and recomputed.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradood
from conftest import MLP, make_inputs, make_labels, seeded
from gradood import cache
from gradood.detectors.odin import PerturbedMSP
from gradood.signals import FEATURES, LOGITS

N, B = 40, 5
ODIN = PerturbedMSP(temperatures=(1.0, 10.0), epsilons=(0.0, 0.01))


class Counter:
    """Counts the model's forward calls (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, _m, _inputs) -> None:
        self.calls += 1


def _signals(model, x, y, d, **kw):
    return gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=d, progress=False, **kw)


def _fresh(model, x, y, requests):
    """The same signals computed without any cache (same batches, so bit for bit the same numbers)."""
    s = gradood.Probe(model).signals((x, y), batch_size=B, progress=False)
    s.require(requests)
    return s


def _cached_files(d: Path, folder: str) -> list[Path]:
    return sorted(p for p in d.glob(f"{folder}*/*.np[yz]"))


# ------------------------------------------------------------------------------ item 1: data and model in the key
def test_same_length_other_data_is_computed_not_served_from_the_cache(tmp_path):
    model = seeded(MLP, 0)
    x1, x2 = make_inputs(N, 6, seed=1), make_inputs(N, 6, seed=2)
    y = make_labels(N, 5, seed=1)
    first = _signals(model, x1, y, tmp_path)
    first.require([LOGITS, FEATURES])
    with pytest.warns(cache.CacheWarning, match=r"'logits' of 'data': .* holds it only for other data; computing"):
        second = _signals(model, x2, y, tmp_path)
        logits = second.logits
        torch.testing.assert_close(logits, _fresh(model, x2, y, [LOGITS]).logits, rtol=0, atol=0)
    assert not torch.equal(logits, first.logits)
    # both entries stay; each data set is served its own from now on, without running the model
    counter = Counter(model)
    torch.testing.assert_close(_signals(model, x1, y, tmp_path).logits, first.logits, rtol=0, atol=0)
    torch.testing.assert_close(_signals(model, x2, y, tmp_path).logits, logits, rtol=0, atol=0)
    assert counter.calls == 0


def test_other_labels_are_other_data(tmp_path):
    model = seeded(MLP, 0)
    x = make_inputs(N, 6, seed=1)
    y1, y2 = make_labels(N, 5, seed=1), make_labels(N, 5, seed=2)
    _signals(model, x, y1, tmp_path).require([LOGITS])
    with pytest.warns(cache.CacheWarning, match="only for other data"):
        assert torch.equal(_signals(model, x, y2, tmp_path).labels, y2)


def test_signals_built_before_the_cache_was_written_are_still_checked(tmp_path):
    """The old check ran only when meta.json existed as the Signals object was built."""
    model = seeded(MLP, 0)
    x1, x2 = make_inputs(N, 6, seed=1), make_inputs(N // 2, 6, seed=2)
    a = _signals(model, x1, make_labels(N, 5), tmp_path)
    b = _signals(model, x2, make_labels(N // 2, 5), tmp_path)
    a.require([LOGITS])
    with pytest.warns(cache.CacheWarning, match="other data"):
        assert b.logits.shape == (N // 2, 5)
        torch.testing.assert_close(b.logits, _fresh(model, x2, make_labels(N // 2, 5), [LOGITS]).logits,
                                   rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:the model's output differs")
@pytest.mark.parametrize("change", ["weights", "buffer", "class", "dtype", "head"])
def test_another_model_is_computed_not_served_from_the_cache(tmp_path, change):
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)
    model = seeded(MLP, 0)
    _signals(model, x, y, tmp_path).require([LOGITS, FEATURES])
    other = seeded(MLP, 0)
    head = None
    if change == "weights":
        with torch.no_grad():
            other.fc.bias[0] += 1.0
    elif change == "buffer":
        other.register_buffer("offset", torch.zeros(1))  # unused by forward: a key change, same numbers
    elif change == "class":
        other = seeded(Subclass, 0)
    elif change == "dtype":
        other = other.double()
        x = x.double()
    else:
        head = "body.0"  # another layer named as the head: other logits and features
    counter = Counter(other)
    with pytest.warns(cache.CacheWarning, match="another model" if change != "head" else "other probe settings"):
        s = gradood.Probe(other, head=head).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False)
        s.require([LOGITS, FEATURES])
        want = gradood.Probe(other, head=head).signals((x, y), batch_size=B, progress=False)
        torch.testing.assert_close(s.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(s.features, want.features, rtol=0, atol=0)
        assert counter.calls > 0


class Subclass(MLP):
    """The same computation under another class: another key (its code may differ)."""


def test_the_same_data_and_model_are_served_without_running_the_model(tmp_path):
    model = seeded(MLP, 0)
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)
    first = _signals(model, x, y, tmp_path)
    first.require([LOGITS, FEATURES, ODIN])
    counter = Counter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say on a hit
        again = _signals(model, x.clone(), y.clone(), tmp_path)  # equal bytes, another object
        again.require([LOGITS, FEATURES, ODIN])
    assert counter.calls == 0
    for r in (LOGITS, FEATURES, ODIN):
        torch.testing.assert_close(again.get(r), first.get(r), rtol=0, atol=0)


def test_data_hash_covers_values_dtype_shape_order_and_batching():
    x, y = make_inputs(12, 3, seed=1), make_labels(12, 3)

    def digest(x, y, b=4):
        return gradood.Probe(seeded(MLP, 0, d_in=3)).signals((x, y), batch_size=b, progress=False).data_digest()

    base = digest(x, y)
    assert digest(x.clone(), y.clone()) == base
    bumped = x.clone()
    bumped[7, 1] = torch.nextafter(bumped[7, 1], torch.tensor(np.inf))  # one ulp
    others = [digest(bumped, y), digest(x.double(), y), digest(x.reshape(12, 3, 1), y), digest(x.flip(0), y.flip(0)),
              digest(x, y, b=6), digest(x, None), digest(x, y.flip(0))]
    assert len({base, *others}) == 1 + len(others)


def test_model_fingerprint_follows_parameters_buffers_and_classes():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fp = cache.model_fingerprint(model)
    assert cache.model_fingerprint(model) == fp
    with torch.no_grad():
        model[1].running_mean[0] += 1e-7
    assert cache.model_fingerprint(model) != fp
    model2 = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model2.load_state_dict(model.state_dict())
    assert cache.model_fingerprint(model2) == cache.model_fingerprint(model)
    model2.register_buffer("scale", torch.ones(1), persistent=False)  # not in state_dict, still in the key
    assert cache.model_fingerprint(model2) != cache.model_fingerprint(model)
    model3 = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert cache.model_fingerprint(model3) != cache.model_fingerprint(model)


# ------------------------------------------------------------------------------ item 2: the code in the key
def _edited(monkeypatch, filename: str) -> None:
    """Make gradood read ``filename`` (a path ending) as if it had been edited."""
    real = cache.read_source

    def read(path):
        data = real(path)
        return data + b"\n# edited\n" if str(path).endswith(filename) else data

    monkeypatch.setattr(cache, "read_source", read)
    # as a new process would read it (the other files as this process first read them)
    monkeypatch.setattr(cache, "_SOURCE_DIGESTS",
                        {p: d for p, d in cache._SOURCE_DIGESTS.items() if not str(p).endswith(filename)})


@pytest.mark.parametrize("edited,changes", [
    ("detectors/odin.py", {"odin", "grodin"}),            # grodin.py imports odin.py
    ("detectors/_perturb.py", {"odin", "grodin"}),       # imported by the modules defining the requests
    ("grads/engine.py", {"odin", "grodin", "logits"}),   # the gradient engine: every signal
    ("probe.py", {"odin", "grodin", "logits"}),
    ("detectors/knn.py", set()),                          # computes no signal
])
def test_code_fingerprint_covers_the_modules_that_compute_a_signal(monkeypatch, edited, changes):
    from gradood.detectors.grodin import GrodinStats

    classes = {"odin": PerturbedMSP, "grodin": GrodinStats, "logits": type(LOGITS)}
    before = {k: cache.code_fingerprint(c) for k, c in classes.items()}
    _edited(monkeypatch, edited)
    after = {k: cache.code_fingerprint(c) for k, c in classes.items()}
    assert {k for k in classes if after[k] != before[k]} == changes


def test_edited_perturbation_code_recomputes_the_signal(tmp_path, monkeypatch):
    model = seeded(MLP, 0)
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)
    _signals(model, x, y, tmp_path).require([LOGITS, ODIN])
    _edited(monkeypatch, "detectors/odin.py")
    counter = Counter(model)
    with pytest.warns(cache.CacheWarning, match=r"'odin:.*holds it only for other gradood code; computing it"):
        s = _signals(model, x, y, tmp_path)
        s.require([LOGITS, ODIN])
        assert counter.calls > 0, "the ODIN signal of the old code must not be reused"
    assert len(_cached_files(tmp_path, "odin")) == 2
    assert len(_cached_files(tmp_path, "logits")) == 1, "the forward-pass signals do not depend on odin.py"


# ------------------------------------------------------------------------------ item 3: verified reads
def _flip(path: Path, n: int = 32) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - n, len(data)):  # the array's values, past the .npy header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped bytes": (lambda p: _flip(p), r"does not match its sha256"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"has \d+ bytes instead of \d+ \(truncated"),
    "garbage checksum file": (lambda p: cache.sidecar(p).write_text("{not json"), r"has an unreadable checksum file"),
    "missing checksum file": (lambda p: cache.sidecar(p).unlink(), r"has no checksum file"),
    "empty file": (lambda p: p.write_bytes(b""), r"has 0 bytes instead of"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@pytest.mark.parametrize("target", ["features", "labels", "odin"])
def test_a_damaged_cached_array_is_named_discarded_and_recomputed(tmp_path, kind, target):
    model = seeded(MLP, 0)
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)
    requests = [LOGITS, FEATURES, ODIN]
    _signals(model, x, y, tmp_path).require(requests)
    [path] = _cached_files(tmp_path, target)
    damage, message = CORRUPTIONS[kind]
    damage(path)
    with pytest.warns(cache.CacheWarning, match=rf"cache file {re.escape(str(path))} {message}.*discarded it; it is recomputed"):
        s = _signals(model, x, y, tmp_path)
        s.require(requests)
        labels = s.labels
        want = _fresh(model, x, y, requests)
        for r in requests:
            torch.testing.assert_close(s.get(r), want.get(r), rtol=0, atol=0)
        assert torch.equal(labels, y)
    # the recomputed file is whole again: the next reader is served without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _signals(model, x, y, tmp_path)
        for r in requests:
            torch.testing.assert_close(again.get(r), want.get(r), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["flipped bytes", "truncated", "garbage checksum file"])
def test_a_damaged_partial_shard_is_discarded_and_the_pass_recomputed(tmp_path, kind):
    model = seeded(MLP, 0)
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)

    class Stop(Exception):
        pass

    def stop_at_batch_5(_m, inputs):
        if counter.calls >= 6:
            raise Stop

    counter = Counter(model)
    stopper = model.register_forward_pre_hook(stop_at_batch_5)
    with pytest.raises(Stop):
        _signals(model, x, y, tmp_path, checkpoint_every=2).require([LOGITS, FEATURES])
    stopper.remove()
    shards = sorted(tmp_path.glob("partial-*/shard-*.npz"))
    assert [s.name for s in shards] == ["shard-00000000-00000002.npz", "shard-00000002-00000004.npz"]
    damage, message = CORRUPTIONS[kind]
    damage(shards[0])
    with pytest.warns(cache.CacheWarning, match=rf"{re.escape(shards[0].name)} {message}"):
        s = _signals(model, x, y, tmp_path, checkpoint_every=2)
        s.require([LOGITS, FEATURES])
        want = _fresh(model, x, y, [LOGITS, FEATURES])
        torch.testing.assert_close(s.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(s.features, want.features, rtol=0, atol=0)
    assert not list(tmp_path.glob("partial-*"))


def test_partial_shards_of_other_data_are_not_resumed(tmp_path):
    model = seeded(MLP, 0)
    x1, x2 = make_inputs(N, 6, seed=1), make_inputs(N, 6, seed=2)
    y = make_labels(N, 5, seed=1)

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def stop(_m, _inputs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Stop

    h = model.register_forward_pre_hook(stop)
    with pytest.raises(Stop):
        _signals(model, x1, y, tmp_path, checkpoint_every=2).require([LOGITS])
    h.remove()
    assert list(tmp_path.glob("partial-*/shard-*.npz"))
    with pytest.warns(cache.CacheWarning, match=r"interrupted extraction .* was computed from other data"):
        s = _signals(model, x2, y, tmp_path, checkpoint_every=2)
        logits = s.logits
        torch.testing.assert_close(logits, _fresh(model, x2, y, [LOGITS]).logits, rtol=0, atol=0)


def test_verified_files_roundtrip_and_npz_bytes_are_deterministic(tmp_path):
    arrays = {"id": np.arange(5.0), "ood": np.ones((2, 3), dtype=np.float32)}
    assert cache.npz_bytes(arrays) == cache.npz_bytes({k: v.copy() for k, v in arrays.items()})
    path = tmp_path / "s.npz"
    cache.write_verified(path, cache.npz_bytes(arrays), {"k": "v"})
    got = cache.load_npz(path)
    assert got.keys() == arrays.keys() and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    assert cache.read_key(path) == {"k": "v"}
    meta = json.loads(cache.sidecar(path).read_text())
    assert meta["size"] == path.stat().st_size and len(meta["sha256"]) == 64
    assert cache.load_npz(tmp_path / "absent.npz") is None


@pytest.mark.filterwarnings("ignore:.*holds it only for other data")
def test_a_loader_whose_batches_change_between_passes_is_not_cached(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    model = seeded(MLP, 0)
    x, y = make_inputs(N, 6, seed=1), make_labels(N, 5, seed=1)
    _signals(model, x, y, tmp_path).require([LOGITS])  # an entry the shuffled data could match: hashed up front
    shuffled = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    s = gradood.Probe(model).signals(shuffled, cache_dir=tmp_path, progress=False)
    with pytest.warns(cache.CacheWarning, match=r"changed between two passes .*not cached"):
        logits, labels = s.logits, s.labels
    assert logits.shape == (N, 5) and sorted(labels.tolist()) == sorted(y.tolist())
    assert len(_cached_files(tmp_path, "logits")) == 1, "nothing stored for data that is never the same twice"
