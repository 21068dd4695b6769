"""The low-dimensional gradients' subspace fit as mergeable passes (issue 11): the in-memory fit equals the
computation it replaced (written out below on explicit torch.func per-sample gradients), and the fit streamed in
1, 2, 3, ... consecutive blocks of batches equals it to float64 round-off, scores included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradood
from gradood import stream
from gradood.detectors import lowdim as L

from conftest import MLP, make_inputs, make_labels, seeded

F64 = torch.float64
N, C, K, BS = 60, 5, 3, 16


# ---------------------------------------------------------------------- references (not the code under test)
def energy_grads(model, x):
    """The explicit N x P matrix of per-sample gradients of LSE(f(x)) by torch.func (named_parameters order)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def energy(p, xi):
        return torch.logsumexp(torch.func.functional_call(model, p, (xi[None],)), dim=1)[0]

    g = torch.func.vmap(torch.func.grad(energy), in_dims=(None, 0))(params, x)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def normalised(G):
    mu = G.mean(0)
    inv = 1.0 / G.std(0, unbiased=False)
    finite = torch.isfinite(inv)
    inv[~finite] = inv[finite].max()
    return (G - mu) * inv


def old_power_iteration(Z, k, iters, seed):
    """The pre-issue-11 in-memory algorithm, verbatim in matrix form: Y = Z W and Q = qr(Y) held as N x K."""
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(Z.shape[1], k, generator=g, dtype=F64))[0]
    for it in range(iters + 1):
        Q = torch.linalg.qr(Z @ W)[0]
        ZtQ = Z.T @ Q
        W = torch.linalg.qr(ZtQ)[0] if it < iters else ZtQ
    evals, evecs = torch.linalg.eigh(W.T @ W)
    order = torch.argsort(evals, descending=True)
    return (W @ evecs[:, order]) / evals[order].clamp_min(1e-30).sqrt()[None, :]


def flat(model, per_param):
    return torch.cat([per_param[n].double().reshape(p.numel(), -1) for n, p in model.named_parameters()])


@pytest.fixture(scope="module")
def setup():
    model = seeded(MLP, 3, F64, d_in=6, hidden=12, n_classes=C, logit_scale=2.0)
    x, y = make_inputs(N, 6, seed=8, dtype=F64), make_labels(N, C, seed=9)
    x_test = torch.cat([make_inputs(15, 6, seed=10, dtype=F64), make_inputs(10, 6, seed=11, dtype=F64, scale=4.0)])
    Z = normalised(energy_grads(model, x))
    return dict(model=model, x=x, y=y, x_test=x_test, Z=Z)


def _in_memory(setup, name="lowdim", batch_size=BS, **kw):
    probe = gradood.Probe(setup["model"])
    return gradood.create(name, **kw).fit(probe.signals((setup["x"], setup["y"]), batch_size=batch_size,
                                                        progress=False))


def _streamed(setup, name="lowdim", splits=None, batch_size=BS, **kw):
    probe = gradood.Probe(setup["model"])
    return stream.fit_from_data(gradood.create(name, **kw), probe, (setup["x"], setup["y"]), batch_size=batch_size,
                                splits=splits, progress=False)


# ---------------------------------------------------------------------- the in-memory path: unchanged results
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_in_memory_pca_basis_equals_the_old_computation(setup, iters):
    det = _in_memory(setup, k_dims=K, power_iters=iters)
    V = flat(setup["model"], det.basis_.basis.directions)
    ref = old_power_iteration(setup["Z"], K, iters, seed=0)
    # same columns, same signs: the R factor from partial sums keeps the Householder QR's sign convention
    np.testing.assert_allclose(V, ref, rtol=0, atol=1e-12)


def test_in_memory_average_basis_equals_the_old_computation(setup):
    det = _in_memory(setup, "lowdim-avg-knn")
    Z, y = setup["Z"], setup["y"]
    ref = torch.stack([Z[y == c].mean(0) for c in range(C)], dim=1)
    np.testing.assert_allclose(flat(setup["model"], det.basis_.basis.directions), ref / ref.norm(dim=0), atol=1e-12)


# ---------------------------------------------------------------------- streamed = in memory, any split
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("name,kw", [("lowdim", dict(k_dims=K, power_iters=2)),
                                     ("lowdim-avg-knn", {}),
                                     ("lowdim-pca-energy", dict(k_dims=K, power_iters=1, probe_epochs=2))])
def test_streamed_fit_equals_the_in_memory_fit_for_any_split(setup, splits, name, kw):
    mem = _in_memory(setup, name, **kw)
    got = _streamed(setup, name, splits=splits, **kw)
    m = setup["model"]
    np.testing.assert_allclose(flat(m, got.basis_.basis.directions), flat(m, mem.basis_.basis.directions),
                               rtol=0, atol=1e-12)
    test = gradood.Probe(m).signals(setup["x_test"], batch_size=BS, progress=False)
    np.testing.assert_allclose(got.score(test), mem.score(test), rtol=1e-9, atol=1e-10)


def test_blocks_smaller_than_k_rows_and_a_subset_merge_to_the_same_basis(setup):
    """Batches of 2 rows < K = 3 (the R factor's first rows spill over blocks); n_fit draws the seeded subset."""
    kw = dict(k_dims=K, power_iters=2, n_fit=41, seed=5)
    mem = _in_memory(setup, batch_size=2, **kw)
    m = setup["model"]
    for splits in (1, 7, 21):
        got = _streamed(setup, splits=splits, batch_size=2, **kw)
        np.testing.assert_allclose(flat(m, got.basis_.basis.directions), flat(m, mem.basis_.basis.directions),
                                   rtol=0, atol=1e-12)
    idx = np.sort(np.random.default_rng(5).permutation(N)[:41])
    ref = old_power_iteration(normalised(energy_grads(m, setup["x"][idx])), K, 2, seed=5)
    np.testing.assert_allclose(flat(m, mem.basis_.basis.directions), ref, rtol=0, atol=1e-12)


def test_streamed_scores_from_shards_equal_the_in_memory_scores(setup, tmp_path):
    kw = dict(k_dims=K, power_iters=2, knn_k=3)
    mem = _in_memory(setup, **kw)
    got = _streamed(setup, splits=2, **kw)
    probe = gradood.Probe(setup["model"])
    shards = stream.extract_to_shards(probe, setup["x_test"], got.requests(), tmp_path / "test", shard_rows=10,
                                      progress=False)
    test = probe.signals(setup["x_test"], batch_size=BS, progress=False)
    np.testing.assert_allclose(stream.score_streaming(got, shards), mem.score(test), rtol=1e-6, atol=1e-6)
    # the streamed fit's state saves and loads like the in-memory one's (no pickle), scores unchanged
    loaded = gradood.load_detector(got.save(tmp_path / "det"))
    np.testing.assert_array_equal(loaded.score(test), got.score(test))


# ---------------------------------------------------------------------- the mergeable pieces
@pytest.mark.parametrize("cuts", [[], [5], [2, 3], [1, 2, 30], [4, 9, 17, 39]])
def test_rows_qr_merged_in_order_is_the_householder_r_of_all_rows(cuts):
    Y = torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * torch.tensor([9.0, 3.0, 1.0, 0.1])
    bounds = [0, *cuts, 40]
    parts = [L.RowsQR.of(Y[a:b], 4) for a, b in zip(bounds[:-1], bounds[1:])]
    r = L.merge_in_order(parts).r()
    ref = np.linalg.qr(Y.numpy(), mode="r")  # LAPACK geqrf on all rows at once, signs included
    np.testing.assert_allclose(r.numpy(), ref, rtol=0, atol=1e-12)


def test_pass_partials_do_not_grow_with_the_number_of_samples(setup):
    """The memory bound: every partial sum is P x K (or P, K x K, C) whatever N."""
    m = setup["model"]
    probe = gradood.Probe(m)
    P = sum(p.numel() for p in m.parameters())
    mu = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    basis = gradood.grads.GradBasis({n: torch.randn(*p.shape, K, dtype=F64) for n, p in m.named_parameters()},
                                    center=mu, scale={n: torch.ones_like(p) for n, p in m.named_parameters()})
    spec = L.SubspacePass(L.SKETCH, basis=basis)
    sizes = []
    for n in (20, 60):
        batches = [(setup["x"][i: min(i + 8, n)], None) for i in range(0, n, 8)]
        part = L.subspace_block(spec, probe, batches)
        assert part.n == n
        sizes.append((sum(v.numel() for v in part.sums.values()), part.ysum.numel(), part.qr.rows))
    assert sizes[0] == sizes[1] == (P * K, K, 2 * K)


# ---------------------------------------------------------------------- errors
def test_fit_streaming_from_shards_names_fit_from_data(setup, tmp_path):
    probe = gradood.Probe(setup["model"])
    det = gradood.create("lowdim", k_dims=K)
    shards = stream.extract_to_shards(probe, (setup["x"], setup["y"]), det.fit_requests(), tmp_path / "fit",
                                      progress=False)
    with pytest.raises(gradood.ConfigError, match="fit_from_data"):
        stream.fit_streaming(det, shards)
    with pytest.raises(gradood.ConfigError, match="fit_streaming"):
        stream.fit_from_data(gradood.create("mahalanobis"), probe, (setup["x"], setup["y"]))
    with pytest.raises(gradood.ConfigError, match="no ood_val"):
        stream.fit_from_data(det, probe, (setup["x"], setup["y"]), ood_val=probe.signals(setup["x_test"]))


def test_streamed_fit_refuses_unlabelled_data_for_class_statistics(setup):
    y = setup["y"].clone()
    y[7] = -1
    with pytest.raises(gradood.InputError, match="1 of 60 samples .* unlabelled"):
        stream.fit_from_data(gradood.create("lowdim-avg-knn"), gradood.Probe(setup["model"]), (setup["x"], y),
                             batch_size=BS, progress=False)
    with pytest.raises(gradood.InputError, match="labels"):
        stream.fit_from_data(gradood.create("lowdim-pca-energy", k_dims=K), gradood.Probe(setup["model"]),
                             setup["x"], batch_size=BS, progress=False)


# ---------------------------------------------------------------------- the layer ensembles (issue 11, part 2)
@pytest.fixture(scope="module")
def cnn_data():
    from conftest import SmallCNN

    model = seeded(SmallCNN, 1, F64, logit_scale=3.0)
    x, y = make_inputs(120, 2, 5, 5, seed=3, dtype=F64), make_labels(120, 4, seed=4)
    ood = make_inputs(40, 2, 5, 5, seed=5, dtype=F64, scale=3.0)
    x_test = torch.cat([make_inputs(30, 2, 5, 5, seed=6, dtype=F64), ood[:20]])
    return model, x, y, ood, x_test


@pytest.mark.parametrize("name,kw", [("mahalanobis-ensemble", dict(combine="mean-z", eps=0.01)),
                                     ("mahalanobis-ensemble", dict(combine="lr")),
                                     ("fssd", dict(n_noise=8)),
                                     ("fssd-lr", dict(n_noise=8))])
@pytest.mark.parametrize("splits", [1, 3])
def test_streamed_layer_ensembles_equal_the_in_memory_fit(cnn_data, name, kw, splits):
    model, x, y, ood, x_test = cnn_data
    probe = gradood.Probe(model)
    ood_val = probe.signals(ood, batch_size=BS, progress=False)
    mem = gradood.create(name, **kw).fit(probe.signals((x, y), batch_size=BS, progress=False), ood_val=ood_val)
    got = stream.fit_from_data(gradood.create(name, **kw), probe, (x, y), batch_size=BS, splits=splits,
                               progress=False, ood_val=ood_val)
    if name.startswith("mahalanobis"):
        # the per-layer Gaussians against numpy on the explicit spatially averaged activations
        for layer, g_mem, g in zip(mem.layers_, mem.gaussians_, got.gaussians_):
            f = probe.signals((x, y), batch_size=BS, progress=False).get(gradood.Tap(layer, "mean")).numpy()
            means = np.stack([f[y.numpy() == c].mean(0) for c in range(4)])
            np.testing.assert_allclose(g.means, means, rtol=1e-10, atol=1e-12)
            cen = f - means[y.numpy()]
            np.testing.assert_allclose(g.precision, np.linalg.pinv(cen.T @ cen / len(f), hermitian=True), rtol=1e-7,
                                       atol=1e-8)
            np.testing.assert_allclose(g.precision, g_mem.precision, rtol=1e-8, atol=1e-9)
    test = probe.signals(x_test, batch_size=BS, progress=False)
    np.testing.assert_allclose(got.score(test), mem.score(test), rtol=1e-7, atol=1e-8)


def test_streamed_mahalanobis_ensemble_checks_labels_and_tuning_data(cnn_data):
    model, x, y, ood, _ = cnn_data
    probe = gradood.Probe(model)
    with pytest.raises(gradood.TuningDataError, match="ood_val"):
        stream.fit_from_data(gradood.create("mahalanobis-ensemble"), probe, (x, y), progress=False)
    bad = y.clone()
    bad[50] = 9  # the model has 4 classes
    with pytest.raises(gradood.InputError, match="labels up to 9"):
        stream.fit_from_data(gradood.create("mahalanobis-ensemble", combine="mean-z"), probe, (x, bad),
                             batch_size=BS, progress=False)
