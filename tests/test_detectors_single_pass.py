"""Single-pass detectors against independent references (numpy / scipy / scikit-learn).

Signals come from the real path (``Probe(model).signals(...)``) on small seeded models; every reference
is recomputed here from the method's definition (docs/methods.md sections 2.1-2.5, 3), never copied from
the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

import gradood
from conftest import MLP, make_inputs, make_labels, seeded
from gradood.detectors.knn import kth_neighbour_sqdist

C = 5


# The models here are float32 and single-pass scores are computed in the signals' own precision (as autograd
# would): compare with float64 numpy references at float32 rounding.
F32 = 2e-6


def _signals(model, n, seed, labels=True, batch_size=16):
    x = make_inputs(n, 6, seed=seed, scale=1.5)
    data = (x, make_labels(n, C, seed=seed)) if labels else x
    return gradood.Probe(model).signals(data, batch_size=batch_size, progress=False)


@pytest.fixture(scope="module")
def relu_model():
    """Post-ReLU features, positive energies (logit shift), float32."""
    return seeded(MLP, 10, hidden=10, logit_scale=2.0, logit_shift=4.0)


@pytest.fixture(scope="module")
def tanh_model():
    """Signed, full-rank features (for covariances), float32."""
    return seeded(MLP, 11, hidden=8, signed=True, logit_scale=3.0)


def np_(t):
    return t.detach().double().numpy()


def _head(model):
    return np_(model.fc.weight), np_(model.fc.bias)


# ----------------------------------------------------------------------------------------- logit baselines
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_msp_maxlogit_energy(relu_model, T):
    s = _signals(relu_model, 30, 1)
    f = np_(s.logits)
    np.testing.assert_allclose(gradood.create("msp", temperature=T).score(s), softmax(f / T, axis=1).max(1),
                               rtol=1e-6)
    np.testing.assert_allclose(gradood.create("maxlogit").score(s), f.max(1), rtol=F32)
    np.testing.assert_allclose(gradood.create("energy", temperature=T).score(s), T * logsumexp(f / T, axis=1),
                               rtol=F32)


def test_klmatching_templates_and_score():
    rng = np.random.default_rng(0)
    f_fit = rng.normal(scale=3.0, size=(80, C))
    f_fit[:, 4] -= 50.0  # class 4 is never predicted: one-hot template
    f_test = rng.normal(scale=3.0, size=(20, C))
    smoothing = 1e-6
    det = gradood.create("klmatching", smoothing=smoothing).fit(gradood.Signals.from_arrays(logits=f_fit))

    p = softmax(f_fit, axis=1)
    pred = p.argmax(1)
    templates = np.eye(C)
    for k in range(C):
        if (pred == k).any():
            templates[k] = p[pred == k].mean(0)
    assert not (pred == 4).any()
    templates = (1 - smoothing) * templates + smoothing / C
    np.testing.assert_allclose(np_(det.templates_), templates, rtol=F32, atol=1e-15)

    q = softmax(f_test, axis=1)
    kl = np.array([[np.sum(qi * (np.log(qi) - np.log(t))) for t in templates] for qi in q])
    got = det.score(gradood.Signals.from_arrays(logits=f_test))
    np.testing.assert_allclose(got, -kl.min(1), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------- ReAct
@pytest.mark.parametrize("percentile", [90.0, 50.0, 99.0])
def test_react_percentile_and_score(relu_model, percentile):
    fit, test = _signals(relu_model, 50, 2), _signals(relu_model, 20, 3)
    det = gradood.create("react", percentile=percentile).fit(fit)
    c = np.percentile(np_(fit.features).ravel(), percentile)
    assert det.clip_ == pytest.approx(c, rel=1e-12)
    W, b = _head(relu_model)
    ref = logsumexp(np.minimum(np_(test.features), c) @ W.T + b, axis=1)
    np.testing.assert_allclose(det.score(test), ref, rtol=F32)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_react_absolute_clip_needs_no_fit(relu_model, T):
    test = _signals(relu_model, 20, 3)
    det = gradood.create("react", clip=0.5, temperature=T)
    assert not det.fits_on_id
    W, b = _head(relu_model)
    ref = T * logsumexp((np.minimum(np_(test.features), 0.5) @ W.T + b) / T, axis=1)
    np.testing.assert_allclose(det.score(test), ref, rtol=F32)


def test_react_from_arrays_uses_given_head():
    rng = np.random.default_rng(1)
    h = np.abs(rng.normal(size=(15, 4)))
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    s = gradood.Signals.from_arrays(features=h, head_weight=W, head_bias=b)
    det = gradood.create("react", percentile=80).fit(s)
    c = np.percentile(h, 80)
    np.testing.assert_allclose(det.score(s), logsumexp(np.minimum(h, c) @ W.T + b, axis=1), rtol=F32)


# ----------------------------------------------------------------------------------------- Mahalanobis
def test_mahalanobis_against_sklearn(tanh_model):
    fit, test = _signals(tanh_model, 80, 4), _signals(tanh_model, 25, 5, labels=False)
    det = gradood.create("mahalanobis").fit(fit)
    H, y = np_(fit.features), fit.labels.numpy()
    means = np.stack([H[y == c].mean(0) for c in range(C)])
    ec = EmpiricalCovariance().fit(H - means[y])
    np.testing.assert_allclose(np_(det.gaussian_.means), means, rtol=F32, atol=1e-12)
    np.testing.assert_allclose(np_(det.gaussian_.precision), ec.precision_, rtol=1e-7, atol=1e-8)

    Q = np_(test.features)
    P = ec.precision_
    d2 = np.array([[(q - m) @ P @ (q - m) for m in means] for q in Q])
    np.testing.assert_allclose(det.score(test), -d2.min(1), rtol=1e-7, atol=1e-9)


def test_mahalanobis_score_is_zero_at_a_class_mean(tanh_model):
    fit = _signals(tanh_model, 80, 4)
    det = gradood.create("mahalanobis").fit(fit)
    mu = det.gaussian_.means
    s = gradood.Signals.from_arrays(features=mu)
    np.testing.assert_allclose(det.score(s), np.zeros(C), atol=1e-9)


# ----------------------------------------------------------------------------------------- KNN
def _sk_kth(bank, queries, k):
    nn_ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)
    d, _ = nn_.kneighbors(queries, n_neighbors=k)
    return d[:, k - 1]


def _normalise(a):
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-10)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k", [1, 4, 17])
def test_knn_against_sklearn(tanh_model, backend, k):
    fit, test = _signals(tanh_model, 60, 6), _signals(tanh_model, 25, 7, labels=False)
    det = gradood.create("knn", k=k, backend=backend).fit(fit)
    bank, Q = _normalise(np_(fit.features)), _normalise(np_(test.features))
    ref = -_sk_kth(bank, Q, k)
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-4, atol=2e-5)
    # scoring the fit data itself: each point is its own first neighbour
    np.testing.assert_allclose(det.score(fit), -_sk_kth(bank, bank, k), rtol=1e-4, atol=2e-3 if k == 1 else 2e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_unnormalised_and_fraction(tanh_model, backend):
    fit, test = _signals(tanh_model, 60, 6), _signals(tanh_model, 25, 7, labels=False)
    det = gradood.create("knn", k=3, normalize=False, backend=backend).fit(fit)
    np.testing.assert_allclose(det.score(test), -_sk_kth(np_(fit.features), np_(test.features), 3),
                               rtol=1e-4, atol=2e-5)
    det = gradood.create("knn", k=3, fraction=0.5, backend=backend, seed=3).fit(fit)
    bank = np_(det.bank_)
    assert bank.shape == (30, 8)
    full = _normalise(np_(fit.features))
    # the bank is a subset of the normalised fit features, without repeats
    idx = [int(np.argmin(np.abs(full - r).sum(1))) for r in bank]
    np.testing.assert_allclose(full[idx], bank, atol=1e-6)
    assert len(set(idx)) == 30
    np.testing.assert_allclose(det.score(test), -_sk_kth(full[idx], _normalise(np_(test.features)), 3),
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("query_chunk,bank_chunk", [(3, 2), (1, 1), (7, 5), (1000, 4)])
@pytest.mark.parametrize("k", [1, 5, 9])
def test_kth_neighbour_chunking_is_exact(query_chunk, bank_chunk, k):
    rng = np.random.default_rng(2)
    bank, Q = rng.normal(size=(23, 4)), rng.normal(size=(11, 4))
    got = kth_neighbour_sqdist(torch.from_numpy(Q), torch.from_numpy(bank), k, query_chunk=query_chunk,
                               bank_chunk=bank_chunk)
    np.testing.assert_allclose(got.numpy(), _sk_kth(bank, Q, k) ** 2, rtol=F32, atol=1e-12)


def test_kth_neighbour_with_ties_and_duplicates():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = [kth_neighbour_sqdist(q, bank, k, bank_chunk=2).tolist() for k in range(1, 6)]
    assert got == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]]


# ----------------------------------------------------------------------------------------- ViM
@pytest.mark.parametrize("dim", [None, 2, 6])
def test_vim_against_numpy(tanh_model, dim):
    fit, test = _signals(tanh_model, 70, 8), _signals(tanh_model, 20, 9, labels=False)
    det = gradood.create("vim", dim=dim).fit(fit)
    W, b = _head(tanh_model)
    H = np_(fit.features)
    D = H.shape[1]
    d = D // 2 if dim is None else dim
    o = -np.linalg.pinv(W) @ b
    X = H - o
    vals, vecs = np.linalg.eigh(X.T @ X / len(X))
    P = vecs[:, -d:]  # principal space: top-d eigenvectors
    assert vals[-d] - vals[-d - 1] > 1e-6  # a clear eigengap, so the principal space is well defined

    def resid(A):
        Z = A - o
        return np.linalg.norm(Z - Z @ P @ P.T, axis=1)

    alpha = np_(fit.logits).max(1).mean() / resid(H).mean()
    np.testing.assert_allclose(np_(det.origin_), o, rtol=1e-8, atol=1e-10)
    assert det.alpha_ == pytest.approx(alpha, rel=1e-8)
    ref = logsumexp(np_(test.logits), axis=1) - alpha * resid(np_(test.features))
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-8, atol=1e-9)


def test_vim_head_without_bias_has_origin_zero():
    model = seeded(MLP, 13, hidden=8, signed=True, bias=False, logit_scale=3.0)
    fit = _signals(model, 50, 18)
    det = gradood.create("vim", dim=3).fit(fit)
    np.testing.assert_array_equal(np_(det.origin_), np.zeros(8))
    H = np_(fit.features)
    _, vecs = np.linalg.eigh(H.T @ H / len(H))
    Rn = vecs[:, :-3]
    r = np.linalg.norm(H @ Rn, axis=1)
    alpha = np_(fit.logits).max(1).mean() / r.mean()
    np.testing.assert_allclose(det.score(fit), logsumexp(np_(fit.logits), axis=1) - alpha * r, rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------------------------------- RG
@pytest.mark.parametrize("k,T", [(1.0, 1.0), (0.3, 1.0), (0.7, 2.0), (float("inf"), 1.0)])
def test_rg_against_numpy(relu_model, k, T):
    s = _signals(relu_model, 30, 10)
    f, h = np_(s.logits), np_(s.features)
    ref = T * logsumexp(f / T, axis=1) * np.minimum(h, k).sum(1)
    np.testing.assert_allclose(gradood.create("rg", k=k, temperature=T).score(s), ref, rtol=F32)


def test_rg_k_percentile(relu_model):
    fit, test = _signals(relu_model, 40, 11), _signals(relu_model, 20, 12)
    det = gradood.create("rg", k_percentile=80)
    assert det.fits_on_id
    det.fit(fit)
    k = np.percentile(np_(fit.features).ravel(), 80)
    assert det.k_ == pytest.approx(k, rel=1e-12)
    f, h = np_(test.logits), np_(test.features)
    np.testing.assert_allclose(det.score(test), logsumexp(f, axis=1) * np.minimum(h, k).sum(1), rtol=F32)


@pytest.mark.parametrize("k,m", [(1.0, 0.6), (0.4, 1.2), (float("inf"), 0.3)])
def test_rg_additive_against_numpy(relu_model, k, m):
    fit, test = _signals(relu_model, 40, 13), _signals(relu_model, 20, 14)
    det = gradood.create("rg-additive", k=k, m=m, n_fit=1000).fit(fit)  # n_fit > N: all fit samples
    e_fit, v_fit = logsumexp(np_(fit.logits), axis=1), np.minimum(np_(fit.features), k).sum(1)
    alpha = m * e_fit.std() / v_fit.std()
    assert det.alpha_ == pytest.approx(alpha, rel=1e-10)
    ref = logsumexp(np_(test.logits), axis=1) + alpha * np.minimum(np_(test.features), k).sum(1)
    np.testing.assert_allclose(det.score(test), ref, rtol=F32)


def test_rg_eq5_against_numpy(relu_model):
    s = _signals(relu_model, 20, 15)
    f, h = np_(s.logits), np_(s.features)
    np.testing.assert_allclose(gradood.create("rg-eq5").score(s),
                               np.log(np.exp(f).sum(1) * np.abs(h).sum(1)), rtol=F32)
    np.testing.assert_allclose(gradood.create("rg-eq5", include_bias=True).score(s),
                               np.log(np.exp(f).sum(1) * (np.abs(h).sum(1) + 1)), rtol=F32)


# ----------------------------------------------------------------------------------------- U x V family
def _np_output_term(name, f, T):
    p = softmax(f / T, axis=1)
    return {
        "msp": p.max(1),
        "gradnorm": np.abs(p - 1.0 / f.shape[1]).sum(1),
        "energy": T * logsumexp(f / T, axis=1),
        "maxlogit": f.max(1),
        "exgrad": (p * (1 - p)).sum(1),
        "sumsq": (p ** 2).sum(1),
        "one": np.ones(len(f)),
    }[name]


def _np_feature_term(name, h, k):
    return {"l1": np.abs(h).sum(1), "l2": np.linalg.norm(h, axis=1), "clipped_l1": np.minimum(h, k).sum(1),
            "one": np.ones(len(h))}[name]


OUTPUT_TERMS = ["msp", "gradnorm", "energy", "maxlogit", "exgrad", "sumsq", "one"]
FEATURE_TERMS = ["l1", "l2", "clipped_l1", "one"]


@pytest.mark.parametrize("output_term", OUTPUT_TERMS)
def test_output_feature_family_against_numpy(output_term):
    model = seeded(MLP, 12, signed=True, logit_scale=2.0, logit_shift=6.0)  # signed h, positive energies
    s = _signals(model, 25, 16)
    f, h = np_(s.logits), np_(s.features)
    assert (h < 0).any() and (h > 0).any()
    T, k = 1.7, 0.3
    for feature_term in FEATURE_TERMS:
        u, v = _np_output_term(output_term, f, T), _np_feature_term(feature_term, h, k)
        sign = -1.0 if output_term == "exgrad" else 1.0  # the uncertainty-type term is flipped by default
        got = gradood.create("output-feature", output_term=output_term, feature_term=feature_term,
                             temperature=T, k=k).score(s)
        # signed features: float32 sums cancel, so the error scales with sum |h|, not with the result
        atol = F32 * np.abs(u).max() * np.abs(h).sum(1).max()
        np.testing.assert_allclose(got, sign * u * v, rtol=F32, atol=atol, err_msg=f"{output_term} x {feature_term}")
        forced = gradood.create("output-feature", output_term=output_term, feature_term=feature_term,
                                temperature=T, k=k, higher_is_id=False).score(s)
        np.testing.assert_allclose(forced, -u * v, rtol=F32, atol=atol)


def test_named_output_feature_variants(relu_model):
    s = _signals(relu_model, 20, 17)
    f, h = np_(s.logits), np_(s.features)
    p = softmax(f, axis=1)
    np.testing.assert_allclose(gradood.create("energy-x-l1").score(s), logsumexp(f, axis=1) * np.abs(h).sum(1),
                               rtol=F32)
    np.testing.assert_allclose(gradood.create("gradnorm-x-clipped").score(s),
                               np.abs(p - 1 / C).sum(1) * np.minimum(h, 1.0).sum(1), rtol=F32)
