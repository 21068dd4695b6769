"""Gradient-family detectors (GradUncertainty, GAIA-A, the low-dimensional heads, MC dropout) against plain
autograd per-sample loops and numpy on small float64 models, plus their identities with other detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradood
from conftest import BNCNN, MLP, make_inputs, make_labels, probe_signals, seeded
from gradood.errors import ConfigError, GradoodError

RTOL = 1e-9


def np_(t):
    return t.detach().double().numpy()


def _loop_grad_norms(model, x, loss_of_logits, names=None):
    """Per sample: the L2 norm of the gradient of ``loss_of_logits(model(x_i))`` w.r.t. the named parameters
    (all when None), one backward per sample."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    out = []
    for i in range(len(x)):
        loss = loss_of_logits(model(x[i: i + 1])[0])
        grads = torch.autograd.grad(loss, params)
        out.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    return np.array(out)


def _predicted_nll(f):
    return -torch.log_softmax(f, dim=0)[f.argmax()]


def _confounding_bce(f):
    return nn.functional.binary_cross_entropy_with_logits(f, torch.ones_like(f), reduction="sum")


@pytest.fixture
def bncnn_signals():
    model = seeded(BNCNN, 3, torch.float64)
    x = make_inputs(9, 2, 5, 5, seed=4, dtype=torch.float64)
    return model, x, probe_signals(model, x, batch_size=4)


@pytest.mark.parametrize("target,loss,sign", [("predicted", _predicted_nll, -1.0), ("confounding", _confounding_bce, 1.0)])
def test_gradunc_matches_per_sample_autograd_over_all_parameters(bncnn_signals, target, loss, sign):
    """Oberdiek et al.: -||grad||, a large gradient is an uncertain prediction; Lee & AlRegib's all-ones label:
    +||grad||, the confident prediction has the largest gradient (see the docstring)."""
    model, x, s = bncnn_signals
    got = gradood.create("gradunc", target=target).fit(s).score(s)
    np.testing.assert_allclose(got, sign * _loop_grad_norms(model, x, loss), rtol=RTOL)


def test_gradunc_confounding_variant_is_registered():
    assert gradood.create("gradunc-confounding").target == "confounding"


def test_gradunc_squared_is_grodin_sg(bncnn_signals):
    """Oberdiek's predicted-label gradient is GRODIN's SG-part at T = 1, eps = 0: ``gradunc^2 = -grodin-SG``."""
    _, _, s = bncnn_signals
    g = gradood.create("gradunc").fit(s).score(s)
    sg = gradood.create("grodin", part="SG").fit(s).score(s)
    np.testing.assert_allclose(-g**2, sg, rtol=RTOL)


def test_gradunc_shares_grodin_sgs_signal():
    """The same backward pass, cached once, serves both detectors in a benchmark."""
    assert [r.key for r in gradood.create("gradunc").requests()] == \
        [r.key for r in gradood.create("grodin", part="SG").requests()]


def test_gradunc_on_the_head_is_the_closed_form():
    """Over the head's weight and bias: ``||p - e_c_hat||_2 * sqrt(||h||^2 + 1)``."""
    model = seeded(MLP, 1, torch.float64, logit_scale=2.0)
    x = make_inputs(7, 6, seed=2, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=3)
    got = gradood.create("gradunc", params=["fc.weight", "fc.bias"]).fit(s).score(s)
    f, h = np_(model(x)), np_(model.features(x))
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(f)), f.argmax(1)] -= 1.0
    np.testing.assert_allclose(got, -np.linalg.norm(p, axis=1) * np.sqrt((h**2).sum(1) + 1), rtol=RTOL)


def test_gradunc_refuses_an_unknown_target():
    with pytest.raises(ConfigError, match="target"):
        gradood.create("gradunc", target="true")


# --------------------------------------------------------------------------------------------- GAIA-A
def _loop_gaia(model, x, layers):
    """Per sample: sum over layers of the L2 norm of the channel-wise spatial mean of d log p_c_hat / d A_l."""
    mods = dict(model.named_modules())
    out = []
    for i in range(len(x)):
        acts = {}
        hs = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o)) for n in layers]
        f = model(x[i: i + 1])[0]
        for h in hs:
            h.remove()
        logp = torch.log_softmax(f, dim=0)[f.argmax()]
        grads = torch.autograd.grad(logp, [acts[n] for n in layers])
        out.append(sum(float(g[0].reshape(g.shape[1], -1).mean(dim=1).norm()) for g in grads))
    return -np.array(out)


def test_gaia_matches_per_sample_autograd_on_the_default_layers(bncnn_signals):
    model, x, s = bncnn_signals
    det = gradood.create("gaia-a").fit(s)
    np.testing.assert_allclose(det.score(s), _loop_gaia(model, x, ["act1", "act2"]), rtol=RTOL)


def test_gaia_on_named_layers_and_independent_of_batch_size(bncnn_signals):
    model, x, s = bncnn_signals
    got = gradood.create("gaia-a", layers=["bn1", "conv2"]).fit(s).score(s)
    np.testing.assert_allclose(got, _loop_gaia(model, x, ["bn1", "conv2"]), rtol=RTOL)
    one = probe_signals(model, x, batch_size=1)
    np.testing.assert_allclose(gradood.create("gaia-a", layers=["bn1", "conv2"]).fit(one).score(one), got, rtol=RTOL)


def test_gaia_on_the_penultimate_layer_is_the_closed_form():
    """At the head's input h: ``d log p_c / d h = W^T (e_c - p)``, so the score is ``-||W^T (e_c - p)||_2``."""
    model = seeded(MLP, 1, torch.float64, logit_scale=2.0)
    x = make_inputs(7, 6, seed=2, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=3)
    got = gradood.create("gaia-a", layers=["body"]).fit(s).score(s)
    f, W = np_(model(x)), np_(model.fc.weight)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = -p
    d[np.arange(len(f)), f.argmax(1)] += 1.0
    np.testing.assert_allclose(got, -np.linalg.norm(d @ W, axis=1), rtol=RTOL)


def test_gaia_refuses_unknown_layers(bncnn_signals):
    _, _, s = bncnn_signals
    with pytest.raises(ConfigError, match="nope"):
        gradood.create("gaia-a", layers=["nope"]).fit(s).score(s)


def test_gaia_refuses_a_layer_that_does_not_reach_the_logits():
    class Side(MLP):
        def __init__(self):
            super().__init__()
            self.side = nn.Linear(6, 2)

        def forward(self, x):
            self.side(x)
            return super().forward(x)

    model = seeded(Side, 0, torch.float64)
    s = probe_signals(model, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(GradoodError, match="side"):
        gradood.create("gaia-a", layers=["side"]).fit(s).score(s)
