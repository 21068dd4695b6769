"""The batched per-sample gradient engine equals plain torch.func per-sample gradients.

Every quantity (squared norms, projections, moments, weighted sums) is compared with
:mod:`gradood.grads.reference` in float64 (relative error < 1e-6) on small models covering every natively
supported layer, each route a layer can take (forced with ``_layers.FORCE_ROUTE``), several losses, batch
size 1 and batches whose samples differ in scale by 1e6.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.errors import ConfigError, ModelError
from gradood.grads import (FallbackWarning, GradBasis, grad_moments, per_sample_grad_projections,
                           per_sample_grad_sqnorms, weighted_grad_sums)
from gradood.grads import _layers
from gradood.grads import reference as ref

DT = torch.float64


# ---------------------------------------------------------------------------------------------- losses
def pred_ce(T: float = 2.0):
    """Predicted-label cross-entropy at temperature T (GRODIN)."""
    return lambda out: F.cross_entropy(out / T, out.argmax(1), reduction="none")


def energy(out: torch.Tensor) -> torch.Tensor:
    """logsumexp of the logits (Wu et al.'s gradient target)."""
    return torch.logsumexp(out, 1)


def kl_uniform(out: torch.Tensor) -> torch.Tensor:
    """KL(u || softmax(z)) (GradNorm)."""
    logp = F.log_softmax(out, 1)
    return -logp.mean(1) - torch.log(torch.tensor(float(out.shape[1]), dtype=out.dtype))


LOSSES = {"pred_ce_T2": pred_ce(2.0), "energy": energy, "kl_uniform": kl_uniform}


# ---------------------------------------------------------------------------------------------- models
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that no term is accidentally 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                              nn.modules.instancenorm._InstanceNorm)) or type(m).__name__ == "RMSNorm":
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=m.bias.dtype) - 0.5)
                if getattr(m, "running_mean", None) is not None:
                    dt = m.running_mean.dtype
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g, dtype=dt) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=dt) + 0.5)
    return model.eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ln(self.fc1(x)))
        h = F.relu(self.bn(self.fc2(h)))
        return self.head(h)


class CNN(nn.Module):
    """Conv2d with padding / stride / groups / dilation / 'same'+reflect padding, BatchNorm2d, GroupNorm,
    InstanceNorm2d (affine), ReLU(inplace=True) after taps, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.gn = nn.GroupNorm(4, 8)
        self.c3 = nn.Conv2d(8, 6, 2, padding="same", padding_mode="reflect", dilation=2)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.c4 = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2)
        self.head = nn.Linear(10 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.bn1(self.c1(x)))
        x = F.relu(self.gn(self.c2(x)))
        x = torch.tanh(self.inorm(self.c3(x)))
        x = F.relu(self.c4(x))
        return self.head(x.flatten(1))


class SeqModel(nn.Module):
    """Embedding (padding_idx) -> Linear on B x T x D (sequence form) -> RMSNorm/LayerNorm -> Conv1d -> head.
    The same Linear is called twice (its gradient is the sum over both calls)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 6, padding_idx=0)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.RMSNorm(6) if hasattr(nn, "RMSNorm") else nn.LayerNorm(6)
        self.ln = nn.LayerNorm([5, 6])
        self.conv = nn.Conv1d(6, 4, 3, padding=3, dilation=3, stride=2)  # phases with shift steps of 3
        self.head = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)                        # B x 5 x 6
        h = torch.tanh(self.proj(h))
        h = self.norm(self.proj(h)) + h          # second call of proj
        h = self.ln(h)
        h = F.relu(self.conv(h.transpose(1, 2)))  # B x 4 x 3
        return self.head(h.mean(2))


class Conv3dModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1)
        self.bn = nn.BatchNorm3d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.c(x))).mean((2, 3, 4)))


class MobileNetLike(nn.Module):
    """Depthwise convs (channel multiplier 2 with bias, stride 2, kernel 5) and EfficientNet-Lite0's own
    TensorFlow-"SAME" conv (padding in a forward pre-hook, asymmetric at stride 2), ReLU6, 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        from gradood.models.efficientnet_lite import SameConv2d

        self.stem = SameConv2d(3, 8, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.dw2 = nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
        self.dw3 = SameConv2d(16, 16, 3, stride=2, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.dw2(F.relu6(self.dw1(x))))
        x = F.relu6(self.pw(F.relu6(self.bn1(self.dw3(x)))))
        return self.head(x.mean((2, 3)))


def make(name: str, B: int, dtype: torch.dtype = DT, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        model, x = MLP(), torch.randn(B, 12, generator=g)
    elif name == "cnn":
        model, x = CNN(), torch.randn(B, 3, 8, 8, generator=g)
    elif name == "seq":
        model, x = SeqModel(), torch.randint(0, 11, (B, 5), generator=g)
        x[0, :2] = 0  # padding positions
        x[-1, 3] = x[-1, 1]  # a row looked up twice by one sample
    elif name == "mobile":
        model, x = MobileNetLike(), torch.randn(B, 3, 15, 15, generator=g)
    elif name == "conv3d":
        model, x = Conv3dModel(), torch.randn(B, 2, 3, 4, 3, generator=g)
    else:
        raise ValueError(name)
    model = randomize_norms(model.to(dtype), seed)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, x


def wild(x: torch.Tensor) -> torch.Tensor:
    """Samples whose scales differ by 1e6."""
    x = x.clone()
    if x.is_floating_point() and x.shape[0] >= 3:
        x[0] *= 1e-3
        x[1] *= 1e3
    return x


# ---------------------------------------------------------------------------------------------- helpers
def rel_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-sample relative error (each row relative to the reference row's largest entry)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    scale = b.abs().amax(1).clamp_min(1e-300)
    return float(((a - b).abs().amax(1) / scale).max())


def rel_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter relative error. A parameter whose true gradient is ~0 (a conv bias before an
    InstanceNorm) is measured against 1e-9 of the largest entry of all parameters instead of its own roundoff."""
    assert set(a) == set(b)
    floor = 1e-9 * max(float(v.abs().max()) for v in b.values())
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), floor) for n in b)


@pytest.fixture(params=[None, "materialize", "factored"])
def route(request, monkeypatch):
    """Each layer's automatic choice, and each of its two routes forced everywhere."""
    monkeypatch.setattr(_layers, "FORCE_ROUTE", request.param)
    return request.param


MODELS = ["mlp", "cnn", "seq", "conv3d", "mobile"]


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_sqnorms_equal_reference(name, loss, route):
    model, x = make(name, 5)
    x = wild(x)
    ours = per_sample_grad_sqnorms(model, x, LOSSES[loss])
    expect = ref.sqnorms(model, x, LOSSES[loss])
    assert ours.shape == (5,) and ours.dtype == DT
    assert rel_rows(ours[:, None], expect[:, None]) < 1e-6
    assert bool((expect > 0).all())  # the comparison is not between zeros


@pytest.mark.parametrize("name", MODELS)
def test_projections_equal_reference(name, route):
    model, x = make(name, 4)
    x = wild(x)
    basis = GradBasis.random(model, 7, generator=torch.Generator().manual_seed(3))
    ours = per_sample_grad_projections(model, x, energy, basis)
    expect = ref.projections(model, x, energy, basis)
    assert ours.shape == (4, 7)
    assert rel_rows(ours, expect) < 1e-6


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
def test_projections_with_center_and_scale(name):
    model, x = make(name, 4)
    g = torch.Generator().manual_seed(5)
    named = dict(model.named_parameters())
    mu = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in named.items()}
    i2 = {n: torch.rand(p.shape, generator=g, dtype=DT) + 0.1 for n, p in named.items()}
    plain = GradBasis.random(model, 5, generator=g)
    expect = ref.projections(model, x, pred_ce(2.0), plain, center=mu, scale=i2)
    via_args = per_sample_grad_projections(model, x, pred_ce(2.0), plain, center=mu, scale=i2)
    in_basis = GradBasis(plain.directions, center=mu, scale=i2)
    via_basis = per_sample_grad_projections(model, x, pred_ce(2.0), in_basis)
    assert rel_rows(via_args, expect) < 1e-6
    assert rel_rows(via_basis, expect) < 1e-6
    # a second call reuses the folded basis and must give the same numbers
    assert torch.equal(per_sample_grad_projections(model, x, pred_ce(2.0), in_basis), via_basis)


@pytest.mark.parametrize("name", MODELS)
def test_moments_equal_reference(name, route):
    model, x = make(name, 5)
    x = wild(x)
    mom = grad_moments(model, x, kl_uniform)
    s, ss = ref.moments(model, x, kl_uniform)
    assert mom.count == 5 and mom.sum[next(iter(s))].dtype == torch.float64
    assert rel_dict(mom.sum, s) < 1e-6
    assert rel_dict(mom.sumsq, ss) < 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_weighted_sums_equal_reference(name, route):
    model, x = make(name, 5)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=DT)
    ours = weighted_grad_sums(model, x, energy, w)
    expect = ref.weighted_sums(model, x, energy, w)
    assert all(ours[n].shape == expect[n].shape for n in expect)
    assert rel_dict(ours, expect) < 1e-6


def test_per_class_sums_with_one_hot_weights():
    model, x = make("cnn", 6)
    y = torch.tensor([0, 2, 1, 2, 0, 2])
    sums = weighted_grad_sums(model, x, energy, F.one_hot(y, 3).to(DT))
    grads = ref.per_sample_grads(model, x, energy)
    for n, g in grads.items():
        for c in range(3):
            torch.testing.assert_close(sums[n][..., c], g[y == c].sum(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_batch_size_one(name):
    model, x = make(name, 1)
    assert rel_rows(per_sample_grad_sqnorms(model, x, energy)[:, None], ref.sqnorms(model, x, energy)[:, None]) < 1e-6
    basis = GradBasis.random(model, 3, generator=torch.Generator().manual_seed(0))
    ours = per_sample_grad_projections(model, x, energy, basis)
    assert rel_rows(ours, ref.projections(model, x, energy, basis)) < 1e-6


def test_a_sample_does_not_depend_on_the_rest_of_the_batch():
    model, x = make("cnn", 6)
    full = per_sample_grad_sqnorms(model, x, pred_ce(1.0))
    alone = torch.stack([per_sample_grad_sqnorms(model, x[i:i + 1], pred_ce(1.0))[0] for i in range(6)])
    torch.testing.assert_close(full, alone, rtol=1e-10, atol=0)


def test_small_chunks_give_the_same_result(monkeypatch):
    """Chunking over samples (to bound memory) must not change anything."""
    model, x = make("cnn", 5)
    whole = per_sample_grad_sqnorms(model, x, energy)
    basis = GradBasis.random(model, 4, generator=torch.Generator().manual_seed(1))
    whole_p = per_sample_grad_projections(model, x, energy, basis)
    monkeypatch.setattr(_layers, "CHUNK_ELEMENTS", 64)
    torch.testing.assert_close(per_sample_grad_sqnorms(model, x, energy), whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_sample_grad_projections(model, x, energy, basis), whole_p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float32_close_to_reference(name):
    model, x = make(name, 6, dtype=torch.float32)
    ours = per_sample_grad_sqnorms(model, x, pred_ce(2.0))
    expect = ref.sqnorms(model, x, pred_ce(2.0))
    assert ours.dtype == torch.float32
    assert rel_rows(ours[:, None], expect[:, None]) < 1e-4
    basis = GradBasis.random(model, 8, generator=torch.Generator().manual_seed(2))
    ours = per_sample_grad_projections(model, x, energy, basis)
    assert rel_rows(ours, ref.projections(model, x, energy, basis)) < 1e-4


def test_cifar_resnet18_architecture():
    from gradood.models.cifar_resnet import resnet18_cifar

    model = resnet18_cifar(num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 512)
    assert model(x).shape == (2, 10) and model.fc.in_features == 512
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_cifar_resnet18_exact_in_float64():
    """The real architecture (stride-2 blocks, 1x1 shortcuts, in-place ReLUs): every conv route it takes."""
    from gradood.models.cifar_resnet import resnet18_cifar

    torch.manual_seed(0)
    model = randomize_norms(resnet18_cifar(num_classes=4).to(DT))
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    ours, out = per_sample_grad_sqnorms(model, x, pred_ce(1.0), return_output=True)
    expect = ref.sqnorms(model, x, pred_ce(1.0))
    assert rel_rows(ours[:, None], expect[:, None]) < 1e-6
    torch.testing.assert_close(out, model(x))


# ---------------------------------------------------------------------------------------------- params
def test_params_last_k_layers_and_names():
    model, x = make("cnn", 4)
    last2 = per_sample_grad_sqnorms(model, x, energy, params=2)
    names = ["c4.weight", "c4.bias", "head.weight", "head.bias"]
    torch.testing.assert_close(last2, ref.sqnorms(model, x, energy, params=names), rtol=1e-9, atol=0)
    torch.testing.assert_close(per_sample_grad_sqnorms(model, x, energy, params=names), last2, rtol=1e-12, atol=0)
    only_bn = per_sample_grad_sqnorms(model, x, energy, params=["bn1.weight"])
    torch.testing.assert_close(only_bn, ref.sqnorms(model, x, energy, params=["bn1.weight"]), rtol=1e-9, atol=0)
    # the selection is a subset: strictly smaller than all parameters
    assert bool((last2 < per_sample_grad_sqnorms(model, x, energy)).all())


def test_frozen_parameters_are_left_out_of_all():
    model, x = make("mlp", 3)
    model.fc1.weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(per_sample_grad_sqnorms(model, x, energy),
                               ref.sqnorms(model, x, energy, params=names), rtol=1e-9, atol=0)


def test_return_output_is_the_model_output():
    model, x = make("mlp", 4)
    sq, out = per_sample_grad_sqnorms(model, x, energy, return_output=True)
    torch.testing.assert_close(out, model(x))
    assert not out.requires_grad


def test_no_weight_grad_is_accumulated_and_flags_are_kept():
    model, x = make("cnn", 3)
    per_sample_grad_sqnorms(model, x, energy)
    grad_moments(model, x, energy)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------- fallback
class WithPReLU(nn.Module):
    """PReLU (no fast rule) and a bare parameter of a custom module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = nn.PReLU(6)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)) * self.gain)


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(idx).mean(1))))


class SeqFirst(nn.Module):
    """A Linear that sees (T, B, D): the batch is not in dimension 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x T x 3
        h = torch.tanh(self.inner(x.transpose(0, 1))).transpose(0, 1)
        return self.head(h.mean(1))


def test_unsupported_layer_falls_back_warns_and_is_exact():
    torch.manual_seed(0)
    model = WithPReLU().to(DT).eval()
    x = wild(torch.randn(4, 5, dtype=DT))
    with pytest.warns(FallbackWarning, match=r"act.*PReLU"):
        ours = per_sample_grad_sqnorms(model, x, pred_ce(2.0))
    assert rel_rows(ours[:, None], ref.sqnorms(model, x, pred_ce(2.0))[:, None]) < 1e-6
    basis = GradBasis.random(model, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(FallbackWarning, match="gain"):
        proj = per_sample_grad_projections(model, x, energy, basis)
    assert rel_rows(proj, ref.projections(model, x, energy, basis)) < 1e-6
    with pytest.warns(FallbackWarning):
        mom = grad_moments(model, x, energy)
    s, ss = ref.moments(model, x, energy)
    assert rel_dict(mom.sum, s) < 1e-6 and rel_dict(mom.sumsq, ss) < 1e-6


def test_tied_weights_are_exact_without_fallback():
    """A tied parameter's per-sample gradient is the sum over its layers (here Embedding + Linear)."""
    torch.manual_seed(0)
    model = Tied().to(DT).eval()
    x = torch.randint(0, 7, (4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        ours = per_sample_grad_sqnorms(model, x, energy)
        basis = GradBasis.random(model, 3, generator=torch.Generator().manual_seed(1))
        proj = per_sample_grad_projections(model, x, energy, basis)
        mom = grad_moments(model, x, energy)
        w = torch.randn(4, 2, dtype=DT)
        ws = weighted_grad_sums(model, x, energy, w)
        # the alias name selects the same (shared) parameter
        alias = per_sample_grad_sqnorms(model, x, energy, params=["out.weight"])
    assert rel_rows(ours[:, None], ref.sqnorms(model, x, energy)[:, None]) < 1e-9
    assert rel_rows(proj, ref.projections(model, x, energy, basis)) < 1e-9
    s, ss = ref.moments(model, x, energy)
    assert rel_dict(mom.sum, s) < 1e-9 and rel_dict(mom.sumsq, ss) < 1e-9
    assert rel_dict(ws, ref.weighted_sums(model, x, energy, w)) < 1e-9
    torch.testing.assert_close(alias, ref.sqnorms(model, x, energy, params=["emb.weight"]), rtol=1e-9, atol=0)


def test_layer_without_batch_first_falls_back_and_is_exact():
    torch.manual_seed(0)
    model = SeqFirst().to(DT).eval()
    x = torch.randn(5, 4, 3, dtype=DT)  # B = 5, T = 4: inner sees 4 x 5 x 3
    with pytest.warns(FallbackWarning, match="inner"):
        ours = per_sample_grad_sqnorms(model, x, energy)
    assert rel_rows(ours[:, None], ref.sqnorms(model, x, energy)[:, None]) < 1e-6


# ---------------------------------------------------------------------------------------------- bad input
def test_train_mode_is_refused():
    model, x = make("cnn", 3)
    model.train()
    with pytest.raises(ModelError, match=r"model.eval\(\)"):
        per_sample_grad_sqnorms(model, x, energy)
    model.eval()
    model.bn1.train()  # a single module in training mode is enough to couple samples
    with pytest.raises(ModelError, match="BatchNorm"):
        grad_moments(model, x, energy)


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    model[1].train()
    with pytest.raises(ModelError, match="Dropout|random"):
        per_sample_grad_sqnorms(model, torch.randn(2, 3), energy)


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    with pytest.raises(ModelError, match="running statistics"):
        per_sample_grad_sqnorms(model, torch.randn(3, 3), energy)


def test_k_larger_than_parameter_count_is_refused():
    model, _ = make("mlp", 2)
    P = sum(p.numel() for p in model.head.parameters())
    with pytest.raises(ConfigError, match=r"K = .* at most P"):
        GradBasis.random(model, P + 1, params=["head.weight", "head.bias"])
    with pytest.raises(ConfigError, match="at most P"):
        GradBasis({"head.bias": torch.zeros(5, 6, dtype=DT)})


def test_bad_loss_and_params_are_refused():
    model, x = make("mlp", 3)
    with pytest.raises(ConfigError, match="one loss per sample"):
        per_sample_grad_sqnorms(model, x, lambda out: out.sum())
    with pytest.raises(ConfigError, match="unknown parameter"):
        per_sample_grad_sqnorms(model, x, energy, params=["nope.weight"])
    with pytest.raises(ConfigError, match="k must be in"):
        per_sample_grad_sqnorms(model, x, energy, params=99)
    with pytest.raises(ConfigError):
        per_sample_grad_sqnorms(model, x, energy, params="some")


def test_in_place_change_of_a_layer_input_is_detected():
    class Clobber(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)  # changes b's input after b used it
            return out

    model = Clobber().to(DT).eval()
    with pytest.raises(ModelError, match="modified in place"):
        per_sample_grad_sqnorms(model, torch.randn(2, 3, dtype=DT), energy, params=["b.weight"])
