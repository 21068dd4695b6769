"""Gradient-family detectors (GradUncertainty, GAIA-A, the low-dimensional heads, MC dropout) against plain
autograd per-sample loops and numpy on small float64 models, plus their identities with other detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradood
from conftest import (BNCNN, MLP, ConvHeadNet, SmallCNN, count_forward_passes, make_inputs, make_labels,
                      probe_signals, seeded)
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


@pytest.mark.parametrize("target,loss,sign",
                         [("predicted", _predicted_nll, -1.0), ("confounding", _confounding_bce, 1.0)])
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
class ResBNNet(nn.Module):
    """``conv1 -> bn1 -> ReLU(inplace) -> conv2 -> bn2 -> (+= the block's input, in place) -> ReLU(inplace) ->
    pool (AdaptiveAvgPool2d 1) -> flatten -> fc``: the official CIFAR nets' shape (BatchNorm, in-place ReLUs, a
    residual addition written into the BN output, a pooled pre-head layer as the official WideResNet's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(3, 4)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.3, 1.2)
                bn.bias.uniform_(-0.2, 0.2)
            self.bn2.weight[1] = -0.8
            self.fc.weight.mul_(3.0)

    def forward(self, x):
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        b += a
        return self.fc(self.pool(self.act2(b)).flatten(1))


def _official_gaia_a(model, x, inner, last, inputs_of=False, head="fc"):
    """The official ``cal_grad_value`` (JGEthanChen/GAIA-OOD, cal_method.py) re-run per sample: ``Grad_all_hook``s
    (``register_hook`` on the output of every module in ``inner`` -- on its input with ``inputs_of`` -- and of
    ``last``); ``logsoftmax(y).sum().backward(retain_graph=True)``; the output component
    ``sqrt(|mean_hw grad(last)|.mean(1))``; then ``before_head_data.sum().backward()`` (the input of ``head``);
    ``mean((|mean_hw grad(inner)| / output_component)^2)``; returned negated, as the official ``cal_score``."""
    mods = dict(model.named_modules())
    out = []
    for i in range(len(x)):
        grads, before_head = {}, {}

        def keep(name):
            def store(t):
                t.register_hook(lambda g: grads.__setitem__(name, g.detach()))
            return store

        hs = [mods[n].register_forward_pre_hook(lambda _m, a, s=keep(n): s(a[0])) if inputs_of
              else mods[n].register_forward_hook(lambda _m, _i, o, s=keep(n): s(o)) for n in inner]
        hs.append(mods[last].register_forward_hook(lambda _m, _i, o, s=keep("last"): s(o)))
        hs.append(mods[head].register_forward_pre_hook(lambda _m, a: before_head.__setitem__("h", a[0])))
        y = model(x[i: i + 1])
        for h in hs:
            h.remove()
        torch.log_softmax(y, dim=-1).sum().backward(retain_graph=True)
        g_last = grads["last"]
        before_head_grad = g_last.mean(dim=(-1, -2)) if g_last.ndim == 4 else g_last
        output_component = torch.sqrt(torch.abs(before_head_grad).mean(dim=1)).unsqueeze(dim=1)
        before_head["h"].sum().backward()
        inner_component = torch.abs(torch.cat([grads[n].mean(dim=(-1, -2)) for n in inner], dim=1))
        out.append(-float(torch.pow(inner_component / output_component, 2).mean(dim=1)))
    return np.array(out)


@pytest.fixture
def resbn():
    model = seeded(ResBNNet, 22, torch.float64)
    x = make_inputs(9, 2, 6, 6, seed=22, dtype=torch.float64)
    return model, x, probe_signals(model, x, batch_size=4)


def test_gaia_a_is_the_official_cal_grad_value_on_every_batchnorm(resbn):
    model, x, s = resbn
    det = gradood.create("gaia-a").fit(s)
    assert det.layers_ == ("bn1", "bn2") and det.inputs_of_ is False
    ref = _official_gaia_a(model, x, ["bn1", "bn2"], "pool")
    np.testing.assert_allclose(det.score(s), ref, rtol=RTOL)
    assert np.ptp(ref) > 0.1 * np.abs(ref).max()
    one = probe_signals(model, x, batch_size=1)  # samples do not interact in the batched backwards
    np.testing.assert_allclose(gradood.create("gaia-a", layers=["bn1", "bn2"]).fit(one).score(one), ref, rtol=RTOL)
    # the official ResNet reads the output component on the last map (layer4) instead of the pooled vector: its
    # channel averages are h's gradient / (H W), so the official score is H W times gradood's: same ranking
    np.testing.assert_allclose(_official_gaia_a(model, x, ["bn1", "bn2"], "act2"), 36 * ref, rtol=RTOL)


def test_gaia_a_on_the_pooled_layers_is_the_closed_form(resbn):
    """At the pool's output (``h`` up to the flatten) the inner gradient is 1, at the map it pools 1 / (H W); the
    output component of a linear head is ``mean_d |W^T (1 - K p)|_d``. So the score is
    ``-(1 / (H W))^2 / mean_d |W^T (1 - K p)|_d``: negative, the log-softmax summed over all K classes, the mean
    (not the sum) over channels and positions."""
    model, x, s = resbn
    f, W = np_(model(x)), np_(model.fc.weight)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (1.0 - f.shape[1] * p) @ W
    assert np.all(d.min(axis=1) < 0) and np.all(d.max(axis=1) > 0)  # so that |.| before the mean matters
    o = np.abs(d).mean(axis=1)
    np.testing.assert_allclose(gradood.create("gaia-a", layers=["pool"]).fit(s).score(s), -1.0 / o, rtol=RTOL)
    np.testing.assert_allclose(gradood.create("gaia-a", layers=["act2", "pool"]).fit(s).score(s),
                               -(1.0 / 36**2 + 1.0) / 2 / o, rtol=RTOL)


def test_gaia_a_without_batchnorm_reads_the_pre_activations():
    """As gaia-z: the inputs of the activation modules whose input is a feature map (relu1, relu2; not the
    vector pre-activation fc1 of the MLP part); checked against the official loop on those inputs."""
    class ConvFC(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1, self.mp = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.conv2, self.relu2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
            self.fc1, self.relu3, self.fc = nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3)

        def forward(self, x):
            a = self.relu2(self.conv2(self.mp(self.relu1(self.conv1(x)))))
            return self.fc(self.relu3(self.fc1(a.flatten(1))))

    model = seeded(ConvFC, 12, torch.float64)
    x = make_inputs(8, 2, 6, 6, seed=13, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=5)
    det = gradood.create("gaia-a").fit(s)
    assert det.layers_ == ("relu1", "relu2") and det.inputs_of_ is True
    np.testing.assert_allclose(det.score(s), _official_gaia_a(model, x, ["relu1", "relu2"], "relu3",
                                                              inputs_of=True), rtol=RTOL)


def test_gaia_a_with_a_1x1_conv_head_as_the_official_bit():
    """BiT's head is a 1x1 conv on the pooled 1 x 1 map (the official ``before_head``), whose output component
    the official code reads at that map; gradood's closed form uses the conv's weight."""
    model = seeded(ConvHeadNet, 4, torch.float64, logit_scale=3.0)
    x = make_inputs(7, 2, 5, 5, seed=5, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=3, head="cls")
    det = gradood.create("gaia-a").fit(s)
    assert det.layers_ == ("conv",)  # functional ReLU: the top-level children, minus the pool (= h)
    np.testing.assert_allclose(det.score(s), _official_gaia_a(model, x, ["conv"], "pool", head="cls"), rtol=RTOL)


def test_gaia_a_default_layers_on_models_without_batchnorm_or_feature_maps():
    cnn = seeded(SmallCNN, 1, torch.float64)  # functional ReLUs: the top-level children, minus the pool (= h)
    s = probe_signals(cnn, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    det = gradood.create("gaia-a").fit(s)
    assert (det.layers_, det.inputs_of_) == (("conv1", "conv2"), False)
    mlp = seeded(MLP, 1, torch.float64)  # no feature map: the vector pre-activation (one channel per unit)
    x = make_inputs(7, 6, seed=2, dtype=torch.float64)
    s = probe_signals(mlp, x, batch_size=3)
    det = gradood.create("gaia-a").fit(s)
    assert (det.layers_, det.inputs_of_) == (("body.1",), True)
    z = mlp.body[0](x)
    f, W = np_(mlp(x)), np_(mlp.fc.weight)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    o = np.abs((1.0 - f.shape[1] * p) @ W).mean(axis=1)
    np.testing.assert_allclose(det.score(s), -(np_(z) > 0).mean(axis=1) / o, rtol=RTOL)  # d sum relu(z) / dz


def test_gaia_a_is_one_cached_request_of_the_shared_pass(resbn, monkeypatch):
    model, _, fit = resbn
    det = gradood.create("gaia-a").fit(fit)
    assert len(det.requests()) == 1 and det.requests()[0].key == "gaia-a:bn1,bn2"
    assert det.fit_requests() == []
    test = probe_signals(model, make_inputs(10, 2, 6, 6, seed=2, dtype=torch.float64), batch_size=4)
    calls = count_forward_passes(monkeypatch)
    first = det.score(test)
    assert calls["n"] == 3 * 2  # 3 batches: the shared forward and GAIA-A's forward with gradients
    np.testing.assert_array_equal(det.score(test), first)
    assert calls["n"] == 6


def test_gaia_a_bad_inputs(resbn):
    _, _, s = resbn
    with pytest.raises(ConfigError, match=r"unknown layers \['nope'\]"):
        gradood.create("gaia-a", layers=["nope"]).fit(s).score(s)
    with pytest.raises(ConfigError, match="layers"):
        gradood.create("gaia-a", layers="bn1")
    with pytest.raises(gradood.InputError, match="probe.signals"):
        gradood.create("gaia-a").fit(gradood.Signals.from_arrays(logits=np.zeros((3, 2))))
    with pytest.raises(GradoodError, match="'fc' does not influence the head's input"):
        gradood.create("gaia-a", layers=["fc"]).fit(s).score(s)


def test_gaia_a_refuses_a_layer_that_does_not_reach_the_logits():
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
    assert gradood.create("gaia-a").fit(s).layers_ == ("body.1",)  # the default leaves it out


# ------------------------------------------------------------------------ Wu et al.'s other low-dim heads
LOWDIM_KW = dict(k_dims=3, power_iters=1, probe_epochs=2)


@pytest.fixture(scope="module")
def lowdim_data():
    model = seeded(MLP, 3, torch.float64, d_in=6, hidden=16, n_classes=5, logit_scale=2.0)
    x, y = make_inputs(60, 6, seed=8, dtype=torch.float64), make_labels(60, 5, seed=9)
    # the test set includes far-away inputs, so that clipping and clamping act on some of its samples
    x_test = torch.cat([make_inputs(12, 6, seed=10, dtype=torch.float64),
                        make_inputs(8, 6, seed=11, dtype=torch.float64, scale=6.0)])
    return probe_signals(model, x, y, batch_size=16), probe_signals(model, x_test, batch_size=16)


def _probe_np(det):
    bn, fc = det.probe_.bn, det.probe_.fc
    return dict(rm=np_(bn.running_mean), sd=np.sqrt(np_(bn.running_var) + bn.eps), g=np_(bn.weight),
                be=np_(bn.bias), W=np_(fc.weight), c=np_(fc.bias))


def _bn(P, z):
    return (z - P["rm"]) / P["sd"] * P["g"] + P["be"]


def _lse(a):
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def _softmax(a):
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _fitted(name, lowdim_data, **kw):
    fit, test = lowdim_data
    det = gradood.create(name, **LOWDIM_KW, **kw).fit(fit)
    return det, np_(fit.get(det.request_)), np_(test.get(det.request_)), det.score(test)


@pytest.mark.parametrize("start", [0, 1])
def test_lowdim_react_head_is_probe_energy_of_clipped_projections(lowdim_data, start):
    """The official code's ReAct head: projection dimensions ``start:`` clipped at their ID percentile."""
    det, z_fit, z, got = _fitted("lowdim-pca-react", lowdim_data, react_start_dim=start, react_percentile=80.0)
    P = _probe_np(det)
    clip = np.percentile(z_fit[:, start:], 80)
    zc = z.copy()
    zc[:, start:] = np.minimum(zc[:, start:], clip)
    assert (z[:, start:] > clip).any() and (start == 0 or (z[:, :start] > clip).any())  # clipped, and kept
    np.testing.assert_allclose(got, _lse(_bn(P, zc) @ P["W"].T + P["c"]), rtol=1e-9)


def test_lowdim_react_start_dim_must_leave_dimensions_to_clip(lowdim_data):
    with pytest.raises(ConfigError, match="react_start_dim"):
        _fitted("lowdim-pca-react", lowdim_data, react_start_dim=3)
    # None: 10 (the code's value) with more than 10 directions, else every dimension is clipped
    assert _fitted("lowdim-pca-react", lowdim_data)[0].react_start_dim_ == 0
    assert gradood.create("lowdim-pca-react")._react_start(16) == 10


def test_lowdim_bats_head_is_energy_of_bn_clamped_probe_features(lowdim_data):
    fit, test = lowdim_data
    det = gradood.create("lowdim-pca-bats", **LOWDIM_KW, bats_lam=0.5).fit(fit)
    with torch.no_grad():
        det.probe_.bn.weight[0] *= -1.0  # BN scales may be negative: the range is beta -/+ lam * |gamma|
    z, got = np_(test.get(det.request_)), det.score(test)
    P = _probe_np(det)
    b = _bn(P, z)
    lo, hi = P["be"] - 0.5 * np.abs(P["g"]), P["be"] + 0.5 * np.abs(P["g"])
    assert ((b < lo) | (b > hi)).any()
    np.testing.assert_allclose(got, _lse(np.clip(b, lo, hi) @ P["W"].T + P["c"]), rtol=1e-9)


def test_lowdim_bats_with_a_wide_range_is_the_energy_head(lowdim_data):
    _, _, _, wide = _fitted("lowdim-pca-bats", lowdim_data, bats_lam=1e9)
    _, _, _, energy = _fitted("lowdim-pca-energy", lowdim_data)
    np.testing.assert_allclose(wide, energy, rtol=1e-5)  # the energy head runs the float32 probe


def test_lowdim_gradnorm_head_is_the_l1_norm_of_the_probe_weights_gradient(lowdim_data):
    det, _, z, got = _fitted("lowdim-pca-gradnorm", lowdim_data)
    P = _probe_np(det)
    W = torch.tensor(P["W"], requires_grad=True)
    ref = []
    for b in _bn(P, z):
        f = W @ torch.tensor(b) + torch.tensor(P["c"])
        kl = -torch.log_softmax(f, dim=0).mean() - np.log(len(f))  # KL(u || softmax(f))
        (g,) = torch.autograd.grad(kl, W)
        ref.append(float(g.abs().sum()))
    np.testing.assert_allclose(got, ref, rtol=1e-9)


@pytest.mark.parametrize("eps,T", [(0.0, 100.0), (0.5, 100.0), (0.5, 2.0)])
def test_lowdim_odin_head_is_odin_on_the_projections(lowdim_data, eps, T):
    """``z' = z + eps * sign(grad_z log p_c_hat)`` with the gradient in closed form,
    ``(gamma / sigma) * W^T (e_c_hat - p_T) / T``; score ``max softmax(probe(z') / T)``."""
    det, _, z, got = _fitted("lowdim-pca-odin", lowdim_data, odin_eps=eps, odin_temperature=T)
    P = _probe_np(det)
    p = _softmax((_bn(P, z) @ P["W"].T + P["c"]) / T)
    d = -p
    d[np.arange(len(p)), p.argmax(1)] += 1.0
    grad = (d @ P["W"]) * (P["g"] / P["sd"]) / T
    z2 = z + eps * np.sign(grad)
    np.testing.assert_allclose(got, _softmax((_bn(P, z2) @ P["W"].T + P["c"]) / T).max(1), rtol=1e-9)


def test_lowdim_odin_at_t1_without_perturbation_is_the_msp_head(lowdim_data):
    _, _, _, odin = _fitted("lowdim-pca-odin", lowdim_data, odin_eps=0.0, odin_temperature=1.0)
    _, _, _, msp = _fitted("lowdim-pca-msp", lowdim_data)
    np.testing.assert_allclose(odin, msp, rtol=1e-5)


def test_lowdim_shaped_heads_refuse_the_forward_ensemble():
    with pytest.raises(ConfigError, match="ensemble"):
        gradood.create("lowdim-pca-react", ensemble=1.0)


# --------------------------------------------------------------------------------------------- MC dropout
class DropMLP(nn.Module):
    """``x -> Linear -> ReLU -> Dropout(p) -> fc``, plus a BatchNorm1d whose running statistics must stay."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(p))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(x))


def _mc_reference(model, x, batch_size, n, seed):
    """Per batch b: torch.manual_seed(seed * 1_000_003 + b), n passes with only the Dropout in train mode."""
    from gradood.detectors.mc_dropout import batch_seed

    out = []
    drop = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for b, xb in enumerate(x.split(batch_size)):
        torch.manual_seed(batch_seed(seed, b))
        for m in drop:
            m.train()
        with torch.no_grad():
            p = sum(torch.softmax(model(xb), dim=1) for _ in range(n)) / n
        for m in drop:
            m.eval()
        out.append(np_(p.amax(dim=1)))
    return np.concatenate(out)


def test_mc_dropout_is_the_max_of_the_mean_softmax_over_dropout_passes():
    model = seeded(DropMLP, 0, torch.float64)
    x = make_inputs(10, 6, seed=1, dtype=torch.float64)
    got = gradood.create("mc-dropout", n_samples=7, seed=3).score(probe_signals(model, x, batch_size=4))
    assert not any(m.training for m in model.modules())  # the dropout layers are back in eval mode
    ref = _mc_reference(model, x, 4, 7, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    msp = gradood.create("msp").score(probe_signals(model, x, batch_size=4))
    assert np.abs(got - msp).max() > 1e-3  # the dropout masks act


def test_mc_dropout_is_seeded_restores_flags_and_leaves_the_global_rng_alone():
    model = seeded(DropMLP, 0, torch.float64).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = make_inputs(10, 6, seed=1, dtype=torch.float64)
    rng = torch.random.get_rng_state()
    a = gradood.create("mc-dropout", n_samples=5).score(probe_signals(model, x, batch_size=4))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN running stats untouched
    b = gradood.create("mc-dropout", n_samples=5).score(probe_signals(model, x, batch_size=4))
    c = gradood.create("mc-dropout", n_samples=5, seed=1).score(probe_signals(model, x, batch_size=4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6


def test_mc_dropout_with_a_vanishing_drop_rate_is_msp():
    model = seeded(DropMLP, 0, torch.float64, p=1e-15)
    x = make_inputs(10, 6, seed=1, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)
    with torch.no_grad():
        msp = _softmax(np_(model(x))).max(1)
    np.testing.assert_allclose(gradood.create("mc-dropout", n_samples=3).score(s), msp, rtol=1e-12)


@pytest.mark.parametrize("p", [None, 0.0])
def test_mc_dropout_refuses_a_model_without_dropout(p):
    model = seeded(MLP, 0, torch.float64) if p is None else seeded(DropMLP, 0, torch.float64, p=p)
    s = probe_signals(model, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.errors.ModelError, match="dropout"):
        gradood.create("mc-dropout").score(s)


def test_mc_dropout_is_not_in_specs_all_detectors():
    from gradood.bench.spec import all_detectors

    names = [r.name for r in all_detectors()]
    assert "mc-dropout" not in names and "gradunc" in names


def test_mc_dropout_round_trips_through_save_and_load(tmp_path):
    model = seeded(DropMLP, 0, torch.float64)
    s = probe_signals(model, make_inputs(10, 6, seed=1, dtype=torch.float64), batch_size=4)
    det = gradood.create("mc-dropout", n_samples=4, seed=2).fit(s)
    loaded = gradood.load_detector(det.save(tmp_path / "mc"))
    assert loaded.get_params() == det.get_params()
    np.testing.assert_array_equal(loaded.score(s), det.score(s))


@pytest.mark.parametrize("name", ["gradunc", "gradunc-confounding", "gaia-a", "mc-dropout"])
def test_detectors_that_fit_nothing_request_nothing_to_fit(name):
    """No backward (or dropout) pass over the ID fit data: the default bench's 5 000 fit samples are free."""
    assert gradood.create(name).fit_requests() == []


def test_ash_fm_chooses_its_layer_at_fit():
    model = seeded(BNCNN, 3, torch.float64)
    s = probe_signals(model, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    assert gradood.create("ash-fm").fit(s).layer_ == "act2"
    assert gradood.create("ash-fm", layer="bn1").fit(s).layer_ == "bn1"


# ------------------------------------------------------------------ Probe.forward(modify=) and ASH on a map
def _np_ash(h, percentile, mode):
    """ASH of each row in numpy: keep the top d - round(d p / 100) values (ties: any), then p / b / s."""
    n, d = h.shape
    k = d - int(round(d * percentile / 100.0))
    out = np.zeros_like(h)
    for i in range(n):
        top = np.argsort(-h[i], kind="stable")[:k]
        s1, kept = h[i].sum(), h[i][top]
        out[i, top] = kept if mode == "p" else (s1 / k if mode == "b" else kept * np.exp(s1 / kept.sum()))
    return out


def test_probe_forward_modify_replaces_a_layers_output_and_runs_on():
    model = seeded(BNCNN, 3, torch.float64)
    x = make_inputs(5, 2, 5, 5, seed=4, dtype=torch.float64)
    probe = gradood.Probe(model)
    out = probe.forward(x, ["act1"], modify={"act1": lambda o: 2.0 * o})
    with torch.no_grad():
        a1 = 2.0 * model.act1(model.bn1(model.conv1(x)))
        ref = model.fc(model.pool(model.act2(model.conv2(a1))).flatten(1))
    np.testing.assert_allclose(np_(out.logits), np_(ref), rtol=1e-12)
    np.testing.assert_allclose(np_(out.taps["act1"]), np_(a1), rtol=1e-12)  # taps see the modified output
    np.testing.assert_allclose(np_(probe.forward(x).logits), np_(model(x)), rtol=1e-12)  # hooks removed
    with pytest.raises(gradood.errors.InputError, match="nope"):
        probe.forward(x, modify={"nope": lambda o: o})
    with pytest.raises(gradood.errors.ModelError, match="shape"):
        probe.forward(x, modify={"act1": lambda o: o[:, :1]})


@pytest.mark.parametrize("mode,p", [("s", 90.0), ("p", 60.0), ("b", 65.0)])
def test_ash_on_the_last_feature_map_matches_numpy(mode, p):
    model = seeded(BNCNN, 3, torch.float64)
    x = make_inputs(6, 2, 5, 5, seed=4, dtype=torch.float64)
    got = gradood.create("ash-fm", mode=mode, percentile=p).fit(probe_signals(model, x, batch_size=4)).score(
        probe_signals(model, x, batch_size=4))
    with torch.no_grad():
        a2 = model.act2(model.conv2(model.act1(model.bn1(model.conv1(x)))))
    shaped = torch.tensor(_np_ash(np_(a2.flatten(1)), p, mode)).reshape(a2.shape)  # act2: the last map
    with torch.no_grad():
        f = np_(model.fc(model.pool(shaped).flatten(1)))
    np.testing.assert_allclose(got, _lse(f), rtol=1e-10)


def test_ash_fm_on_the_penultimate_layer_is_ash_s():
    """On a layer whose output is the head's input, the feature-map form is the penultimate ASH."""
    model = seeded(MLP, 1, torch.float64, logit_scale=2.0)
    s = probe_signals(model, make_inputs(7, 6, seed=2, dtype=torch.float64), batch_size=3)
    np.testing.assert_allclose(gradood.create("ash-fm", layer="body").fit(s).score(s),
                               gradood.create("ash-s").score(s), rtol=1e-10)


def test_ash_fm_without_a_feature_map_asks_for_a_layer():
    model = seeded(MLP, 1, torch.float64)
    s = probe_signals(model, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="no activation layer with a feature-map output.*layer="):
        gradood.create("ash-fm").fit(s)
