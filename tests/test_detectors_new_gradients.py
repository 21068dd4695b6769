"""Gradient-family detectors of issue 13 against plain autograd (a per-sample loop) and numpy, on small float64
models, plus their identities with the head-only closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

import gradood
from conftest import BNCNN, MLP, make_inputs, probe_signals, seeded
from gradood.detectors.gradient_family import kl_uniform_loss

RTOL = 1e-9


def np_(t):
    return t.detach().double().numpy()


def _autograd_kl_norms(model, x, T, names=None):
    """The L2 norm of the gradient of KL(u || softmax(f(x_i)/T)) for each sample, one backward each."""
    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    out = []
    for i in range(len(x)):
        f = model(x[i: i + 1])[0]
        C = f.shape[0]
        u = torch.full((C,), 1.0 / C, dtype=f.dtype)
        kl = torch.sum(u * (torch.log(u) - torch.log_softmax(f / T, dim=0)))
        grads = torch.autograd.grad(kl, [p for _, p in params])
        out.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    return np.array(out)


def test_kl_uniform_loss_is_the_kl_divergence():
    f = make_inputs(6, 4, seed=1, dtype=torch.float64) * 3
    p = softmax(np_(f) / 2.0, axis=1)
    ref = np.sum(0.25 * np.log(0.25 / p), axis=1)
    np.testing.assert_allclose(np_(kl_uniform_loss(f, 2.0)), ref, rtol=1e-12)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_gradnorm_all_equals_a_per_sample_autograd_loop(T):
    model = seeded(BNCNN, 30, torch.float64)
    x = make_inputs(10, 2, 5, 5, seed=31, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)
    got = gradood.create("gradnorm-all", temperature=T).score(s)
    np.testing.assert_allclose(got, _autograd_kl_norms(model, x, T), rtol=RTOL)


def test_gradnorm_all_on_the_head_is_the_l2_gradnorm_with_bias():
    model = seeded(MLP, 32, torch.float64, logit_scale=2.0)
    x = make_inputs(12, 6, seed=33, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=5)
    head = gradood.create("gradnorm-all", params=["fc.weight", "fc.bias"]).score(s)
    np.testing.assert_allclose(head, _autograd_kl_norms(model, x, 1.0, {"fc.weight", "fc.bias"}), rtol=RTOL)
    closed = gradood.create("gradnorm", norm="l2", include_bias=True).score(s)
    np.testing.assert_allclose(head, closed, rtol=RTOL)
    # the last layer alone (params=1) is the same head
    np.testing.assert_allclose(gradood.create("gradnorm-all", params=1).score(s), head, rtol=RTOL)


def test_gradnorm_all_bad_params():
    for bad in ("some", 0, [], [3], True):
        with pytest.raises(gradood.ConfigError, match="params must be"):
            gradood.create("gradnorm-all", params=bad)


def test_gradnorm_all_needs_the_model():
    s = gradood.Signals.from_arrays(logits=np.zeros((3, 2)))
    with pytest.raises(gradood.InputError):
        gradood.create("gradnorm-all").score(s)


# ----------------------------------------------------------------------------------------- GradOrth
def _gradorth_ref(H_fit, H, F, threshold, T):
    U, sv, _ = np.linalg.svd(H_fit.T, full_matrices=False)  # R = H^T (D x N)
    e = sv**2
    k = int(np.argmax(np.cumsum(e) / e.sum() >= threshold - 1e-12)) + 1
    S = U[:, :k]
    C = F.shape[1]
    delta = (softmax(F / T, axis=1) - 1.0 / C) / T
    return np.linalg.norm(delta, axis=1) * np.linalg.norm(H @ S @ S.T, axis=1), k, S


@pytest.mark.parametrize("threshold,T", [(0.5, 1.0), (0.9, 2.0), (0.97, 1.0)])
def test_gradorth_against_numpy_svd(threshold, T):
    model = seeded(MLP, 34, torch.float64, hidden=9, logit_scale=2.0)
    fit = probe_signals(model, make_inputs(40, 6, seed=35, dtype=torch.float64), batch_size=16)
    test = probe_signals(model, make_inputs(15, 6, seed=36, dtype=torch.float64, scale=2.0), batch_size=16)
    det = gradood.create("gradorth", threshold=threshold, temperature=T).fit(fit)
    ref, k, S = _gradorth_ref(np_(fit.features), np_(test.features), np_(test.logits), threshold, T)
    assert det.rank_ == k and 1 <= k < 9
    np.testing.assert_allclose(np_(det.basis_ @ det.basis_.T), S @ S.T, atol=1e-10)  # same subspace
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-8)


def test_gradorth_is_the_projected_head_weight_gradient():
    """Autograd: the head weight's gradient of KL(u || softmax(f)), projected on the ID subspace (right
    multiplication by S S^T), has the Frobenius norm GradOrth scores."""
    model = seeded(MLP, 37, torch.float64, hidden=9, logit_scale=2.0)
    fit = probe_signals(model, make_inputs(40, 6, seed=38, dtype=torch.float64), batch_size=16)
    x = make_inputs(6, 6, seed=39, dtype=torch.float64)
    det = gradood.create("gradorth", threshold=0.8).fit(fit)
    P = det.basis_ @ det.basis_.T
    ref = []
    for i in range(len(x)):
        f = model(x[i: i + 1])
        g = torch.autograd.grad(kl_uniform_loss(f, 1.0).sum(), model.fc.weight)[0]
        ref.append(float((g @ P).norm()))
    np.testing.assert_allclose(det.score(probe_signals(model, x)), ref, rtol=RTOL)


def test_gradorth_full_subspace_is_the_l2_gradnorm():
    """threshold = 1 keeps every direction the (full-rank) ID features span: no projection, GradNorm's L2 form."""
    model = seeded(MLP, 40, torch.float64, hidden=5, signed=True)
    fit = probe_signals(model, make_inputs(40, 6, seed=41, dtype=torch.float64), batch_size=16)
    test = probe_signals(model, make_inputs(10, 6, seed=42, dtype=torch.float64), batch_size=16)
    det = gradood.create("gradorth", threshold=1.0).fit(fit)
    assert det.rank_ == 5
    np.testing.assert_allclose(det.score(test), gradood.create("gradnorm", norm="l2").score(test), rtol=1e-9)


def test_gradorth_bad_input():
    with pytest.raises(gradood.ConfigError, match="threshold"):
        gradood.create("gradorth", threshold=0)
    zero = gradood.Signals.from_arrays(logits=np.zeros((4, 2)), features=np.zeros((4, 3)),
                                       head_weight=np.ones((2, 3)), head_bias=np.zeros(2))
    with pytest.raises(gradood.InputError, match="every ID fit feature is zero"):
        gradood.create("gradorth").fit(zero)
