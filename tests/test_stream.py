"""Out of core: shards on disk, mergeable statistics, exact order statistics, fits from shards equal to the
in-memory fits, resumable and checksummed shard folders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gradood
from gradood import stream
from gradood.stream.stats import (ClassMoments, ExactRankSelector, Moments, numpy_linear_percentile,
                                  percentile_ranks)

from conftest import MLP, count_forward_passes, make_inputs, make_labels, seeded

N, D_IN, HIDDEN, C = 620, 6, 16, 5


@pytest.fixture(scope="module")
def model():
    return seeded(MLP, 3, d_in=D_IN, hidden=HIDDEN, n_classes=C, logit_scale=3.0)


@pytest.fixture(scope="module")
def data():
    return make_inputs(N, D_IN, seed=1), make_labels(N, C, seed=2)


@pytest.fixture(scope="module")
def memory(model, data):
    return gradood.Probe(model).signals(data, batch_size=50, progress=False)


@pytest.fixture(scope="module")
def shards(model, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "fit"
    req = [gradood.LOGITS, gradood.FEATURES]
    return stream.extract_to_shards(gradood.Probe(model), data, req, folder, shard_rows=128, batch_size=50,
                                    progress=False)


def test_shards_hold_exactly_the_in_memory_signals(shards, memory):
    assert len(shards) == N
    assert [s.rows for s in shards.shards] == [150, 150, 150, 150, 20]  # 3 batches of 50 each, then the rest
    for key, want in ((gradood.FEATURES.key, memory.features), (gradood.LOGITS.key, memory.logits)):
        got = np.concatenate([np.asarray(a) for a in shards.iter_arrays(key)])
        assert np.array_equal(got, want.numpy())
    labels = torch.cat([s.labels for s in shards.iter_signals()])
    assert torch.equal(labels, memory.labels)


@pytest.mark.parametrize("name,params,rtol", [
    ("mahalanobis", {}, 1e-9), ("mahalanobis", {"ridge": 1e-3}, 1e-9), ("vim", {"dim": 6}, 1e-9),
    ("klmatching", {}, 1e-12), ("react", {}, 0), ("react", {"percentile": 37.5}, 0),
    ("rg-additive", {"n_fit": 200}, 1e-9), ("knn", {"k": 5}, 1e-5), ("knn", {"k": 3, "fraction": 0.5}, 1e-5),
    ("msp", {}, 0), ("energy", {}, 0),
])
def test_fit_from_shards_equals_the_in_memory_fit(name, params, rtol, shards, memory):
    in_memory = gradood.create(name, **params).fit(memory)
    streamed = stream.fit_streaming(gradood.create(name, **params), shards)
    want = in_memory.score(memory)
    got = stream.score_streaming(streamed, shards)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-3)
    if name == "react":
        assert streamed.clip_ == in_memory.clip_  # the exact percentile, not an approximation


def test_knn_bank_never_enters_memory(shards):
    det = stream.fit_streaming(gradood.create("knn", k=5), shards)
    assert det.bank_ is None and len(det.bank_shards_) == 5


def test_unsupported_fitted_detector_is_a_clear_error(shards):
    with pytest.raises(gradood.ConfigError, match="cannot be fitted from shards yet.*Mahalanobis"):
        stream.fit_streaming(gradood.create("mahalanobis-multilayer"), shards)


# ---------------------------------------------------------------------- statistics
def test_moments_merge_does_not_depend_on_the_partition():
    x = torch.randn(500, 7, dtype=torch.float64) * 3 + 1e4  # a large common offset
    whole = Moments.of(x)
    for cuts in ([250], [1, 2, 499], [100, 200, 300, 400]):
        parts = [Moments.of(torch.from_numpy(p)) for p in np.split(x.numpy(), cuts)]
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p)
        torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(whole.covariance().numpy(), np.cov(x.numpy().T, bias=True), rtol=1e-9)


def test_class_moments_give_the_tied_covariance():
    x, y = torch.randn(300, 4, dtype=torch.float64), make_labels(300, 3)
    m = ClassMoments.of(x[:100], y[:100]).merge(ClassMoments.of(x[100:], y[100:]))
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    torch.testing.assert_close(m.means(3), means)
    torch.testing.assert_close(m.tied_covariance(), centred.T @ centred / 300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_rank_selection_matches_sorting(dtype):
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=3000), np.zeros(4000), -rng.exponential(size=500), [np.inf, -0.0, 1e-40]])
    a = a.astype(dtype)
    chunks = np.array_split(rng.permutation(a), 7)
    ranks = [0, 1, 3999, 4500, len(a) // 2, len(a) - 1]
    sel = ExactRankSelector(ranks, dtype)
    while not sel.done:
        sel.start_pass()
        for c in chunks:
            sel.update(c)
        sel.end_pass()
    assert sel.pass_index == (2 if dtype == np.float32 else 4)
    want = np.sort(a)[ranks]
    assert np.array_equal(np.array(sel.values, dtype=dtype), want)


@pytest.mark.parametrize("q", [0.0, 12.5, 50.0, 90.0, 99.9, 100.0])
def test_linear_percentile_from_two_order_statistics_is_numpys(q):
    a = np.random.default_rng(1).normal(size=1001) ** 3
    lo, hi = percentile_ranks(len(a), q)
    s = np.sort(a)
    assert numpy_linear_percentile(s[lo], s[hi], len(a), q) == np.percentile(a, q)


# ---------------------------------------------------------------------- resumable, verified, keyed
def test_interrupted_extraction_resumes_after_the_last_shard(model, data, tmp_path, monkeypatch, shards):
    folder = tmp_path / "s"
    original = gradood.Probe.forward
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(gradood.Probe, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        stream.extract_to_shards(gradood.Probe(model), data, [gradood.FEATURES, gradood.LOGITS], folder,
                                 shard_rows=128, batch_size=50, progress=False)
    monkeypatch.setattr(gradood.Probe, "forward", original)
    counted = count_forward_passes(monkeypatch)
    again = stream.extract_to_shards(gradood.Probe(model), data, [gradood.FEATURES, gradood.LOGITS], folder,
                                     shard_rows=128, batch_size=50, progress=False)
    assert counted["n"] == 13 - 6, "two finished shards (6 batches) are not recomputed"
    for key in (gradood.FEATURES.key, gradood.LOGITS.key):
        assert np.array_equal(np.concatenate(list(again.iter_arrays(key))),
                              np.concatenate(list(shards.iter_arrays(key))))


def test_finished_folder_is_reused_only_for_the_same_model_and_data(model, data, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    req = [gradood.FEATURES]
    other = seeded(MLP, 4, d_in=D_IN, hidden=HIDDEN, n_classes=C)
    want = gradood.Probe(other).signals(data, batch_size=100, progress=False).features.numpy()
    stream.extract_to_shards(gradood.Probe(model), data, req, folder, shard_rows=200, batch_size=100, progress=False)
    calls = count_forward_passes(monkeypatch)
    stream.extract_to_shards(gradood.Probe(model), data, req, folder, shard_rows=200, batch_size=100, progress=False)
    assert calls["n"] == 0
    with pytest.warns(gradood.cache.CacheWarning, match="another model"):
        s = stream.extract_to_shards(gradood.Probe(other), data, req, folder, shard_rows=200, batch_size=100,
                                     progress=False)
    assert calls["n"] == 7
    assert np.array_equal(np.concatenate(list(s.iter_arrays(gradood.FEATURES.key))), want)
    x, y = data
    with pytest.warns(gradood.cache.CacheWarning, match="other data"):
        stream.extract_to_shards(gradood.Probe(other), (x.flip(0), y.flip(0)), req, folder, shard_rows=200,
                                 batch_size=100, progress=False)
    assert calls["n"] == 14


def test_corrupted_shard_is_named_and_recomputed(model, data, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    req = [gradood.FEATURES]
    s = stream.extract_to_shards(gradood.Probe(model), data, req, folder, shard_rows=200, batch_size=100,
                                 progress=False)
    victim = next((folder / s.shards[1].name).glob("features*.npy"))
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(gradood.InputError, match=f"{victim.name}.*does not match its sha256"):
        stream.ShardedSignals(folder)
    calls = count_forward_passes(monkeypatch)
    with pytest.warns(gradood.cache.CacheWarning, match=victim.name):
        fixed = stream.extract_to_shards(gradood.Probe(model), data, req, folder, shard_rows=200, batch_size=100,
                                         progress=False)
    assert calls["n"] == 5, "shards 1 to 3 (5 batches) are recomputed, shard 0 is kept"
    want = gradood.Probe(model).signals(data, batch_size=100, progress=False).features.numpy()
    assert np.array_equal(np.concatenate(list(fixed.iter_arrays(gradood.FEATURES.key))), want)


def test_a_folder_without_a_finished_extraction_is_a_clear_error(tmp_path):
    with pytest.raises(gradood.InputError, match="no finished shard extraction"):
        stream.ShardedSignals(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(gradood.InputError, match="shard_rows must be >= 1"):
            stream.extract_to_shards(None, None, [], tmp_path, shard_rows=0)


def test_streamed_mahalanobis_warns_on_a_rank_deficient_covariance_like_the_in_memory_fit(tmp_path):
    from gradood.detectors._checks import DegenerateFitWarning

    x = make_inputs(300, 8, seed=7).relu()
    x[:, :3] = 0.0  # three dead units
    y = make_labels(300, 4, seed=8)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(8, 4)).eval()
    shards = stream.extract_to_shards(gradood.Probe(model, head="1"), (x, y), [gradood.FEATURES], tmp_path,
                                      shard_rows=100, batch_size=50, progress=False)
    with pytest.warns(DegenerateFitWarning, match=r"rank 5 < D = 8 \(3 of 8 units are constant"):
        streamed = stream.fit_streaming(gradood.create("mahalanobis"), shards)
    with pytest.warns(DegenerateFitWarning, match=r"rank 5 < D = 8 \(3 of 8 units are constant"):
        in_memory = gradood.create("mahalanobis").fit(gradood.Probe(model, head="1").signals((x, y), progress=False))
    torch.testing.assert_close(streamed.gaussian_.precision, in_memory.gaussian_.precision)
