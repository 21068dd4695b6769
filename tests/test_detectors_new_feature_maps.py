"""Feature-map detectors of issue 13 (RankFeat, SCALE and BATS on a feature map, GAIA-Z) against independent
re-derivations on small float64 CNNs: numpy SVDs and numpy shaping of the captured maps, then the rest of the
network written out by hand; GAIA-Z against a per-sample autograd loop. Plus the papers' identities and the
bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

import gradood
from conftest import BNCNN, MLP, SmallCNN, count_forward_passes, make_inputs, probe_signals, seeded
from gradood.detectors.feature_map import remove_rank1, scale_map
from gradood.detectors.shaping import ash

RTOL = 1e-10


def np_(t):
    return t.detach().double().numpy()


def _lse(f, T=1.0):
    return T * logsumexp(np.asarray(f) / T, axis=1)


class TwoStageCNN(nn.Module):
    """``conv1 -> relu1 -> maxpool (6x6 -> 3x3) -> conv2 -> relu2 -> avgpool -> fc``: two spatial resolutions,
    so RankFeat's default fuses relu1 (the previous stage, "Block 3") and relu2 (the last map, "Block 4")."""

    def __init__(self, width: int = 5, n_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)
        with torch.no_grad():
            self.fc.weight.mul_(3.0)

    def stage1(self, x):
        return self.relu1(self.conv1(x))

    def stage2(self, a1):
        return self.relu2(self.conv2(self.pool1(a1)))

    def head(self, a2):
        return self.fc(self.pool(a2).flatten(1))

    def forward(self, x):
        return self.head(self.stage2(self.stage1(x)))


def _two_stage(seed=0):
    model = seeded(TwoStageCNN, seed, torch.float64)
    x = make_inputs(7, 2, 6, 6, seed=seed + 1, dtype=torch.float64)
    return model, x


# ------------------------------------------------------------------------------------------------ RankFeat
def _np_remove_rank1(a):
    """numpy: each sample's C x HW matrix minus s1 u1 v1^T (numpy's own SVD)."""
    a = np.asarray(a)
    x = a.reshape(a.shape[0], a.shape[1], -1)
    out = np.empty_like(x)
    for i in range(len(x)):
        u, s, vt = np.linalg.svd(x[i], full_matrices=False)
        out[i] = x[i] - s[0] * np.outer(u[:, 0], vt[0])
    return out.reshape(a.shape)


def _rankfeat_logits_by_hand(model, x):
    """The official fusion: Block 3 (relu1) removed and run through block 4; Block 4 (relu2) removed."""
    with torch.no_grad():
        a1 = model.stage1(x)
        l3 = model.head(model.stage2(torch.tensor(_np_remove_rank1(np_(a1)))))
        l4 = model.head(torch.tensor(_np_remove_rank1(np_(model.stage2(a1)))))
    return np_(l3), np_(l4)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_rankfeat_fuses_block_3_and_4_as_the_official_code(T):
    model, x = _two_stage()
    s = probe_signals(model, x, batch_size=3)
    det = gradood.create("rankfeat", temperature=T).fit(s)
    assert det.layers_ == ("relu1", "relu2")
    l3, l4 = _rankfeat_logits_by_hand(model, x)
    np.testing.assert_allclose(det.score(s), _lse((l3 + l4) / 2, T), rtol=RTOL)


def test_rankfeat_without_fusion_is_block_4_alone_and_named_layers_are_honoured():
    model, x = _two_stage(3)
    s = probe_signals(model, x, batch_size=4)
    l3, l4 = _rankfeat_logits_by_hand(model, x)
    last = gradood.create("rankfeat", fuse=False).fit(s)
    assert last.layers_ == ("relu2",)
    np.testing.assert_allclose(last.score(s), _lse(l4), rtol=RTOL)
    np.testing.assert_allclose(gradood.create("rankfeat", layers=["relu1"]).fit(s).score(s), _lse(l3), rtol=RTOL)
    # independent of the batch size (per-sample SVDs, no batch interaction)
    one = probe_signals(model, x, batch_size=1)
    np.testing.assert_allclose(gradood.create("rankfeat").fit(one).score(one),
                               _lse((l3 + l4) / 2), rtol=RTOL)


def test_rank1_removal_is_eckart_young():
    """The paper's construction: removing s1 u1 v1^T leaves the other singular values (the best rank-1
    approximation is gone): spectrum s[1:] and 0, spectral norm s2, ||X'||_F^2 = ||X||_F^2 - s1^2."""
    a = make_inputs(5, 4, 3, 3, seed=9, dtype=torch.float64).relu()
    r = remove_rank1(a)
    for i in range(len(a)):
        s = np.linalg.svd(np_(a[i]).reshape(4, 9), compute_uv=False)
        s_r = np.linalg.svd(np_(r[i]).reshape(4, 9), compute_uv=False)
        np.testing.assert_allclose(s_r, np.append(s[1:], 0.0), atol=1e-12)
        np.testing.assert_allclose((np_(r[i]) ** 2).sum(), (np_(a[i]) ** 2).sum() - s[0] ** 2, rtol=1e-10)


def test_rankfeat_on_a_one_by_one_map_removes_everything():
    """A C x 1 matrix is its own rank-1 term: on the pooled 6 x 1 x 1 map only the head's bias is left."""
    model = seeded(SmallCNN, 4, torch.float64, logit_scale=2.0)
    s = probe_signals(model, make_inputs(6, 2, 5, 5, seed=5, dtype=torch.float64), batch_size=4)
    got = gradood.create("rankfeat", layers=["pool"]).fit(s).score(s)
    np.testing.assert_allclose(got, np.full(6, _lse(np_(model.fc.bias)[None])[0]), rtol=RTOL)


def _np_power_rank1(x, iterations):
    """The official power iteration in numpy, from the same seeded start vector as gradood."""
    c = x.shape[1]
    u0 = torch.randn(c, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    out = np.empty_like(x)
    for i in range(len(x)):
        u = u0.copy()
        for _ in range(iterations):
            v = u @ x[i]
            v = v / (np.linalg.norm(v) + 1e-10)
            u = x[i] @ v
            u = u / (np.linalg.norm(u) + 1e-10)
        out[i] = (u @ x[i] @ v) * np.outer(u, v)
    return out


@pytest.mark.parametrize("iterations", [1, 3])
def test_rankfeat_power_iteration_is_the_official_loop(iterations):
    a = make_inputs(4, 5, 3, 4, seed=11, dtype=torch.float64).relu()
    x = np_(a).reshape(4, 5, 12)
    got = np_(remove_rank1(a, "power", iterations)).reshape(4, 5, 12)
    np.testing.assert_allclose(got, x - _np_power_rank1(x, iterations), rtol=1e-10, atol=1e-12)


def test_rankfeat_power_iteration_converges_to_the_svd():
    model, x = _two_stage(5)
    s = probe_signals(model, x, batch_size=4)
    exact = gradood.create("rankfeat").fit(s).score(s)
    np.testing.assert_allclose(gradood.create("rankfeat", method="power", iterations=300).fit(s).score(s), exact,
                               rtol=1e-7)
    # a single step is a different (cruder) approximation, and the score says so
    assert not np.allclose(gradood.create("rankfeat", method="power", iterations=1).fit(s).score(s), exact,
                           rtol=1e-7)


def test_rankfeat_bad_inputs():
    mlp = seeded(MLP, 1, torch.float64)
    s = probe_signals(mlp, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="no activation layer with a feature-map output.*layers="):
        gradood.create("rankfeat").fit(s)
    with pytest.raises(gradood.ModelError, match="'body' outputs .*not a feature map"):
        gradood.create("rankfeat", layers=["body"]).fit(s).score(s)
    with pytest.raises(gradood.ConfigError, match="fuse=False.*name one layer"):
        gradood.create("rankfeat", fuse=False, layers=["a", "b"])
    with pytest.raises(gradood.ConfigError, match="method"):
        gradood.create("rankfeat", method="qr")
    with pytest.raises(gradood.ConfigError, match="iterations"):
        gradood.create("rankfeat", iterations=0)
    with pytest.raises(gradood.ConfigError, match="temperature"):
        gradood.create("rankfeat", temperature=0.0)
    with pytest.raises(gradood.ConfigError, match="fuse"):
        gradood.create("rankfeat", fuse="yes")
    with pytest.raises(gradood.InputError, match="probe.signals"):
        gradood.create("rankfeat").fit(gradood.Signals.from_arrays(logits=np.zeros((3, 2))))
    model, x = _two_stage()
    with pytest.raises(gradood.InputError, match="unknown layer 'nope'"):
        gradood.create("rankfeat", layers=["nope"]).fit(probe_signals(model, x)).score(probe_signals(model, x))


# ------------------------------------------------------------------------------------------------ SCALE
def _np_scale(h, p):
    n = h.shape[1]
    k = n - int(round(n * p / 100.0))
    s1 = h.sum(axis=1, keepdims=True)
    s2 = -np.sort(-h, axis=1)[:, :k].sum(axis=1, keepdims=True)
    return h * np.exp(s1 / s2)


@pytest.mark.parametrize("p", [85.0, 60.0, 0.0])
def test_scale_on_the_last_feature_map_matches_numpy(p):
    model = seeded(BNCNN, 3, torch.float64)
    x = make_inputs(6, 2, 5, 5, seed=4, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)
    det = gradood.create("scale-fm", percentile=p).fit(s)
    assert det.layer_ == "act2"
    with torch.no_grad():
        a2 = model.act2(model.conv2(model.act1(model.bn1(model.conv1(x)))))
        scaled = torch.tensor(_np_scale(np_(a2.flatten(1)), p)).reshape(a2.shape)
        f = np_(model.fc(model.pool(scaled).flatten(1)))
    np.testing.assert_allclose(det.score(s), _lse(f), rtol=RTOL)


def test_scale_fm_on_the_penultimate_layer_is_scale():
    model = seeded(MLP, 1, torch.float64, logit_scale=2.0)
    s = probe_signals(model, make_inputs(7, 6, seed=2, dtype=torch.float64), batch_size=3)
    np.testing.assert_allclose(gradood.create("scale-fm", layer="body").fit(s).score(s),
                               gradood.create("scale").score(s), rtol=RTOL)


def test_scale_is_ash_s_without_the_pruning():
    """The paper's relation: on the k kept values SCALE and ASH-S agree; SCALE keeps the rest, rescaled."""
    a = make_inputs(5, 3, 4, 4, seed=12, dtype=torch.float64).relu()
    h, sc = np_(a.flatten(1)), np_(scale_map(a, 70.0).flatten(1))
    ash_s = np_(ash(a.flatten(1), 70.0, "s"))
    kept = ash_s != 0
    np.testing.assert_allclose(sc[kept], ash_s[kept], rtol=1e-12)
    np.testing.assert_allclose(sc, _np_scale(h, 70.0), rtol=1e-12)  # one factor per sample, nothing pruned
    assert ((sc != 0) == (h != 0)).all() and (kept.sum(axis=1) < (h != 0).sum(axis=1)).all()


def test_scale_fm_bad_inputs():
    mlp = seeded(MLP, 1, torch.float64)
    s = probe_signals(mlp, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="no activation layer with a feature-map output.*layer=.*scale"):
        gradood.create("scale-fm").fit(s)
    model = seeded(BNCNN, 3, torch.float64)
    s = probe_signals(model, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ConfigError, match="prunes all"):
        gradood.create("scale-fm", percentile=100.0).fit(s).score(s)
    for bad in (-1.0, 101.0, "85"):
        with pytest.raises(gradood.ConfigError, match="percentile"):
            gradood.create("scale-fm", percentile=bad)


# ------------------------------------------------------------------------------------------------ BATS
class TwoBNCNN(nn.Module):
    """``conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> avgpool -> fc``; bn2 has a negative gamma."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.3, 1.2)
                bn.bias.uniform_(-0.2, 0.2)
            self.bn2.weight[1] = -0.8

    def forward(self, x):
        a = self.act1(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.act2(self.bn2(self.conv2(a)))).flatten(1))


def _np_truncate(a, bn, lam):
    beta, gamma = np_(bn.bias)[None, :, None, None], np.abs(np_(bn.weight))[None, :, None, None]
    return np.clip(np_(a), beta - lam * gamma, beta + lam * gamma)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_bats_fm_truncates_the_last_batchnorm_and_runs_on(lam):
    model = seeded(TwoBNCNN, 6, torch.float64)
    x = make_inputs(8, 2, 5, 5, seed=7, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=3)
    det = gradood.create("bats-fm", lam=lam).fit(s)
    assert det.layer_ == "bn2"
    with torch.no_grad():
        z2 = model.bn2(model.conv2(model.act1(model.bn1(model.conv1(x)))))
        t = torch.tensor(_np_truncate(z2, model.bn2, lam))
        f = np_(model.fc(model.pool(model.act2(t)).flatten(1)))
    np.testing.assert_allclose(det.score(s), _lse(f), rtol=RTOL)
    # a named earlier BatchNorm
    with torch.no_grad():
        z1 = model.bn1(model.conv1(x))
        t1 = torch.tensor(_np_truncate(z1, model.bn1, lam))
        f1 = np_(model.fc(model.pool(model.act2(model.bn2(model.conv2(model.act1(t1))))).flatten(1)))
    np.testing.assert_allclose(gradood.create("bats-fm", lam=lam, layer="bn1").fit(s).score(s), _lse(f1),
                               rtol=RTOL)


class _BNHead(nn.Module):
    """``Linear -> ReLU -> BatchNorm1d -> fc``: the head's input is a BN output (the penultimate BATS setting)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.BatchNorm1d(7))
        self.fc = nn.Linear(7, 4)
        with torch.no_grad():
            self.body[2].running_mean.uniform_(0.0, 0.5)
            self.body[2].running_var.uniform_(0.5, 2.0)
            self.body[2].weight.uniform_(-1.5, 1.5)
            self.body[2].bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x))


def test_bats_fm_on_the_batchnorm_feeding_the_head_is_bats_with_bn_statistics():
    model = seeded(_BNHead, 8, torch.float64)
    s = probe_signals(model, make_inputs(12, 6, seed=9, dtype=torch.float64), batch_size=5)
    fm = gradood.create("bats-fm", lam=0.7).fit(s)
    assert fm.layer_ == "body.2"
    pen = gradood.create("bats", lam=0.7, statistics="bn").fit(s)
    np.testing.assert_allclose(fm.score(s), pen.score(s), rtol=RTOL)


def test_bats_fm_with_a_wide_band_is_the_energy():
    model = seeded(TwoBNCNN, 6, torch.float64)
    s = probe_signals(model, make_inputs(6, 2, 5, 5, seed=8, dtype=torch.float64), batch_size=4)
    np.testing.assert_allclose(gradood.create("bats-fm", lam=1e6).fit(s).score(s), gradood.create("energy").score(s),
                               rtol=RTOL)


def test_bats_fm_round_trips_and_is_not_in_all(tmp_path):
    model = seeded(TwoBNCNN, 6, torch.float64)
    x = make_inputs(6, 2, 5, 5, seed=8, dtype=torch.float64)
    det = gradood.create("bats-fm").fit(probe_signals(model, x))
    s = det.score(probe_signals(model, x))
    loaded = gradood.load_detector(det.save(tmp_path / "b"))
    assert loaded.get_params() == det.get_params() and loaded.layer_ == "bn2"
    np.testing.assert_array_equal(loaded.score(probe_signals(model, x)), s)
    from gradood.bench.spec import all_detectors

    assert "bats-fm" not in {d.name for d in all_detectors()}


def test_bats_fm_bad_inputs():
    cnn = seeded(SmallCNN, 1, torch.float64)
    s = probe_signals(cnn, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="no affine BatchNorm layer.*statistics='features'"):
        gradood.create("bats-fm").fit(s)
    with pytest.raises(gradood.ModelError, match="'conv1' is a Conv2d"):
        gradood.create("bats-fm", layer="conv1").fit(s)
    with pytest.raises(gradood.ConfigError, match="unknown layer 'nope'"):
        gradood.create("bats-fm", layer="nope").fit(s)
    plain = seeded(TwoBNCNN, 6, torch.float64)
    plain.bn1 = nn.BatchNorm2d(3, affine=False).double().eval()
    s = probe_signals(plain, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="without affine parameters"):
        gradood.create("bats-fm", layer="bn1").fit(s)
    assert gradood.create("bats-fm").fit(s).layer_ == "bn2"  # the last *affine* BatchNorm
    for bad in (-0.1, "1"):
        with pytest.raises(gradood.ConfigError, match="lam"):
            gradood.create("bats-fm", lam=bad)


# ------------------------------------------------------------------------------------------------ DICE
def test_dice_has_no_feature_map_form_and_says_why():
    assert "dice-fm" not in gradood.available()
    assert "no feature-map form" in type(gradood.create("dice")).__doc__


# ------------------------------------------------------------------------------------------------ GAIA-Z
def _loop_gaia_z_bncnn(model, x):
    """Per sample: z = bn1's output as a leaf, the rest of BNCNN by hand; the gradient of the largest logit
    w.r.t. z, its per-channel proportion of nonzeros rho, and -mean_c rho_c^2."""
    out = []
    for i in range(len(x)):
        z = model.bn1(model.conv1(x[i: i + 1])).detach().requires_grad_(True)
        f = model.fc(model.pool(torch.relu(model.conv2(torch.relu(z)))).flatten(1))[0]
        (g,) = torch.autograd.grad(f.max(), z)
        rho = np_((g[0] != 0).double().flatten(1).mean(dim=1))
        out.append(-np.mean(rho ** 2))
    return np.array(out)


def test_gaia_z_matches_a_per_sample_autograd_loop_on_the_batchnorm_outputs():
    model = seeded(BNCNN, 3, torch.float64)
    x = make_inputs(9, 2, 5, 5, seed=4, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)
    det = gradood.create("gaia-z").fit(s)
    assert det.layers_ == ("bn1",) and det.inputs_of_ is False
    ref = _loop_gaia_z_bncnn(model, x)
    np.testing.assert_array_equal(det.score(s), ref)  # proportions of counts: exact
    assert np.ptp(ref) > 0
    one = probe_signals(model, x, batch_size=1)  # samples do not interact in the batched backward
    np.testing.assert_array_equal(gradood.create("gaia-z", layers=["bn1"]).fit(one).score(one), ref)


def test_gaia_z_differentiates_the_largest_logit():
    """The official output component is the largest logit itself (cal_zero: ``y.max(dim=1)``). Its zero pattern
    matches any other output's where ReLUs and pools gate the gradient; it differs where the predicted class's
    head row has a zero: channel 0 of conv2's output then gets no gradient from the largest logit at all,
    but does from the predicted log-probability."""
    model = seeded(BNCNN, 3, torch.float64)
    with torch.no_grad():
        model.fc.weight[0, 0] = 0.0
        model.fc.bias[0] = 50.0  # every sample is predicted as class 0
    x = make_inputs(6, 2, 5, 5, seed=16, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)

    def rho2(output):
        out = []
        for i in range(len(x)):
            z = model.conv2(model.act1(model.bn1(model.conv1(x[i: i + 1])))).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(output(model.fc(model.pool(torch.relu(z)).flatten(1))[0]), z)
            out.append(-np.mean(np_((g[0] != 0).double().flatten(1).mean(dim=1)) ** 2))
        return np.array(out)

    ref = rho2(lambda f: f.max())
    np.testing.assert_allclose(gradood.create("gaia-z", layers=["conv2"]).fit(s).score(s), ref, rtol=1e-12)
    assert not np.allclose(ref, rho2(lambda f: torch.log_softmax(f, 0).max()))


class InplaceTwoBN(TwoBNCNN):
    """TwoBNCNN with in-place ReLUs (torchvision/ResNet style): the gradient read must be the BN output's, not
    the ReLU output's that the in-place op writes into the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)


def test_gaia_z_reads_every_batchnorm_also_before_in_place_relus():
    model = seeded(InplaceTwoBN, 6, torch.float64)
    x = make_inputs(8, 2, 5, 5, seed=10, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=3)
    det = gradood.create("gaia-z").fit(s)
    assert det.layers_ == ("bn1", "bn2")
    out = []  # the reference: out-of-place ReLUs, z1 a leaf and z2's gradient retained
    for i in range(len(x)):
        xi = x[i: i + 1]
        z1 = model.bn1(model.conv1(xi)).detach().requires_grad_(True)
        z2 = model.bn2(model.conv2(torch.relu(z1)))
        z2.retain_grad()
        f = model.fc(model.pool(torch.relu(z2)).flatten(1))[0]
        f.max().backward()
        rho = np.concatenate([np_((g[0] != 0).double().flatten(1).mean(dim=1)) for g in (z1.grad, z2.grad)])
        out.append(-np.mean(rho ** 2))
    np.testing.assert_allclose(det.score(s), np.array(out), rtol=1e-12)  # one count off would be ~1e-2


class ConvReLUNet(nn.Module):
    """No BatchNorm: ``conv1 -> relu1 -> maxpool -> conv2 -> relu2 -> avgpool -> fc`` (the MNIST CNNs' shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1, self.mp = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.mp(self.relu1(self.conv1(x)))))).flatten(1))


def test_gaia_z_without_batchnorm_reads_the_pre_activations():
    model = seeded(ConvReLUNet, 12, torch.float64)
    x = make_inputs(8, 2, 6, 6, seed=13, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=5)
    det = gradood.create("gaia-z").fit(s)
    assert det.layers_ == ("relu1", "relu2") and det.inputs_of_ is True
    out = []
    for i in range(len(x)):
        z1 = model.conv1(x[i: i + 1]).detach().requires_grad_(True)
        z2 = model.conv2(model.mp(torch.relu(z1)))
        z2.retain_grad()
        model.fc(model.pool(torch.relu(z2)).flatten(1))[0].max().backward()
        rho = np.concatenate([np_((g[0] != 0).double().flatten(1).mean(dim=1)) for g in (z1.grad, z2.grad)])
        out.append(-np.mean(rho ** 2))
    np.testing.assert_allclose(det.score(s), np.array(out), rtol=1e-12)  # one count off would be ~1e-2


def test_gaia_z_zeros_come_at_least_from_the_inactive_units():
    """The paper's mechanism: a ReLU that is off zeroes the attribution gradient of its input, so each channel's
    nonzero proportion is at most its proportion of active units, and -score <= mean_c active_c^2."""
    model = seeded(BNCNN, 14, torch.float64)
    x = make_inputs(10, 2, 5, 5, seed=15, dtype=torch.float64)
    s = probe_signals(model, x, batch_size=4)
    with torch.no_grad():
        active = np_((model.bn1(model.conv1(x)) > 0).double().flatten(2).mean(dim=2))
    score = gradood.create("gaia-z").fit(s).score(s)
    assert np.all(-score <= (active ** 2).mean(axis=1) + 1e-15)
    assert np.all(score <= 0) and np.all(score >= -1)


def test_gaia_z_bad_inputs():
    mlp = seeded(MLP, 1, torch.float64)
    s = probe_signals(mlp, make_inputs(4, 6, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ModelError, match="no BatchNorm layer and no activation with a feature-map input.*"
                                                 "layers="):
        gradood.create("gaia-z").fit(s)
    model = seeded(BNCNN, 3, torch.float64)
    s = probe_signals(model, make_inputs(4, 2, 5, 5, dtype=torch.float64), batch_size=4)
    with pytest.raises(gradood.ConfigError, match=r"unknown layers \['nope'\]"):
        gradood.create("gaia-z", layers=["nope"]).fit(s).score(s)
    with pytest.raises(gradood.ConfigError, match="layers"):
        gradood.create("gaia-z", layers="bn1")
    with pytest.raises(gradood.InputError, match="probe.signals"):
        gradood.create("gaia-z").fit(gradood.Signals.from_arrays(logits=np.zeros((3, 2))))


@pytest.mark.parametrize("name", ["rankfeat", "scale-fm", "gaia-z"])
def test_new_detectors_fit_nothing_from_the_data(name):
    """The layer choice needs one batch of the probe, not a pass over the fit data."""
    assert gradood.create(name).fit_requests() == []


@pytest.mark.parametrize("name,runs", [("rankfeat", 2), ("scale-fm", 1), ("bats-fm", 1)])
def test_feature_map_signals_cost_their_runs_per_batch_once_and_are_cached(monkeypatch, name, runs):
    """Each is one request of the shared pass: per batch the shared forward plus one modified forward per
    layer (RankFeat's default fuses two), and a second score reads the cached signal."""
    model = seeded(TwoBNCNN, 6, torch.float64)
    fit = probe_signals(model, make_inputs(4, 2, 6, 6, seed=1, dtype=torch.float64), batch_size=4)
    det = gradood.create(name, **({"layers": ["act1", "act2"]} if name == "rankfeat" else {})).fit(fit)
    test = probe_signals(model, make_inputs(10, 2, 6, 6, seed=2, dtype=torch.float64), batch_size=4)
    calls = count_forward_passes(monkeypatch)
    first = det.score(test)
    assert calls["n"] == 3 * (1 + runs)  # 3 batches
    np.testing.assert_array_equal(det.score(test), first)
    assert calls["n"] == 3 * (1 + runs)


@pytest.mark.parametrize("name", ["ash-fm", "rankfeat", "scale-fm", "bats-fm", "gaia-a", "gaia-z"])
def test_layer_choice_works_when_every_signal_comes_from_the_disk_cache(name, tmp_path):
    """A detector that picks its layer on the probe's first batch fits and scores the same when its signals were
    all cached by an earlier process and no batch has run in this one (the bench's rerun): it runs one batch
    itself instead of failing with "run at least one batch through the probe"."""
    model = seeded(BNCNN, 61, torch.float64)
    x = make_inputs(12, 2, 6, 6, seed=62, dtype=torch.float64)

    def signals():
        return gradood.Probe(model).signals(x, batch_size=4, progress=False, cache_dir=tmp_path)

    first = gradood.create(name).fit(signals())
    expected = first.score(signals())
    cached = signals()  # a fresh probe: every signal it needs is on disk, nothing has run
    assert cached.probe.input_shape is None
    det = gradood.create(name).fit(cached)
    np.testing.assert_array_equal(det.score(cached), expected)
    assert det.get_params() == first.get_params() and getattr(det, "layer_", None) == getattr(first, "layer_", None)
