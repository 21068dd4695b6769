"""Bad input: every mistake raises the right gradood exception with a message that names the problem and
says what to do. Also the registry contract of every detector."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gradood
from conftest import MLP, SmallCNN, make_inputs, make_labels, seeded
from gradood.signals import Signals


def _sig(model, data, **kw):
    kw.setdefault("progress", False)
    return gradood.Probe(model).signals(data, **kw)


class Batches:
    """A plain iterable of batches (e.g. a generator-backed loader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


# ----------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs(mlp, bad):
    x = make_inputs(12, 6, seed=1)
    x[7, 3] = bad  # batch 1 (batch size 5), sample 2 of that batch
    with pytest.raises(gradood.InputError) as e:
        _sig(mlp, x, batch_size=5).logits
    msg = str(e.value)
    assert "NaN or Inf" in msg and "batch 1" in msg and "[2]" in msg
    assert "Clean or drop those samples" in msg


def test_nonfinite_logits():
    class LogNet(MLP):
        def features(self, x):
            return super().features(torch.log(x))  # NaN for negative inputs

        def forward(self, x):
            return self.fc(self.features(x))

    x = make_inputs(6, 6, seed=2).abs()
    x[4, 0] = -1.0
    with pytest.raises(gradood.InputError) as e:
        _sig(seeded(LogNet, 0), x, batch_size=3).logits
    msg = str(e.value)
    assert "NaN/Inf logits" in msg and "batch 1" in msg and "[1]" in msg
    assert "Check the inputs' scale and normalisation" in msg


@pytest.mark.parametrize("head", [None, "fc"], ids=["head-discovered", "head-named"])
def test_wrong_input_shape_on_the_first_batch(mlp, head):
    probe = gradood.Probe(mlp, head=head)
    with pytest.raises(gradood.InputError) as e:
        probe.signals(make_inputs(8, 7), progress=False).logits
    msg = str(e.value)
    assert "per-sample shape (7,)" in msg
    assert "Check that the data has the shape" in msg


def test_later_batch_with_another_shape(cnn):
    # the CNN pools adaptively, so it would run on 6x6 inputs: the probe must refuse to mix shapes
    data = Batches([make_inputs(4, 2, 5, 5, seed=1), make_inputs(4, 2, 5, 5, seed=2), make_inputs(4, 2, 6, 6, seed=3)])
    with pytest.raises(gradood.InputError) as e:
        _sig(cnn, data).logits
    msg = str(e.value)
    assert "batch 2" in msg and "(2, 6, 6)" in msg and "(2, 5, 5)" in msg
    assert "resize or reshape" in msg


def test_second_dataset_with_another_shape(cnn):
    probe = gradood.Probe(cnn)
    probe.signals(make_inputs(4, 2, 5, 5), progress=False).logits
    with pytest.raises(gradood.InputError, match=r"\(2, 7, 7\), but earlier batches had \(2, 5, 5\)"):
        probe.signals(make_inputs(4, 2, 7, 7), progress=False).logits


@pytest.mark.parametrize("kind", ["tensor", "tuple", "loader", "dataset", "iterable"])
def test_empty_dataset(mlp, kind):
    x, y = torch.empty(0, 6), torch.empty(0, dtype=torch.long)
    data = {"tensor": x, "tuple": (x, y), "loader": DataLoader(TensorDataset(x, y), batch_size=4),
            "dataset": TensorDataset(x, y), "iterable": Batches([])}[kind]
    s = _sig(mlp, data, name="ood-test")
    with pytest.raises(gradood.InputError) as e:
        gradood.create("energy").score(s)
    msg = str(e.value)
    assert "'ood-test'" in msg and "empty" in msg and "no samples" in msg
    assert "check" in msg.lower()  # says what to look at


def test_empty_batch_in_a_loader(mlp):
    data = Batches([make_inputs(3, 6), torch.empty(0, 6)])
    with pytest.raises(gradood.InputError, match=r"empty batch in batch 1"):
        _sig(mlp, data).logits


def test_unreadable_data(mlp):
    with pytest.raises(gradood.InputError, match=r"cannot read data of type int: pass a DataLoader"):
        _sig(mlp, 5)
    with pytest.raises(gradood.InputError, match=r"inputs have 4 samples but labels have 3; pass matching"):
        _sig(mlp, (make_inputs(4, 6), torch.zeros(3)))
    with pytest.raises(gradood.InputError, match=r"batch_size must be >= 1"):
        _sig(mlp, make_inputs(4, 6), batch_size=0)
    # a dict without an 'x'/'input'/'image' entry is keyword arguments (tokenizer output): the model says no
    with pytest.raises(gradood.InputError, match=r"keyword inputs \{pixels: \(2, 6\)\}.*unexpected keyword argument "
                                                 r"'pixels'.*model\(\*\*batch\).*'x'/'input'/'image' entry"):
        _sig(mlp, Batches([{"pixels": make_inputs(3, 6)}])).logits


def test_detectors_need_signals():
    with pytest.raises(gradood.InputError, match=r"must be gradood Signals.*probe.signals\(data\)"):
        gradood.create("energy").score(np.zeros((3, 4)))
    with pytest.raises(gradood.InputError, match=r"id_signals must be gradood Signals"):
        gradood.create("knn").fit(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------- fitted state
def _three_and_five_class_signals():
    m3 = seeded(MLP, 0, n_classes=3, hidden=8)
    m5 = seeded(MLP, 1, n_classes=5, hidden=8)  # same feature dimension, other class count
    x = make_inputs(40, 6, seed=3, scale=2.0)
    fit = _sig(m3, (x, make_labels(40, 3, seed=3)))
    other = _sig(m5, make_inputs(10, 6, seed=4))
    return fit, other


@pytest.mark.parametrize("name", ["klmatching", "mahalanobis", "vim"])
def test_class_count_differs_from_fit(name):
    fit, other = _three_and_five_class_signals()
    det = gradood.create(name).fit(fit)
    with pytest.raises(gradood.InputError) as e:
        det.score(other)
    msg = str(e.value)
    assert "3 classes" in msg and "5" in msg
    assert "refit" in msg


@pytest.mark.parametrize("name", ["klmatching", "mahalanobis", "vim"])
def test_class_count_differs_from_fit_with_arrays(name):
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(3, 8)), rng.normal(size=3)
    h = rng.normal(size=(40, 8))
    fit = Signals.from_arrays(logits=h @ W.T + b, features=h, labels=np.arange(40) % 3, head_weight=W, head_bias=b)
    W5, b5 = rng.normal(size=(5, 8)), rng.normal(size=5)
    h5 = rng.normal(size=(6, 8))
    other = Signals.from_arrays(logits=h5 @ W5.T + b5, features=h5, head_weight=W5, head_bias=b5)
    det = gradood.create(name).fit(fit)
    with pytest.raises(gradood.InputError, match=r"3 classes, but these signals have 5.*refit"):
        det.score(other)


def test_mahalanobis_fit_labels_covering_fewer_classes_than_the_model():
    """Fit labels covering classes 0..2 of a 5-class model: scoring the SAME model's signals must not depend
    on whether some other detector happened to compute the logits first."""
    model = seeded(MLP, 0, n_classes=5, signed=True)
    x = make_inputs(40, 6, seed=6)
    s = _sig(model, (x, torch.arange(40) % 3))
    det = gradood.create("mahalanobis").fit(s)
    first = det.score(s)
    gradood.create("energy").score(s)  # computes the logits of the same signals
    np.testing.assert_array_equal(det.score(s), first)


def _fitting_detectors():
    out = []
    for name in gradood.available():
        det = gradood.create(name)
        if det.fits_on_id or det.tunes_on_ood:
            out.append((name, {}))
    out += [("rg", {"k_percentile": 90}), ("react", {"percentile": 50})]
    return out


@pytest.mark.parametrize("name,kwargs", _fitting_detectors(), ids=lambda v: v if isinstance(v, str) else "")
def test_unfitted_detector(name, kwargs, mlp):
    s = _sig(mlp, (make_inputs(10, 6), make_labels(10, 5)))
    det = gradood.create(name, **kwargs)
    with pytest.raises(gradood.NotFittedError) as e:
        det.score(s)
    msg = str(e.value)
    assert "not fitted" in msg and ".fit(" in msg
    from sklearn.exceptions import NotFittedError as SkNotFitted
    assert isinstance(e.value, SkNotFitted)  # sklearn habits keep working


def test_detectors_that_need_no_fit_score_without_fit(mlp):
    s = _sig(mlp, make_inputs(10, 6))
    for name in ["msp", "maxlogit", "energy", "gradnorm", "exgrad", "exgrad-id", "rg-eq5", "output-feature",
                 "energy-x-l1", "gradnorm-x-clipped"]:
        det = gradood.create(name)
        assert not det.fits_on_id and not det.tunes_on_ood, name
        assert det.score(s).shape == (10,)
    assert gradood.create("react", clip=1.0).score(s).shape == (10,)


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "vim", "react"])
def test_feature_dimension_differs_from_fit(name):
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(3, 8)), rng.normal(size=3)
    h = np.abs(rng.normal(size=(40, 8)))
    fit = Signals.from_arrays(logits=h @ W.T + b, features=h, labels=np.arange(40) % 3, head_weight=W, head_bias=b)
    W6 = rng.normal(size=(3, 6))
    h6 = np.abs(rng.normal(size=(5, 6)))
    other = Signals.from_arrays(logits=h6 @ W6.T + b, features=h6, head_weight=W6, head_bias=b)
    det = gradood.create(name, **({"k": 3} if name == "knn" else {})).fit(fit)
    with pytest.raises(gradood.InputError) as e:
        det.score(other)
    msg = str(e.value)
    assert "8-dimensional" in msg and "have 6" in msg and "refit" in msg


def test_react_absolute_clip_with_mismatched_head():
    s = Signals.from_arrays(features=np.ones((4, 6)), head_weight=np.ones((3, 5)), head_bias=np.zeros(3))
    with pytest.raises(gradood.InputError, match=r"head weight is \(3, 5\) but features have 6 dims"):
        gradood.create("react", clip=1.0).score(s)


def test_react_and_vim_need_the_head():
    s = Signals.from_arrays(logits=np.ones((4, 3)), features=np.ones((4, 6)))
    with pytest.raises(gradood.InputError, match=r"no classifier head weights: pass head_weight="):
        gradood.create("react", clip=1.0).score(s)
    with pytest.raises(gradood.InputError, match=r"no classifier head weights: pass head_weight="):
        gradood.create("vim", dim=2).fit(s)


def test_mahalanobis_without_labels(mlp):
    s = _sig(mlp, make_inputs(20, 6), name="train")
    with pytest.raises(gradood.InputError) as e:
        gradood.create("mahalanobis").fit(s)
    msg = str(e.value)
    assert "'train' has none" in msg and "(x, y)" in msg and "labels=" in msg


def test_mahalanobis_with_a_class_missing_from_the_fit_data():
    s = Signals.from_arrays(features=np.random.default_rng(2).normal(size=(12, 3)), labels=[0, 1, 3] * 4)
    with pytest.raises(gradood.InputError, match=r"no samples of classes \[2\].*covering all classes"):
        gradood.create("mahalanobis").fit(s)


def test_knn_k_larger_than_the_bank():
    s = Signals.from_arrays(features=np.random.default_rng(3).normal(size=(10, 4)))
    with pytest.raises(gradood.InputError, match=r"k=11 but the feature bank has only 10 samples: lower k"):
        gradood.create("knn", k=11).fit(s)
    with pytest.raises(gradood.InputError, match=r"k=6 but the feature bank has only 5 samples"):
        gradood.create("knn", k=6, fraction=0.5).fit(s)


@pytest.mark.parametrize("dim", [4, 9])
def test_vim_dim_not_below_feature_dimension(dim):
    rng = np.random.default_rng(4)
    W, b, h = rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=(20, 4))
    s = Signals.from_arrays(logits=h @ W.T + b, features=h, head_weight=W, head_bias=b)
    with pytest.raises(gradood.ConfigError, match=rf"dim={dim} leaves no residual space for 4-dimensional.*dim < 4"):
        gradood.create("vim", dim=dim).fit(s)


def test_rg_additive_constant_feature_term():
    s = Signals.from_arrays(logits=np.random.default_rng(5).normal(size=(10, 3)), features=np.full((10, 4), 2.0))
    with pytest.raises(gradood.InputError, match=r"constant on the fit samples.*lower k"):
        gradood.create("rg-additive", k=1.0).fit(s)


# ----------------------------------------------------------------------------------------- configuration
def test_unknown_detector_name():
    with pytest.raises(gradood.ConfigError) as e:
        gradood.create("no-such-detector")
    msg = str(e.value)
    assert "unknown detector 'no-such-detector'" in msg and "Available:" in msg and "gradnorm" in msg
    with pytest.raises(gradood.ConfigError, match=r"Did you mean \['gradnorm'"):
        gradood.create("GradNorm")
    with pytest.raises(gradood.ConfigError, match="unknown detector"):
        gradood.describe("nope")


def test_unknown_hyperparameter():
    with pytest.raises(gradood.ConfigError) as e:
        gradood.create("gradnorm", temp=2.0)
    msg = str(e.value)
    assert "unknown hyperparameter(s) ['temp']" in msg and "valid ones: temperature, norm" in msg
    with pytest.raises(gradood.ConfigError, match=r"valid ones: none"):
        gradood.create("maxlogit", temperature=2.0)


NAN, INF = float("nan"), float("inf")
INVALID = [
    ("msp", {"temperature": 0}, "temperature must be > 0"),
    ("energy", {"temperature": -1.0}, "temperature must be > 0"),
    ("energy", {"temperature": NAN}, "temperature must be > 0"),
    ("energy", {"temperature": INF}, "temperature must be > 0"),
    ("energy", {"temperature": "hot"}, "temperature must be a number"),
    ("gradnorm", {"temperature": 0.0}, "temperature must be > 0"),
    ("gradnorm", {"norm": "l3"}, r"norm must be one of \['l1', 'l2', 'l2sq'\]"),
    ("gradnorm", {"loss": "mse"}, r"loss must be one of \['kl_uniform', 'ones'\]"),
    ("exgrad", {"temperature": -2}, "temperature must be > 0"),
    ("exgrad", {"norm": "linf"}, "norm must be one of"),
    ("rg", {"k": -1.0}, "k must be > 0"),
    ("rg", {"k": 0.0}, "k must be > 0"),
    ("rg", {"k": NAN}, "k must be > 0"),
    ("rg", {"temperature": 0}, "temperature must be > 0"),
    ("rg", {"k_percentile": 0}, r"k_percentile must be in \(0, 100\]"),
    ("rg", {"k_percentile": 101}, r"k_percentile must be in \(0, 100\]"),
    ("rg-additive", {"m": -0.5}, "m must be >= 0"),
    ("rg-additive", {"k": -1}, "k must be > 0"),
    ("rg-additive", {"n_fit": 1}, "n_fit must be >= 2"),
    ("output-feature", {"output_term": "entropy"}, "output_term must be one of"),
    ("output-feature", {"feature_term": "l3"}, "feature_term must be one of"),
    ("output-feature", {"k": -1}, "k must be > 0"),
    ("output-feature", {"temperature": 0}, "temperature must be > 0"),
    ("react", {"percentile": 0}, r"percentile must be in \(0, 100\]"),
    ("react", {"percentile": 100.5}, r"percentile must be in \(0, 100\]"),
    ("react", {"percentile": NAN}, r"percentile must be in \(0, 100\]"),
    ("react", {"clip": -1.0}, "clip must be >= 0"),
    ("react", {"temperature": 0}, "temperature must be > 0"),
    ("klmatching", {"smoothing": 0}, r"smoothing must be in \(0, 1\]"),
    ("klmatching", {"smoothing": -1e-3}, r"smoothing must be in \(0, 1\]"),
    ("klmatching", {"smoothing": 1.5}, r"smoothing must be in \(0, 1\]"),
    ("knn", {"k": 0}, "k must be a positive integer"),
    ("knn", {"k": -3}, "k must be a positive integer"),
    ("knn", {"k": 2.5}, "k must be a positive integer"),
    ("knn", {"fraction": 0}, r"fraction must be in \(0, 1\]"),
    ("knn", {"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
    ("knn", {"backend": "gpu"}, r"backend must be one of \['auto', 'torch', 'faiss'\]"),
    ("vim", {"dim": 0}, "dim must be a positive integer or None"),
    ("vim", {"dim": 2.5}, "dim must be a positive integer or None"),
    ("vim", {"dim": -4}, "dim must be a positive integer or None"),
]


@pytest.mark.parametrize("name,kwargs,pattern", INVALID, ids=[f"{n}-{list(k)[0]}={list(k.values())[0]}"
                                                              for n, k, _ in INVALID])
def test_invalid_hyperparameter_values(name, kwargs, pattern):
    with pytest.raises(gradood.ConfigError, match=pattern) as e:
        gradood.create(name, **kwargs)
    assert f"got {list(kwargs.values())[0]!r}" in str(e.value)  # echoes the bad value


WRONG_TYPE = [
    ("react", {"percentile": None}), ("react", {"percentile": "high"}), ("knn", {"k": None}),
    ("knn", {"fraction": None}), ("rg", {"k_percentile": "x"}), ("rg-additive", {"n_fit": None}),
    ("rg-additive", {"seed": "a"}),
    # a string is not a boolean: "no"/"false" from a config file or command line must not mean True
    ("gradnorm", {"include_bias": "no"}), ("exgrad", {"higher_is_id": "false"}),
    ("output-feature", {"higher_is_id": "no"}), ("knn", {"normalize": "false"}),
]


@pytest.mark.parametrize("name,kwargs", WRONG_TYPE, ids=[f"{n}-{list(k)[0]}={list(k.values())[0]}"
                                                         for n, k in WRONG_TYPE])
def test_hyperparameter_of_the_wrong_type(name, kwargs):
    """Non-numbers where a number is expected and non-booleans where a flag is expected are configuration
    errors naming the parameter -- not a bare TypeError/ValueError from float()/int(), nor silently True."""
    key = list(kwargs)[0]
    with pytest.raises(gradood.ConfigError, match=rf"{key}.*got {kwargs[key]!r}"):
        gradood.create(name, **kwargs)


def test_unknown_loss_and_norm_in_head_helpers():
    from gradood.grads.head import expected_logprob_grad_output_term, feature_norm, loss_delta, output_norm

    z = torch.zeros(2, 3)
    with pytest.raises(gradood.ConfigError, match=r"unknown loss 'mse'; choose one of kl_uniform"):
        loss_delta("mse", z)
    for fn in (lambda: feature_norm(z, "l3"), lambda: output_norm(z, "l3"),
               lambda: expected_logprob_grad_output_term(z, 1.0, "l3")):
        with pytest.raises(gradood.ConfigError, match=r"norm must be one of"):
            fn()


# ----------------------------------------------------------------------------------------- registry contract
SIGNAL_KINDS = {"logits", "features", "taps", "param-grads", "input-grads"}


@pytest.mark.parametrize("name", gradood.available())
def test_registry_declarations(name):
    """Every registered name can be created and declares what it reads, fits and tunes."""
    det = gradood.create(name)
    info = gradood.describe(name)
    assert info["name"] == name and det.label == name
    assert isinstance(det.signals, tuple) and det.signals and set(det.signals) <= SIGNAL_KINDS
    assert isinstance(det.fits_on_id, bool) and isinstance(bool(det.tunes_on_ood), bool)
    assert isinstance(det.needs_model, bool)
    assert isinstance(info["paper"], str) and info["paper"]
    assert set(info["params"]) == set(det.get_params())
    assert repr(det).startswith(type(det).__name__ + "(")
    # constructor arguments are stored unchanged: re-creating from get_params() gives the same parameters
    again = gradood.create(name, **det.get_params())
    assert repr(again) == repr(det)


@pytest.fixture(scope="module")
def registry_data():
    model = seeded(SmallCNN, 5, logit_scale=2.0, logit_shift=3.0)
    probe = gradood.Probe(model)
    x_id, y_id = make_inputs(64, 2, 5, 5, seed=5), make_labels(64, 4, seed=5)  # >= knn's default k = 50
    x_val, y_val = make_inputs(24, 2, 5, 5, seed=6), make_labels(24, 4, seed=6)
    x_ood = make_inputs(24, 2, 5, 5, seed=7, scale=3.0) + 1.0
    mk = lambda d, n: probe.signals(d, batch_size=16, name=n, progress=False)  # noqa: E731
    return mk((x_id, y_id), "id"), mk((x_val, y_val), "id-val"), mk(x_ood, "ood-val"), mk(x_val, "test")


# Fit/score of the detectors that run the model again (perturbations, per-sample gradients, grids) is
# left to their own test files: with default grids some take minutes even on this tiny model.
SINGLE_PASS = [n for n in gradood.available() if not gradood.create(n).needs_model]


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_registry_fit_score_contract(name, registry_data):
    fit, id_val, ood_val, test = registry_data
    det = gradood.create(name)
    kwargs = {"ood_val": ood_val, "id_val": id_val} if det.tunes_on_ood else {}
    assert det.fit(fit, **kwargs) is det
    assert det.is_fitted
    s = det.score(test)
    assert isinstance(s, np.ndarray) and s.shape == (len(test),) and s.dtype == np.float64
    assert np.isfinite(s).all()
    # scoring is a pure function of the signals and the fitted state
    np.testing.assert_array_equal(det.score(test), s)
