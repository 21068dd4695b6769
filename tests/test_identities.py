"""Paper identities (docs/methods.md 2.1-2.5 and 5.3 "model-independent consistency checks") that hold
between single-pass detectors, checked by composing the real detectors on the real signal path."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import spearmanr

import gradood
from conftest import MLP, ConvHeadNet, SmallCNN, make_inputs, seeded
from gradood.grads.head import expected_logprob_grad_output_term

INF = float("inf")


def _sig(model, x, y=None, batch_size=8):
    return gradood.Probe(model).signals(x if y is None else (x, y), batch_size=batch_size, progress=False)


def rtol_for(s, f64: float = 1e-12) -> float:
    """Scores are computed in the signals' precision: identities hold to float64 rounding for float64 models
    and to float32 rounding for float32 models."""
    return f64 if s.logits.dtype == torch.float64 else 2e-6


@pytest.fixture(scope="module", params=["mlp-f32", "mlp-f64", "cnn-f32", "conv1x1-head-f64"])
def relu_signals(request):
    """Signals with post-ReLU features and positive energies."""
    if request.param == "conv1x1-head-f64":
        model = seeded(ConvHeadNet, 3, torch.float64, logit_scale=2.0)
        with torch.no_grad():
            model.cls.bias.add_(3.0)
        return model, gradood.Probe(model, head="cls").signals(make_inputs(30, 2, 5, 5, seed=3), batch_size=8,
                                                                progress=False)
    if request.param == "cnn-f32":
        model = seeded(SmallCNN, 3, logit_scale=2.0, logit_shift=3.0)
        return model, _sig(model, make_inputs(30, 2, 5, 5, seed=3))
    dtype = torch.float64 if request.param.endswith("f64") else torch.float32
    model = seeded(MLP, 4, dtype, hidden=12, logit_scale=2.0, logit_shift=3.0)
    return model, _sig(model, make_inputs(30, 6, seed=4, dtype=dtype, scale=1.5))


def _h(s):
    return s.features.double().numpy()


def _f(s):
    return s.logits.double().numpy()


# ----------------------------------------------------------------------------------------- RG limits
def test_rg_k_inf_is_energy_times_l1(relu_signals):
    _, s = relu_signals
    h = _h(s)
    assert (h >= 0).all()
    rg = gradood.create("rg", k=INF).score(s)
    energy = gradood.create("energy").score(s)
    np.testing.assert_allclose(rg, energy * np.abs(h).sum(1), rtol=rtol_for(s))
    np.testing.assert_allclose(rg, gradood.create("energy-x-l1").score(s), rtol=rtol_for(s))
    # a finite k that no activation reaches is the same as k = inf
    np.testing.assert_allclose(gradood.create("rg", k=float(h.max()) + 1.0).score(s), rg, rtol=rtol_for(s))


def test_rg_k_inf_is_energy_times_sum_h_not_l1_for_signed_features():
    """For signed features RG's V is sum(h) (the formula is kept); it equals ||h||_1 only after a ReLU."""
    model = seeded(MLP, 5, signed=True, logit_shift=5.0)
    s = _sig(model, make_inputs(20, 6, seed=5))
    h = _h(s)
    rg = gradood.create("rg", k=INF).score(s)
    e = gradood.create("energy").score(s)
    # signed features: a float32 sum cancels, so its error scales with sum |h|, not with sum h
    atol = 0.0 if s.logits.dtype == torch.float64 else 2e-6 * np.abs(e).max() * np.abs(h).sum(1).max()
    np.testing.assert_allclose(rg, e * h.sum(1), rtol=rtol_for(s), atol=atol)
    assert not np.allclose(rg, gradood.create("energy-x-l1").score(s))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_v_equal_one_is_energy(relu_signals, T):
    _, s = relu_signals
    got = gradood.create("output-feature", output_term="energy", feature_term="one", temperature=T).score(s)
    np.testing.assert_allclose(got, gradood.create("energy", temperature=T).score(s), rtol=rtol_for(s))


def test_u_equal_one_is_clipped_l1_alone(relu_signals):
    _, s = relu_signals
    for k in (0.2, 1.0, INF):
        got = gradood.create("output-feature", output_term="one", feature_term="clipped_l1", k=k).score(s)
        np.testing.assert_allclose(got, np.minimum(_h(s), k).sum(1), rtol=rtol_for(s))


def test_rg_with_large_temperature_ranks_like_the_clipped_l1(relu_signals):
    _, s = relu_signals
    k = 0.5
    v = gradood.create("output-feature", output_term="one", feature_term="clipped_l1", k=k).score(s)
    order_v = np.argsort(v, kind="stable")
    gaps = np.diff(np.sort(v)) / np.abs(v).max()
    assert gaps.min() > 1e-6  # distinct values, so the ranking is well defined
    rg_hot = gradood.create("rg", k=k, temperature=1e8).score(s)
    np.testing.assert_array_equal(np.argsort(rg_hot, kind="stable"), order_v)
    assert spearmanr(rg_hot, v).statistic == pytest.approx(1.0, abs=1e-12)
    # T * LSE(f/T) -> T log C + mean(f): the output term becomes a constant
    u = gradood.create("energy", temperature=1e8).score(s)
    C = s.logits.shape[1]
    np.testing.assert_allclose(u, 1e8 * math.log(C) + _f(s).mean(1), rtol=rtol_for(s, 1e-13))
    # non-trivial: at T = 1 the energy does change the ranking
    rg_cold = gradood.create("rg", k=k, temperature=1.0).score(s)
    assert not np.array_equal(np.argsort(rg_cold, kind="stable"), order_v)


def test_rg_warns_when_the_energy_is_not_positive():
    model = seeded(MLP, 6, logit_shift=-20.0)  # all logits very negative: LSE < 0
    s = _sig(model, make_inputs(10, 6, seed=6))
    with pytest.warns(RuntimeWarning, match="MORE OOD"):
        gradood.create("rg").score(s)
    with pytest.warns(RuntimeWarning, match="MORE OOD"):
        gradood.create("energy-x-l1").score(s)


# ----------------------------------------------------------------------------------------- ReAct
def test_react_without_clipping_is_energy(relu_signals):
    model, s = relu_signals
    tol = 1e-12 if s.logits.dtype == torch.float64 else 1e-5  # re-applying the head rounds in float32 models
    for T in (1.0, 2.0):
        got = gradood.create("react", clip=INF, temperature=T).score(s)
        np.testing.assert_allclose(got, gradood.create("energy", temperature=T).score(s), rtol=tol)
    # a percentile of 100 clips at the largest activation: nothing changes either
    got = gradood.create("react", percentile=100).fit(s).score(s)
    np.testing.assert_allclose(got, gradood.create("energy").score(s), rtol=tol)


# ----------------------------------------------------------------------------------------- gradient family
def test_gradient_family_relations(relu_signals):
    _, s = relu_signals
    h, f = _h(s), _f(s)
    C = f.shape[1]
    for T in (1.0, 2.5):
        kl = gradood.create("gradnorm", temperature=T).score(s)
        ones = gradood.create("gradnorm", temperature=T, loss="ones").score(s)
        np.testing.assert_allclose(ones, C * kl, rtol=rtol_for(s))  # official code's loss = C x paper's
        uv = gradood.create("output-feature", output_term="gradnorm", feature_term="l1", temperature=T).score(s)
        np.testing.assert_allclose(kl, uv / T, rtol=rtol_for(s))
        ex = gradood.create("exgrad-id", temperature=T).score(s)
        uv = gradood.create("output-feature", output_term="exgrad", feature_term="l1", temperature=T,
                            higher_is_id=True).score(s)
        np.testing.assert_allclose(ex, 2.0 / T * uv, rtol=rtol_for(s))
    # eq. 5 in log form = energy + log ||h||_1
    np.testing.assert_allclose(gradood.create("rg-eq5").score(s),
                               gradood.create("energy").score(s) + np.log(np.abs(h).sum(1)), rtol=rtol_for(s))


@pytest.mark.parametrize("norm", ["l1", "l2", "l2sq"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_exgrad_default_sign_is_minus_exgrad_id(relu_signals, norm, T):
    _, s = relu_signals
    for bias in (False, True):
        a = gradood.create("exgrad", norm=norm, temperature=T, include_bias=bias).score(s)
        b = gradood.create("exgrad-id", norm=norm, temperature=T, include_bias=bias).score(s)
        np.testing.assert_array_equal(a, -b)
        assert (b > 0).all()


def test_expected_l1_of_onehot_minus_p_is_twice_gini():
    """E_{y~p} ||e_y - p||_1 = 2 (1 - sum p^2) and E_{y~p} ||e_y - p||_2^2 = 1 - sum p^2 (docs/methods.md 1)."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(50, 9))
    p = softmax(z, axis=1)
    e = np.eye(9)
    l1 = np.array([sum(pi[y] * np.abs(e[y] - pi).sum() for y in range(9)) for pi in p])
    l2sq = np.array([sum(pi[y] * ((e[y] - pi) ** 2).sum() for y in range(9)) for pi in p])
    gini = 1.0 - (p ** 2).sum(1)
    np.testing.assert_allclose(l1, 2 * gini, rtol=1e-12)
    np.testing.assert_allclose(l2sq, gini, rtol=1e-12)
    for T in (1.0, 3.0):
        pt = softmax(z / T, axis=1)
        gt = 1.0 - (pt ** 2).sum(1)
        zt = torch.from_numpy(z)
        np.testing.assert_allclose(expected_logprob_grad_output_term(zt, T, "l1").numpy(), 2 * gt / T, rtol=1e-12)
        np.testing.assert_allclose(expected_logprob_grad_output_term(zt, T, "l2sq").numpy(), gt / T ** 2, rtol=1e-12)


# ----------------------------------------------------------------------------------------- ViM geometry
@pytest.fixture(scope="module")
def vim_fit():
    model = seeded(MLP, 7, hidden=8, signed=True, logit_scale=3.0)
    s = _sig(model, make_inputs(60, 6, seed=7, dtype=torch.float32))
    det = gradood.create("vim", dim=3).fit(s)
    return model, s, det


def test_vim_residual_space_is_orthogonal_to_the_principal_space(vim_fit):
    model, s, det = vim_fit
    R = det.residual_basis_.numpy()
    D = s.features.shape[1]
    assert R.shape == (D, D - 3)
    np.testing.assert_allclose(R.T @ R, np.eye(D - 3), atol=1e-12)  # orthonormal basis
    W, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    o = -np.linalg.pinv(W) @ b
    X = _h(s) - o
    _, vecs = np.linalg.eigh(X.T @ X / len(X))
    P = vecs[:, -3:]
    np.testing.assert_allclose(R.T @ P, np.zeros((D - 3, 3)), atol=1e-8)


def test_vim_residual_is_zero_in_the_principal_span(vim_fit):
    model, s, det = vim_fit
    W, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    o = -np.linalg.pinv(W) @ b
    X = _h(s) - o
    _, vecs = np.linalg.eigh(X.T @ X / len(X))
    P, Rn = vecs[:, -3:], vecs[:, :-3]
    rng = np.random.default_rng(1)
    c = rng.normal(size=(6, 3))
    h = o + c @ P.T  # in the principal span through the origin o
    logits = h @ W.T + b
    sig = gradood.Signals.from_arrays(logits=logits, features=h, head_weight=W, head_bias=b)
    np.testing.assert_allclose(det.score(sig), logsumexp(logits, axis=1), rtol=0, atol=1e-9)
    # adding a residual-space component r lowers the score by exactly alpha * ||r||
    r = rng.normal(size=(6, Rn.shape[1]))
    h2 = h + r @ Rn.T
    logits2 = h2 @ W.T + b
    sig2 = gradood.Signals.from_arrays(logits=logits2, features=h2, head_weight=W, head_bias=b)
    np.testing.assert_allclose(det.score(sig2), logsumexp(logits2, axis=1) - det.alpha_ * np.linalg.norm(r, axis=1),
                               rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------- KL-matching
def test_klmatching_templates_are_distributions():
    rng = np.random.default_rng(3)
    f = rng.normal(scale=2.0, size=(40, 6))
    f[:, 5] -= 30  # an unseen class
    for smoothing in (1e-8, 1e-3, 0.5):
        det = gradood.create("klmatching", smoothing=smoothing).fit(gradood.Signals.from_arrays(logits=f))
        t = det.templates_.numpy()
        np.testing.assert_allclose(t.sum(1), np.ones(6), rtol=0, atol=1e-12)
        assert (t > 0).all()
        scores = det.score(gradood.Signals.from_arrays(logits=f))
        assert np.isfinite(scores).all() and (scores <= 1e-12).all()  # -min KL <= 0


def test_klmatching_scores_a_template_itself_as_zero():
    rng = np.random.default_rng(4)
    f = rng.normal(scale=2.0, size=(40, 4))
    det = gradood.create("klmatching").fit(gradood.Signals.from_arrays(logits=f))
    t = det.templates_.numpy()
    s = det.score(gradood.Signals.from_arrays(logits=np.log(t)))  # softmax(log t) = t
    np.testing.assert_allclose(s, np.zeros(4), atol=1e-12)


# ----------------------------------------------------------------------------------------- RG additive
def test_rg_additive_alpha_is_m_times_std_ratio_on_its_fit_subset():
    rng = np.random.default_rng(5)
    n, n_fit, k, m = 9, 4, 0.8, 0.6
    f = rng.normal(scale=2.0, size=(n, 5))
    h = np.abs(rng.normal(size=(n, 7)))
    s = gradood.Signals.from_arrays(logits=f, features=h)
    det = gradood.create("rg-additive", k=k, m=m, n_fit=n_fit, seed=2).fit(s)
    e, v = logsumexp(f, axis=1), np.minimum(h, k).sum(1)
    ratios = {sub: e[list(sub)].std() / v[list(sub)].std() for sub in itertools.combinations(range(n), n_fit)}
    matches = [sub for sub, r in ratios.items() if abs(r - det.alpha_s_) <= 1e-12 * r]
    assert len(matches) >= 1, "alpha_s is not the std ratio of any subset of n_fit samples"
    assert det.alpha_ == pytest.approx(m * det.alpha_s_, rel=1e-14)
    np.testing.assert_allclose(det.score(s), e + det.alpha_ * v, rtol=1e-12)
    # m = 0: the additive form is the energy alone
    det0 = gradood.create("rg-additive", k=k, m=0.0).fit(s)
    np.testing.assert_allclose(det0.score(s), gradood.create("energy").score(s), rtol=1e-12)
    # the ratio does not depend on the subset draw when n_fit >= n
    for seed in (0, 1):
        d = gradood.create("rg-additive", k=k, m=m, n_fit=n, seed=seed).fit(s)
        assert d.alpha_ == pytest.approx(m * e.std() / v.std(), rel=1e-12)


def test_mahalanobis_on_labelled_probe_signals_matches_single_class_distance():
    """With one class, the tied covariance is the plain covariance: score = -(h - mu)^T Sigma^-1 (h - mu)."""
    model = seeded(MLP, 8, signed=True)
    x = make_inputs(50, 6, seed=8)
    s = _sig(model, x, torch.zeros(50, dtype=torch.long))
    det = gradood.create("mahalanobis").fit(s)
    h = _h(s)
    mu = h.mean(0)
    P = np.linalg.inv(np.cov(h, rowvar=False, bias=True))
    ref = -np.einsum("ij,jk,ik->i", h - mu, P, h - mu)
    np.testing.assert_allclose(det.score(s), ref, rtol=1e-7)
    # mean squared Mahalanobis distance to the own mean over the fit data = D (trace identity)
    assert -det.score(s).mean() == pytest.approx(h.shape[1], rel=1e-8)
