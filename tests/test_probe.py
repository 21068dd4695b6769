"""Probe: head discovery, what it captures (logits, features, taps), eval mode / no_grad, data formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gradood
from conftest import MLP, ConvHeadNet, SeqHeadNet, SmallCNN, make_inputs, make_labels, seeded
from gradood.signals import FEATURES, LOGITS


# ----------------------------------------------------------------------------------------- models
class Reordered(nn.Module):
    """Linear layers defined in another order than they are called; one of them is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 3)   # defined first, reached last: the head
        self.shared = nn.Linear(8, 8)       # called twice
        self.stem = nn.Linear(6, 8)         # defined last, reached first

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.classifier(h)


class TiedHead(nn.Module):
    """The same square Linear is used as a hidden layer and, last, as the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 5)
        self.square = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.relu(self.square(torch.relu(self.stem(x))))
        return self.square(h)

    def features(self, x):
        return torch.relu(self.square(torch.relu(self.stem(x))))


class BNNet(nn.Module):
    """MLP with BatchNorm and Dropout: outputs differ between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(8, 3)
        self.seen_training: list[bool] = []
        self.seen_grad_enabled: list[bool] = []
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.seen_training.append(self.training)
        self.seen_grad_enabled.append(torch.is_grad_enabled())
        self.batch_sizes.append(x.shape[0])
        return self.fc(self.body(x))


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def _signals(probe, data, **kw):
    kw.setdefault("progress", False)
    return probe.signals(data, **kw)


# ----------------------------------------------------------------------------------------- head discovery
@pytest.mark.parametrize("kind,expected", [
    ("mlp", "fc"), ("cnn", "fc"), ("seqhead", "head.0"), ("reordered", "classifier"), ("tied", "square"),
])
def test_head_is_the_last_linear_reached(kind, expected):
    model, x = {
        "mlp": (seeded(MLP, 0), make_inputs(7, 6)),
        "cnn": (seeded(SmallCNN, 0), make_inputs(7, 2, 5, 5)),
        "seqhead": (seeded(SeqHeadNet, 0), make_inputs(7, 6)),
        "reordered": (seeded(Reordered, 0), make_inputs(7, 6)),
        "tied": (seeded(TiedHead, 0), make_inputs(7, 6)),
    }[kind]
    probe = gradood.Probe(model)
    assert probe.head_name is None  # found lazily, on the first batch
    s = _signals(probe, x, batch_size=3)
    torch.testing.assert_close(s.logits, model(x).detach(), rtol=1e-6, atol=1e-6)
    assert probe.head_name == expected
    assert probe.head is dict(model.named_modules())[expected]


def test_reused_head_features_are_the_input_of_its_last_call():
    model, x = seeded(TiedHead, 1), make_inputs(9, 6, seed=1)
    s = _signals(gradood.Probe(model), x, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(s.features, model.features(x))
        torch.testing.assert_close(s.logits, model(x))


@pytest.mark.parametrize("kind,head,resolved", [
    ("mlp", "fc", "fc"), ("seqhead", "head", "head.0"), ("seqhead", "head.0", "head.0"),
])
def test_explicit_head_name(kind, head, resolved):
    model = seeded(MLP, 0) if kind == "mlp" else seeded(SeqHeadNet, 0)
    x = make_inputs(6, 6, seed=3)
    probe = gradood.Probe(model, head=head)
    assert probe.head_name == resolved  # known before any batch
    s = _signals(probe, x)
    with torch.no_grad():
        torch.testing.assert_close(s.features, model.features(x))
        torch.testing.assert_close(s.logits, model(x))


def test_explicit_head_can_be_an_inner_linear():
    """Naming a layer that is not the last one reached is honoured (features = that layer's input)."""
    model, x = seeded(MLP, 0), make_inputs(5, 6, seed=4)
    probe = gradood.Probe(model, head="body.0")
    s = _signals(probe, x)
    with pytest.warns(UserWarning, match="differs from the output of its head"):
        s.logits
    torch.testing.assert_close(s.features, x)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model.body[0](x))


def test_conv1x1_head_on_pooled_maps():
    model, x = seeded(ConvHeadNet, 0, logit_scale=2.0), make_inputs(7, 2, 5, 5, seed=5)
    probe = gradood.Probe(model, head="cls")
    s = _signals(probe, x, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model(x))
        torch.testing.assert_close(s.features, model.features(x))
    assert s.logits.shape == (7, 4) and s.features.shape == (7, 6)
    # the head's weight as C x D reproduces the logits from the features
    torch.testing.assert_close(s.features @ probe.weight.T + probe.bias, s.logits, rtol=1e-5, atol=1e-6)
    w, b = s.head_params()
    assert w.shape == (4, 6) and b.shape == (4,)


def test_conv_head_on_unpooled_maps_is_refused():
    class Unpooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    probe = gradood.Probe(seeded(Unpooled, 0), head="conv")
    with pytest.raises(gradood.ModelError, match=r"1x1 maps"):
        _signals(probe, make_inputs(4, 2, 5, 5)).logits


def test_model_without_linear_tells_how_to_name_the_head():
    probe = gradood.Probe(seeded(NoLinear, 0))
    with pytest.raises(gradood.ModelError) as e:
        _signals(probe, make_inputs(4, 2, 5, 5)).logits
    msg = str(e.value)
    assert "no nn.Linear" in msg
    assert "head=" in msg and "named_modules" in msg


def test_bad_head_names_are_explained():
    model = seeded(SmallCNN, 0)
    with pytest.raises(gradood.ModelError, match=r"no module named 'nope'.*'fc'.*head="):
        gradood.Probe(model, head="nope")
    with pytest.raises(gradood.ModelError, match=r"1x1"):
        gradood.Probe(model, head="conv1")  # a 3x3 conv
    with pytest.raises(gradood.ModelError, match=r"AdaptiveAvgPool2d.*nn.Linear"):
        gradood.Probe(model, head="pool")
    with pytest.raises(gradood.ModelError, match=r"Sequential without an nn.Linear"):
        gradood.Probe(nn.Sequential(nn.Sequential(nn.ReLU()), nn.Linear(3, 2)), head="0")
    with pytest.raises(gradood.ModelError, match=r"nn.Module"):
        gradood.Probe(lambda x: x)


def test_head_is_unknown_until_a_batch_ran():
    probe = gradood.Probe(seeded(MLP, 0))
    with pytest.raises(gradood.ModelError, match="head="):
        probe.head


# ----------------------------------------------------------------------------------------- what is captured
def test_logits_equal_model_output_and_features_are_head_input(cnn):
    x = make_inputs(11, 2, 5, 5, seed=6)
    s = _signals(gradood.Probe(cnn), x, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, cnn(x))
        torch.testing.assert_close(s.features, cnn.features(x))
    assert s.logits.shape == (11, 4) and s.features.shape == (11, 6)
    assert not s.logits.requires_grad and s.logits.grad_fn is None
    assert not s.features.requires_grad and s.features.grad_fn is None


def test_model_output_different_from_head_output_warns():
    class Scaled(MLP):
        def forward(self, x):
            return 2.0 * super().forward(x)

    with pytest.warns(UserWarning, match="head=<its name>"):
        _signals(gradood.Probe(seeded(Scaled, 0)), make_inputs(4, 6)).logits


def test_taps_mean_and_flatten(cnn):
    x = make_inputs(7, 2, 5, 5, seed=7)
    s = _signals(gradood.Probe(cnn), x, batch_size=3)
    mean, flat, pooled = gradood.Tap("conv1", "mean"), gradood.Tap("conv2", "flatten"), gradood.Tap("pool")
    s.require([LOGITS, FEATURES, mean, flat, pooled])
    with torch.no_grad():
        a1 = cnn.conv1(x)
        a2 = cnn.conv2(torch.relu(a1))
    torch.testing.assert_close(s.get(mean), a1.mean(dim=(2, 3)))
    torch.testing.assert_close(s.get(flat), a2.reshape(7, -1))
    assert s.get(flat).shape == (7, 6 * 5 * 5)
    torch.testing.assert_close(s.get(pooled), s.features)  # 1x1 pooled maps: mean = the features
    assert gradood.Tap("conv1") == gradood.Tap("conv1", "mean")  # equal parameters, equal request
    assert gradood.Tap("conv1").key != gradood.Tap("conv1", "flatten").key


def test_tap_of_a_2d_layer_is_its_output(mlp):
    x = make_inputs(5, 6, seed=8)
    s = _signals(gradood.Probe(mlp), x)
    with torch.no_grad():
        torch.testing.assert_close(s.get(gradood.Tap("body.0")), mlp.body[0](x))


def test_bad_taps():
    with pytest.raises(gradood.InputError, match="'mean' or 'flatten'"):
        gradood.Tap("conv1", "max")
    s = _signals(gradood.Probe(seeded(SmallCNN, 0)), make_inputs(4, 2, 5, 5))
    with pytest.raises(gradood.InputError, match=r"unknown layer 'conv9'.*taps must name modules"):
        s.get(gradood.Tap("conv9"))


def test_tap_not_reached_is_reported():
    class Skips(MLP):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)

    with pytest.raises(gradood.ModelError, match="'unused' was not reached"):
        _signals(gradood.Probe(seeded(Skips, 0), head="fc"), make_inputs(4, 6)).get(gradood.Tap("unused"))


# ----------------------------------------------------------------------------------------- eval mode, no_grad
def test_runs_in_eval_mode_and_restores_every_flag():
    model = seeded(BNNet, 0)
    x = make_inputs(12, 6, seed=9)
    with torch.no_grad():
        model.train()
        for _ in range(3):  # give BatchNorm non-trivial running statistics
            model(make_inputs(16, 6, seed=10) * 2 + 1)
    model.train()
    model.body[3].eval()  # mixed flags: the dropout alone in eval mode
    flags = {n: m.training for n, m in model.named_modules()}
    running = model.body[1].running_mean.clone()
    model.seen_training.clear()
    model.seen_grad_enabled.clear()
    model.batch_sizes.clear()

    s = _signals(gradood.Probe(model), x, batch_size=5)
    logits = s.logits

    assert model.seen_training and not any(model.seen_training)      # every pass in eval mode
    # head discovery follows the autograd graph of the logits on two samples; every signal pass is no_grad
    assert model.batch_sizes[0] == 2 and model.seen_grad_enabled[0]
    assert model.seen_grad_enabled[1:] and not any(model.seen_grad_enabled[1:])
    assert {n: m.training for n, m in model.named_modules()} == flags  # flags restored exactly
    torch.testing.assert_close(model.body[1].running_mean, running, rtol=0, atol=0)  # BN stats untouched
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def test_flags_restored_when_the_forward_fails():
    model = seeded(BNNet, 0).train()

    def boom(*_):
        raise KeyError("boom")

    h = model.fc.register_forward_hook(boom)
    with pytest.raises(KeyError):
        _signals(gradood.Probe(model, head="fc"), make_inputs(4, 6)).logits
    h.remove()
    assert all(m.training for m in model.modules())


def test_model_dtype_is_used(mlp):
    model = seeded(MLP, 0, torch.float64)
    x = make_inputs(5, 6, seed=11)  # float32 inputs for a float64 model
    s = _signals(gradood.Probe(model), x)
    assert s.logits.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model(x.double()), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- data formats
class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


FORMATS = ["loader-xy", "loader-dict", "loader-x", "dataset", "tensor", "numpy", "tuple", "tuple-numpy"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_formats(fmt, mlp):
    x, y = make_inputs(13, 6, seed=12), make_labels(13, 5, seed=12)
    data = {
        "loader-xy": lambda: DataLoader(TensorDataset(x, y), batch_size=4),
        "loader-dict": lambda: DataLoader(DictDataset(x, y), batch_size=4),
        "loader-x": lambda: DataLoader(x, batch_size=4),
        "dataset": lambda: TensorDataset(x, y),
        "tensor": lambda: x,
        "numpy": lambda: x.double().numpy(),
        "tuple": lambda: (x, y),
        "tuple-numpy": lambda: (x.numpy(), y.numpy()),
    }[fmt]()
    s = _signals(gradood.Probe(mlp), data, batch_size=4)
    assert len(s) == 13
    with torch.no_grad():
        torch.testing.assert_close(s.logits, mlp(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.features, mlp.features(x), rtol=1e-6, atol=1e-6)
    has_labels = fmt not in ("loader-x", "tensor", "numpy")
    if has_labels:
        assert s.labels is not None
        assert torch.equal(s.labels, y)
    else:
        assert s.labels is None


def test_labels_alone_trigger_one_pass(mlp):
    x, y = make_inputs(6, 6), make_labels(6, 5)
    s = _signals(gradood.Probe(mlp), (x, y))
    assert torch.equal(s.labels, y)
    assert s.has(LOGITS)  # the pass that found the labels kept the logits


def test_streaming_runs_one_batch_at_a_time_and_matches_full_batch():
    model = seeded(BNNet, 2)
    x = make_inputs(23, 6, seed=13)
    model.batch_sizes.clear()
    s = _signals(gradood.Probe(model, head="fc"), x, batch_size=5)
    s.require([LOGITS, FEATURES, gradood.Tap("body.0")])
    assert model.batch_sizes == [5, 5, 5, 5, 3]  # one pass, one batch per forward call
    model.batch_sizes.clear()
    gradood.create("energy").score(s)  # already computed: the model does not run again
    assert model.batch_sizes == []
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(s.logits, full)
        torch.testing.assert_close(s.get(gradood.Tap("body.0")), model.body[0](x))
