"""Signals: on-disk cache (reload without the model, atomic files, resume after an interruption),
subsets and ``from_arrays`` validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gradood
from conftest import MLP, make_inputs, make_labels, seeded
from gradood.cache import atomic_write_bytes
from gradood.signals import FEATURES, LOGITS, Signals

N, B = 40, 5  # 8 batches


class Interrupt(Exception):
    """Stands for a crash / Ctrl-C in the middle of an extraction."""


def _data(n=N):
    x = make_inputs(n, 6, seed=1)
    x[:, 0] = torch.arange(n, dtype=x.dtype)  # sample id, visible to a forward hook
    return x, make_labels(n, 5, seed=1)


class Recorder:
    """A forward pre-hook on the model: records the sample ids of every forward call; optionally raises."""

    def __init__(self, model, raise_at_id: int | None = None):
        self.ids: list[int] = []
        self.calls = 0
        self.raise_at_id = raise_at_id
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, _m, inputs):
        ids = inputs[0][:, 0].round().long().tolist()
        if self.raise_at_id is not None and max(ids) >= self.raise_at_id:
            raise Interrupt(f"interrupted at batch with ids {ids}")
        self.calls += 1
        self.ids.extend(ids)


def _tmp_files(d: Path):
    return [p for p in d.rglob("*") if p.name.endswith(".tmp")]


def _reference(model, data):
    """An uninterrupted run without a cache (same data object, so the same batches bit for bit)."""
    return gradood.Probe(model).signals(data, batch_size=B, progress=False)


# ----------------------------------------------------------------------------------------- cache
def test_cache_reload_does_not_run_the_model(tmp_path):
    model = seeded(MLP, 0)
    x, y = _data()
    s1 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False)
    s1.require([LOGITS, FEATURES])
    arrays = sorted(tmp_path.rglob("*.npy"))
    assert [p.parent.name.split("-")[0] for p in arrays] == ["features", "labels", "logits"]
    assert all(p.with_name(p.name + ".sha256").exists() for p in arrays), "every array has its checksum file"
    assert _tmp_files(tmp_path) == []

    rec = Recorder(model)
    s2 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False)
    assert torch.equal(s2.logits, s1.logits)
    assert torch.equal(s2.features, s1.features)
    assert torch.equal(s2.labels, y)
    assert len(s2) == N
    scores = gradood.create("gradnorm").score(s2)
    np.testing.assert_array_equal(scores, gradood.create("gradnorm").score(s1))
    assert rec.calls == 0


def test_cache_without_labels_reloads_without_the_model(tmp_path):
    model = seeded(MLP, 0)
    x, _ = _data()
    gradood.Probe(model).signals(x, batch_size=B, cache_dir=tmp_path, progress=False).require([LOGITS])
    assert [p.read_bytes() for p in (tmp_path / "labels").glob("*.npy")] == [b"none"]
    rec = Recorder(model)
    s2 = gradood.Probe(model).signals(x, batch_size=B, cache_dir=tmp_path, progress=False)
    assert s2.labels is None
    assert s2.logits.shape == (N, 5)
    assert rec.calls == 0


def test_new_requests_are_added_to_the_cache(tmp_path):
    model = seeded(MLP, 0)
    x, y = _data()
    gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False).require([LOGITS])
    rec = Recorder(model)
    s2 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False)
    tap = gradood.Tap("body.0")
    s2.require([LOGITS, tap])  # logits from disk, the tap needs one pass
    assert sorted(set(rec.ids)) == list(range(N))
    with torch.no_grad():
        torch.testing.assert_close(s2.get(tap), model.body[0](x))
    rec.calls = 0
    s3 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(s3.get(tap), s2.get(tap), rtol=0, atol=0)
    assert rec.calls == 0


def test_cache_of_other_data_size_is_recomputed_with_a_warning(tmp_path):
    model = seeded(MLP, 0)
    x, y = _data()
    probe = gradood.Probe(model)
    probe.signals((x, y), batch_size=B, cache_dir=tmp_path, progress=False).require([LOGITS])
    with pytest.warns(gradood.cache.CacheWarning, match=r"holds it only for other data; computing it under a new key"):
        s2 = probe.signals((x[:30], y[:30]), batch_size=B, cache_dir=tmp_path, progress=False)
        assert len(s2.logits) == 30
    with torch.no_grad():
        torch.testing.assert_close(s2.logits, model(x[:30]))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, 12345)  # not bytes: the write fails half-way
    assert path.read_bytes() == b"old"
    assert _tmp_files(tmp_path) == []
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert _tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("fmt", ["tuple", "loader"])
def test_resume_after_interruption(tmp_path, fmt):
    model = seeded(MLP, 0)
    x, y = _data()
    data = (x, y) if fmt == "tuple" else DataLoader(TensorDataset(x, y), batch_size=B, shuffle=False)
    ref = _reference(model, data)
    ref.require([LOGITS, FEATURES])

    # run 1: checkpoints after batches 2 and 4, crash while computing batch 6 (ids 25..29)
    rec = Recorder(model, raise_at_id=25)
    s1 = gradood.Probe(model).signals(data, batch_size=B, cache_dir=tmp_path, checkpoint_every=2, progress=False)
    with pytest.raises(Interrupt):
        s1.require([LOGITS, FEATURES])
    rec.handle.remove()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith("partial-")]
    assert len(partial) == 1
    assert sorted(p.name for p in partial[0].glob("shard-*.npz")) == ["shard-00000000-00000002.npz",
                                                                      "shard-00000002-00000004.npz"]
    assert _tmp_files(tmp_path) == []
    assert not [p for p in tmp_path.rglob("*.npy")]  # nothing final written

    # run 2 (a "new process": new probe): batches before the last checkpoint are not recomputed
    rec = Recorder(model)
    s2 = gradood.Probe(model).signals(data, batch_size=B, cache_dir=tmp_path, checkpoint_every=2, progress=False)
    s2.require([LOGITS, FEATURES])
    assert min(rec.ids) == 4 * B
    assert sorted(set(rec.ids)) == list(range(4 * B, N))
    torch.testing.assert_close(s2.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(s2.features, ref.features, rtol=0, atol=0)
    assert torch.equal(s2.labels, y)
    assert not any(p.name.startswith("partial-") for p in tmp_path.iterdir())  # cleaned up
    assert _tmp_files(tmp_path) == []

    # run 3: everything from the final cache
    rec.ids.clear()
    s3 = gradood.Probe(model).signals(data, batch_size=B, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(s3.logits, ref.logits, rtol=0, atol=0)
    assert torch.equal(s3.labels, y)
    assert rec.ids == []


def test_interruption_before_first_checkpoint_restarts_cleanly(tmp_path):
    model = seeded(MLP, 0)
    x, y = _data()
    rec = Recorder(model, raise_at_id=5)
    s1 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, checkpoint_every=3, progress=False)
    with pytest.raises(Interrupt):
        s1.logits
    rec.handle.remove()
    s2 = gradood.Probe(model).signals((x, y), batch_size=B, cache_dir=tmp_path, checkpoint_every=3, progress=False)
    torch.testing.assert_close(s2.logits, _reference(model, (x, y)).logits, rtol=0, atol=0)
    assert torch.equal(s2.labels, y)


# ----------------------------------------------------------------------------------------- subset
def test_subset_of_computed_signals_and_of_an_array_source(mlp):
    x, y = _data(20)
    s = gradood.Probe(mlp).signals((x, y), batch_size=B, progress=False)
    s.require([LOGITS])
    idx = [3, 0, 17, 17, 9]
    sub = s.subset(idx, name="sub")
    assert len(sub) == 5 and sub.name == "sub"
    torch.testing.assert_close(sub.logits, s.logits[idx], rtol=0, atol=0)
    assert torch.equal(sub.labels, y[idx])
    # features were not computed before the subset: the array source is indexed, so they still can be
    with torch.no_grad():
        torch.testing.assert_close(sub.features, mlp.features(x[idx]))
    # (a subset is batched differently: float32 features may differ in the last bit)
    np.testing.assert_allclose(gradood.create("gradnorm").score(sub), gradood.create("gradnorm").score(s)[idx],
                               rtol=1e-5)
    with pytest.raises(gradood.InputError, match="empty"):
        s.subset([])


def test_subset_of_arrays_keeps_head_params():
    w, b = torch.randn(3, 4), torch.randn(3)
    s = Signals.from_arrays(features=torch.rand(6, 4), head_weight=w, head_bias=b)
    sub = s.subset(np.array([1, 2]))
    assert sub.head_params()[0] is w and sub.head_params()[1] is b
    torch.testing.assert_close(sub.features, s.features[[1, 2]])


# ----------------------------------------------------------------------------------------- from_arrays
def test_from_arrays_accepts_numpy_and_torch():
    f = np.random.default_rng(0).normal(size=(7, 3))
    h = torch.rand(7, 5, dtype=torch.float16)
    s = Signals.from_arrays(logits=f, features=h, labels=[0, 1, 2, 0, 1, 2, 0], conv=np.ones((7, 2)))
    assert len(s) == 7
    np.testing.assert_array_equal(s.logits.numpy(), f)
    assert s.features.dtype == torch.float32  # half precision is widened
    assert s.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert s.get(gradood.Tap("conv")).shape == (7, 2)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(logits=np.zeros(5)), r"logits must be a 2-D array"),
    (dict(logits=np.zeros((0, 3))), r"logits is empty"),
    (dict(logits=np.array([[0.0, np.nan]])), r"logits contain NaN or Inf; clean them"),
    (dict(features=np.array([[0.0, np.inf]])), r"features contain NaN or Inf"),
    (dict(logits=np.zeros((4, 3)), features=np.zeros((5, 2))), r"features have 5 samples but other signals have 4"),
    (dict(logits=np.zeros((4, 3)), labels=[0, 1]), r"labels have 2 entries but the signals have 4"),
    (dict(labels=[0, 1]), r"needs at least one of logits=, features="),
    (dict(features=np.zeros((4, 2)), head_weight=np.zeros(3)), r"head_weight must be C x D"),
    (dict(features=np.zeros((4, 2)), head_weight=np.zeros((3, 2)), head_bias=np.zeros(2)),
     r"head_weight must be C x D and head_bias C"),
])
def test_from_arrays_validation(kwargs, pattern):
    with pytest.raises(gradood.InputError, match=pattern):
        Signals.from_arrays(**kwargs)


def test_from_arrays_missing_signal_and_head_are_explained():
    s = Signals.from_arrays(logits=np.zeros((4, 3)))
    with pytest.raises(gradood.InputError, match=r"\['features'\].*without a model.*probe.signals\(data\)"):
        s.features
    with pytest.raises(gradood.InputError, match=r"head_weight= and head_bias="):
        s.head_params()
    assert s.labels is None
