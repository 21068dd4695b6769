"""The detectors of issue 13 that read one forward pass (logits, penultimate features, the head), each against
a reference re-derived here from the paper's definition with numpy / scipy / scikit-learn on a small float64
model, plus the identities the papers state or imply. Nothing here calls the code under test to build a
reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

import gradood
from conftest import MLP, make_inputs, make_labels, probe_signals, seeded

C = 5
RTOL = 1e-10


def np_(t):
    return t.detach().double().numpy()


@pytest.fixture(scope="module")
def relu64():
    """Post-ReLU 10-d features, positive energies, float64."""
    return seeded(MLP, 21, torch.float64, hidden=10, logit_scale=2.0, logit_shift=3.0)


@pytest.fixture(scope="module")
def tanh64():
    """Signed continuous 8-d features (no ties), float64."""
    return seeded(MLP, 22, torch.float64, hidden=8, signed=True, logit_scale=3.0)


def _sig(model, n, seed, labels=True):
    x = make_inputs(n, 6, seed=seed, scale=1.5, dtype=torch.float64)
    return probe_signals(model, x, make_labels(n, C, seed=seed) if labels else None, batch_size=16)


def _head(model):
    return np_(model.fc.weight), np_(model.fc.bias)


def _energy(h, W, b):
    return logsumexp(h @ W.T + b, axis=1)


# ----------------------------------------------------------------------------------------- Entropy, GEN
def test_entropy_against_numpy_and_its_range(tanh64):
    s = _sig(tanh64, 30, 1)
    p = softmax(np_(s.logits), axis=1)
    np.testing.assert_allclose(gradood.create("entropy").score(s), np.sum(p * np.log(p), axis=1), rtol=RTOL)
    uniform = gradood.Signals.from_arrays(logits=np.zeros((2, C)))
    np.testing.assert_allclose(gradood.create("entropy").score(uniform), -np.log(C), rtol=1e-14)
    peaked = gradood.Signals.from_arrays(logits=np.array([[1000.0, 0, 0, 0, 0]]))
    assert gradood.create("entropy").score(peaked)[0] == pytest.approx(0.0, abs=1e-300)


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (0.5, 3), (1.0, 1)])
def test_gen_against_numpy(tanh64, gamma, m):
    s = _sig(tanh64, 30, 2)
    p = np.sort(softmax(np_(s.logits), axis=1), axis=1)[:, ::-1][:, : min(m, C)]
    ref = -np.sum(p**gamma * (1 - p) ** gamma, axis=1)
    np.testing.assert_allclose(gradood.create("gen", gamma=gamma, m=m).score(s), ref, rtol=RTOL)


def test_gen_with_gamma_one_over_all_classes_is_minus_gini(tanh64):
    s = _sig(tanh64, 30, 2)
    p = softmax(np_(s.logits), axis=1)
    np.testing.assert_allclose(gradood.create("gen", gamma=1.0, m=C).score(s), -(1 - np.sum(p**2, axis=1)),
                               rtol=RTOL)


# ----------------------------------------------------------------------------------------- temperature scaling
def _nll(T, f, y):
    z = f / T
    return np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y])


def test_temperature_scaling_minimises_the_nll(tanh64):
    fit, test = _sig(tanh64, 60, 3), _sig(tanh64, 20, 4, labels=False)
    det = gradood.create("temperature-scaling").fit(fit)
    f, y = np_(fit.logits), fit.labels.numpy()
    ref = minimize_scalar(lambda lt: _nll(np.exp(lt), f, y), bounds=(-5, 5), method="bounded",
                          options={"xatol": 1e-12}).x
    assert det.temperature_ == pytest.approx(np.exp(ref), rel=1e-6)
    # stationarity (d NLL / d beta = 0 at beta = 1/T): the softmax-expected logit equals the label's logit
    beta = 1 / det.temperature_
    p = softmax(beta * f, axis=1)
    assert np.mean(np.sum(p * f, axis=1) - f[np.arange(len(y)), y]) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(det.score(test), softmax(np_(test.logits) / det.temperature_, axis=1).max(1),
                               rtol=RTOL)


def test_temperature_scaling_prefers_id_val_and_needs_labels(tanh64):
    fit, val = _sig(tanh64, 40, 3), _sig(tanh64, 40, 5)
    t_val = gradood.create("temperature-scaling").fit(fit, id_val=val).temperature_
    assert t_val == pytest.approx(gradood.create("temperature-scaling").fit(val).temperature_, rel=1e-12)
    assert t_val != pytest.approx(gradood.create("temperature-scaling").fit(fit).temperature_, rel=1e-6)
    with pytest.raises(gradood.InputError, match="temperature-scaling fits class statistics on true labels"):
        gradood.create("temperature-scaling").fit(_sig(tanh64, 10, 3, labels=False))
    bad = gradood.Signals.from_arrays(logits=np.zeros((4, 3)), labels=[0, 1, 2, 3])
    with pytest.raises(gradood.InputError, match=r"labels up to 3, but the model has 3 classes"):
        gradood.create("temperature-scaling").fit(bad)
    with pytest.raises(gradood.ConfigError, match="must be above min_temperature"):
        gradood.create("temperature-scaling", min_temperature=2.0, max_temperature=1.0)


# ----------------------------------------------------------------------------------------- weighted energy
def test_weighted_energy_against_numpy(tanh64):
    s = _sig(tanh64, 20, 6)
    f = np_(s.logits)
    w = np.array([0.5, 2.0, -1.0, 1.0, 0.25])
    ref = np.log(np.sum(np.maximum(w, 0) * np.exp(f), axis=1))
    np.testing.assert_allclose(gradood.create("weighted-energy", weights=list(w)).score(s), ref, rtol=RTOL)
    # default weights (all 1) = energy at T = 1
    np.testing.assert_allclose(gradood.create("weighted-energy").score(s), logsumexp(f, axis=1), rtol=RTOL)


def test_weighted_energy_bad_weights():
    with pytest.raises(gradood.ConfigError, match="at least one positive"):
        gradood.create("weighted-energy", weights=[-1.0, 0.0])
    with pytest.raises(gradood.ConfigError, match="list of numbers"):
        gradood.create("weighted-energy", weights=["a", "b"])
    s = gradood.Signals.from_arrays(logits=np.zeros((2, 3)))
    with pytest.raises(gradood.InputError, match="2 class weights but the model has 3 classes"):
        gradood.create("weighted-energy", weights=[1.0, 1.0]).score(s)


# ----------------------------------------------------------------------------------------- ASH, SCALE
def _ash_ref(h, p, mode):
    out = np.zeros_like(h)
    d = h.shape[1]
    k = d - int(np.round(d * p / 100))
    for i, row in enumerate(h):
        keep = np.argsort(-row, kind="stable")[:k]
        s1 = row.sum()
        if mode == "p":
            out[i, keep] = row[keep]
        elif mode == "b":
            out[i, keep] = s1 / k
        else:
            out[i, keep] = row[keep] * np.exp(s1 / row[keep].sum())
    return out


@pytest.mark.parametrize("mode", ["p", "b", "s"])
@pytest.mark.parametrize("percentile", [0.0, 40.0, 65.0, 90.0])
def test_ash_against_numpy(tanh64, mode, percentile):
    s = _sig(tanh64, 25, 7)
    W, b = _head(tanh64)
    ref = _energy(_ash_ref(np_(s.features), percentile, mode), W, b)
    np.testing.assert_allclose(gradood.create(f"ash-{mode}", percentile=percentile).score(s), ref, rtol=RTOL)


def test_ash_identities(tanh64, relu64):
    s = _sig(tanh64, 25, 7)
    W, b = _head(tanh64)
    h = np_(s.features)
    # no pruning: ASH-P is Energy, ASH-S scales by e, ASH-B spreads the sum evenly
    np.testing.assert_allclose(gradood.create("ash-p", percentile=0).score(s), _energy(h, W, b), rtol=RTOL)
    np.testing.assert_allclose(gradood.create("ash-s", percentile=0).score(s), _energy(np.e * h, W, b), rtol=RTOL)
    even = np.repeat(h.mean(1, keepdims=True), h.shape[1], axis=1)
    np.testing.assert_allclose(gradood.create("ash-b", percentile=0).score(s), _energy(even, W, b), rtol=RTOL)
    # ASH-B keeps the activation sum; on post-ReLU features ASH-P prunes only the smallest ones
    from gradood.detectors.shaping import ash
    sr = _sig(relu64, 25, 8)
    hr = sr.features.double()
    np.testing.assert_allclose(np_(ash(hr, 70, "b").sum(1)), np_(hr.sum(1)), rtol=1e-12)
    pruned = np_(ash(hr, 70, "p"))
    assert ((pruned == 0) | (pruned == np_(hr))).all()


def test_ash_prunes_everything_is_an_error(tanh64):
    s = _sig(tanh64, 5, 7)
    with pytest.raises(gradood.ConfigError, match="prunes all 8 features"):
        gradood.create("ash-p", percentile=100).score(s)
    with pytest.raises(gradood.ConfigError, match="mode must be one of"):
        gradood.create("ash-s", mode="x")


@pytest.mark.parametrize("percentile", [0.0, 50.0, 85.0])
def test_scale_against_numpy(tanh64, percentile):
    s = _sig(tanh64, 25, 9)
    W, b = _head(tanh64)
    h = np_(s.features)
    k = h.shape[1] - int(np.round(h.shape[1] * percentile / 100))
    top = -np.sort(-h, axis=1)[:, :k]
    ref = _energy(h * np.exp(h.sum(1) / top.sum(1))[:, None], W, b)
    np.testing.assert_allclose(gradood.create("scale", percentile=percentile).score(s), ref, rtol=RTOL)


def test_scale_and_ash_s_share_the_scale(relu64):
    """SCALE = ASH-S without the pruning: both multiply by exp(s1/s2); with a head of zero bias, scaling is
    linear, so energy(W h' ) differs only by which units are kept."""
    s = _sig(relu64, 25, 9)
    W, b = _head(relu64)
    h = np_(s.features)
    k = h.shape[1] - int(np.round(h.shape[1] * 0.7))
    order = np.argsort(-h, axis=1)[:, :k]
    mask = np.zeros_like(h, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    r = np.exp(h.sum(1) / np.where(mask, h, 0).sum(1))[:, None]
    np.testing.assert_allclose(gradood.create("scale", percentile=70).score(s), _energy(h * r, W, b), rtol=RTOL)
    np.testing.assert_allclose(gradood.create("ash-s", percentile=70).score(s), _energy(np.where(mask, h, 0) * r, W, b),
                               rtol=RTOL)


# ----------------------------------------------------------------------------------------- DICE, BATS
@pytest.mark.parametrize("sparsity", [0.0, 50.0, 90.0])
def test_dice_against_numpy(relu64, sparsity):
    fit, test = _sig(relu64, 40, 10), _sig(relu64, 20, 11, labels=False)
    det = gradood.create("dice", sparsity=sparsity).fit(fit)
    W, b = _head(relu64)
    m = np_(fit.features).mean(0)
    V = W * m[None, :]
    mask = V > np.percentile(V, sparsity)
    np.testing.assert_array_equal(det.mask_.numpy(), mask)
    np.testing.assert_allclose(det.score(test), _energy(np_(test.features), W * mask, b), rtol=RTOL)
    # the mask keeps about (100 - p)% of the C x D contributions
    assert abs(mask.sum() - (1 - sparsity / 100) * V.size) <= 1


def test_dice_sparsity_100_is_refused():
    with pytest.raises(gradood.ConfigError, match="sparsity must be in"):
        gradood.create("dice", sparsity=100)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_bats_against_numpy(tanh64, lam):
    fit, test = _sig(tanh64, 40, 12), _sig(tanh64, 20, 13, labels=False)
    det = gradood.create("bats", lam=lam).fit(fit)
    H = np_(fit.features)
    mu, sd = H.mean(0), H.std(0)
    W, b = _head(tanh64)
    ref = _energy(np.clip(np_(test.features), mu - lam * sd, mu + lam * sd), W, b)
    np.testing.assert_allclose(det.score(test), ref, rtol=RTOL)
    # a wide enough band clips nothing: Energy
    wide = gradood.create("bats", lam=1e6).fit(fit)
    np.testing.assert_allclose(wide.score(test), _energy(np_(test.features), W, b), rtol=RTOL)


# ----------------------------------------------------------------------------------------- Residual, fDBD, NCI
def test_residual_against_numpy_and_vim(tanh64):
    fit, test = _sig(tanh64, 60, 14), _sig(tanh64, 20, 15, labels=False)
    det = gradood.create("residual", dim=3).fit(fit)
    W, b = _head(tanh64)
    o = -np.linalg.pinv(W) @ b
    X = np_(fit.features) - o
    _, vecs = np.linalg.eigh(X.T @ X / len(X))
    R = vecs[:, : 8 - 3]
    ref = -np.linalg.norm((np_(test.features) - o) @ R, axis=1)
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-8)
    # ViM = energy - alpha * residual
    vim = gradood.create("vim", dim=3).fit(fit)
    np.testing.assert_allclose(vim.score(test), logsumexp(np_(test.logits), axis=1) + vim.alpha_ * ref, rtol=1e-8)
    with pytest.raises(gradood.ConfigError, match="leaves no residual space"):
        gradood.create("residual", dim=8).fit(fit)


def test_fdbd_against_numpy_and_the_boundary(tanh64):
    fit, test = _sig(tanh64, 40, 16), _sig(tanh64, 15, 17, labels=False)
    det = gradood.create("fdbd").fit(fit)
    W, b = _head(tanh64)
    mu = np_(fit.features).mean(0)
    H, F = np_(test.features), np_(test.logits)
    ref = []
    for h, f in zip(H, F):
        c = int(np.argmax(f))
        d = [abs(f[c] - f[j]) / np.linalg.norm(W[c] - W[j]) for j in range(C) if j != c]
        ref.append(np.mean(d) / np.linalg.norm(h - mu))
        # the distance is to the point of the hyperplane f_c = f_j closest to h: there both logits agree
        j = (c + 1) % C
        u = (W[c] - W[j]) / np.linalg.norm(W[c] - W[j])
        hp = h - (f[c] - f[j]) / np.linalg.norm(W[c] - W[j]) * u
        fp = W @ hp + b
        assert fp[c] == pytest.approx(fp[j], abs=1e-9)
    np.testing.assert_allclose(det.score(test), ref, rtol=RTOL)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_nci_against_numpy(relu64, alpha):
    fit, test = _sig(relu64, 40, 18), _sig(relu64, 15, 19, labels=False)
    det = gradood.create("nci", alpha=alpha).fit(fit)
    W, _ = _head(relu64)
    mu = np_(fit.features).mean(0)
    H = np_(test.features)
    c = np_(test.logits).argmax(1)
    z = H - mu
    ref = np.sum(z * W[c], axis=1) / np.linalg.norm(z, axis=1) + alpha * np.abs(H).sum(1)
    np.testing.assert_allclose(det.score(test), ref, rtol=RTOL)


# ----------------------------------------------------------------------------------------- NNGuide, SHE
@pytest.mark.parametrize("k", [1, 5, 40])
def test_nnguide_against_numpy(relu64, k):
    fit, test = _sig(relu64, 40, 20), _sig(relu64, 15, 21, labels=False)
    det = gradood.create("nnguide", k=k).fit(fit)
    Hb, Fb = np_(fit.features), np_(fit.logits)
    bank = Hb / (np.linalg.norm(Hb, axis=1, keepdims=True) + 1e-10) * logsumexp(Fb, axis=1)[:, None]
    Q = np_(test.features)
    Q = Q / (np.linalg.norm(Q, axis=1, keepdims=True) + 1e-10)
    sims = -np.sort(-(Q @ bank.T), axis=1)[:, :k]
    ref = logsumexp(np_(test.logits), axis=1) * sims.mean(1)
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-9)
    with pytest.raises(gradood.InputError, match="only 40 samples"):
        gradood.create("nnguide", k=41).fit(fit)


def test_nnguide_fraction_subsamples_the_bank(relu64):
    fit = _sig(relu64, 40, 20)
    det = gradood.create("nnguide", k=2, fraction=0.25).fit(fit)
    assert det.bank_.shape == (10, 10)


def test_she_against_numpy(tanh64):
    fit, test = _sig(tanh64, 80, 22), _sig(tanh64, 15, 23, labels=False)
    # labels that agree with the model on most samples, so that every class has correct ones
    y = fit.labels.clone()
    pred = fit.logits.argmax(1)
    y[: 60] = pred[: 60]
    fit = gradood.Signals.from_arrays(logits=fit.logits, features=fit.features, labels=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes never predicted fall back (tested below)
        det = gradood.create("she").fit(fit)
    H, yn, pn = np_(fit.features), y.numpy(), pred.numpy()
    P = np.stack([H[(yn == c) & (pn == c)].mean(0) if ((yn == c) & (pn == c)).any() else H[yn == c].mean(0)
                  for c in range(C)])
    np.testing.assert_allclose(np_(det.patterns_), P, rtol=RTOL)
    ct = np_(test.logits).argmax(1)
    np.testing.assert_allclose(det.score(test), np.sum(np_(test.features) * P[ct], axis=1), rtol=RTOL)


def test_she_fallback_and_missing_class():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(12, 4))
    f = np.zeros((12, 3))
    f[:, 0] = 1.0  # always predicts class 0
    y = np.arange(12) % 3
    s = gradood.Signals.from_arrays(logits=f, features=h, labels=y)
    with pytest.warns(UserWarning, match=r"classes \[1, 2\] have no correctly classified"):
        det = gradood.create("she").fit(s)
    np.testing.assert_allclose(np_(det.patterns_[1]), h[y == 1].mean(0), rtol=RTOL)
    s2 = gradood.Signals.from_arrays(logits=f, features=h, labels=np.where(y == 2, 0, y))
    with pytest.raises(gradood.InputError, match="no sample of class 2"):
        gradood.create("she").fit(s2)


# ----------------------------------------------------------------------------------------- RMD, GEM, GMM
def _tied(H, y):
    means = np.stack([H[y == c].mean(0) for c in range(C)])
    P = EmpiricalCovariance().fit(H - means[y]).precision_
    return means, P


def test_rmd_against_sklearn(tanh64):
    fit, test = _sig(tanh64, 80, 24), _sig(tanh64, 20, 25, labels=False)
    det = gradood.create("rmd").fit(fit)
    H, y, Q = np_(fit.features), fit.labels.numpy(), np_(test.features)
    means, P = _tied(H, y)
    bg = EmpiricalCovariance().fit(H)
    md = np.array([[(q - m) @ P @ (q - m) for m in means] for q in Q])
    md0 = bg.mahalanobis(Q)  # squared distances to the background Gaussian
    np.testing.assert_allclose(det.score(test), -(md.min(1) - md0), rtol=1e-7, atol=1e-8)


def test_rmd_with_one_class_is_zero(tanh64):
    fit = _sig(tanh64, 40, 24)
    one = gradood.Signals.from_arrays(features=fit.features, labels=np.zeros(40, dtype=int))
    np.testing.assert_allclose(gradood.create("rmd").fit(one).score(one), 0.0, atol=1e-9)


def test_gem_against_numpy_and_its_bounds(tanh64):
    fit, test = _sig(tanh64, 80, 26), _sig(tanh64, 20, 27, labels=False)
    det = gradood.create("gem").fit(fit)
    means, P = _tied(np_(fit.features), fit.labels.numpy())
    Q = np_(test.features)
    md = np.array([[(q - m) @ P @ (q - m) for m in means] for q in Q])
    ref = logsumexp(-0.5 * md, axis=1)
    got = det.score(test)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)
    # log-sum-exp lies between the max and the max + log C: GEM brackets Mahalanobis' -min d^2 / 2
    assert (got >= -0.5 * md.min(1) - 1e-9).all() and (got <= -0.5 * md.min(1) + np.log(C) + 1e-9).all()


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_gmm_against_sklearn_score_samples(tanh64, cov):
    fit, test = _sig(tanh64, 80, 28), _sig(tanh64, 20, 29, labels=False)
    det = gradood.create("gmm", n_components=3, covariance_type=cov, seed=1).fit(fit)
    assert det.pca_components_ is None  # 8 features <= reduce_dim: no reduction
    gm = GaussianMixture(n_components=3, covariance_type=cov, random_state=1).fit(np_(fit.features))
    np.testing.assert_allclose(det.score(test), gm.score_samples(np_(test.features)), rtol=1e-9)


def test_gmm_after_pca_against_sklearn(tanh64):
    fit, test = _sig(tanh64, 80, 28), _sig(tanh64, 20, 29, labels=False)
    det = gradood.create("gmm", n_components=2, reduce_dim=3, seed=2).fit(fit)
    pca = PCA(n_components=3).fit(np_(fit.features))
    gm = GaussianMixture(n_components=2, random_state=2).fit(pca.transform(np_(fit.features)))
    np.testing.assert_allclose(det.score(test), gm.score_samples(pca.transform(np_(test.features))), rtol=1e-8)


def test_gmm_default_components_is_the_class_count_and_errors(tanh64):
    fit = _sig(tanh64, 40, 28)
    assert gradood.create("gmm").fit(fit).means_.shape == (C, 8)
    with pytest.raises(gradood.InputError, match="exceeds the 40 ID fit samples"):
        gradood.create("gmm", n_components=41).fit(fit)
    with pytest.raises(gradood.ConfigError, match="covariance_type must be one of"):
        gradood.create("gmm", covariance_type="banded")


class _BNHead(torch.nn.Module):
    """``Linear -> ReLU -> BatchNorm1d -> Dropout -> fc``: the head's input is a BN output (BATS' setting)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.BatchNorm1d(7),
                                        torch.nn.Dropout(0.3))
        self.fc = torch.nn.Linear(7, C)
        with torch.no_grad():
            self.body[2].running_mean.uniform_(0.0, 0.5)
            self.body[2].running_var.uniform_(0.5, 2.0)
            self.body[2].weight.uniform_(-1.5, 1.5)  # a negative gamma: sigma = |gamma|
            self.body[2].bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("statistics", ["auto", "bn"])
def test_bats_reads_the_batchnorm_feeding_the_head(statistics):
    model = seeded(_BNHead, 60, torch.float64)
    fit, test = _sig(model, 30, 61), _sig(model, 12, 62, labels=False)
    det = gradood.create("bats", lam=0.7, statistics=statistics).fit(fit)
    bn = model.body[2]
    assert det.statistics_ == "bn:body.2"
    beta, gamma = np_(bn.bias), np.abs(np_(bn.weight))
    W, b = _head(model)
    ref = _energy(np.clip(np_(test.features), beta - 0.7 * gamma, beta + 0.7 * gamma), W, b)
    np.testing.assert_allclose(det.score(test), ref, rtol=RTOL)
    # the features form estimates the same band from the fit features instead
    feats = gradood.create("bats", lam=0.7, statistics="features").fit(fit)
    assert feats.statistics_ == "features"
    np.testing.assert_allclose(np_(feats.mean_), np_(fit.features).mean(0), rtol=RTOL)


def test_bats_bn_statistics_need_a_batchnorm_before_the_head(tanh64):
    fit = _sig(tanh64, 20, 63)
    assert gradood.create("bats").fit(fit).statistics_ == "features"
    with pytest.raises(gradood.InputError, match="statistics='bn' needs an affine BatchNorm"):
        gradood.create("bats", statistics="bn").fit(fit)
