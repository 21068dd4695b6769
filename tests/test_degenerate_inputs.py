"""Labels and models that do not fit a detector: each a clear InputError naming the problem, the numbers and
the fix -- never a torch traceback (``bincount``, ``size of tensor a must match``) or a silently truncated
label. Registry-wide where possible, so that detectors added later are covered too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradood
from conftest import SmallCNN, make_inputs, make_labels, seeded
from gradood.data import UNLABELLED
from gradood.signals import Signals


def _arrays(n: int = 30, C: int = 3, D: int = 4, seed: int = 0, labels=None) -> Signals:
    rng = np.random.default_rng(seed)
    h = np.abs(rng.normal(size=(n, D)))
    W, b = rng.normal(size=(C, D)), rng.normal(size=C)
    y = np.arange(n) % C if labels is None else labels
    return Signals.from_arrays(logits=h @ W.T + b, features=h, labels=y, head_weight=W, head_bias=b, name="fit")


# ---------------------------------------------------------------------- Signals: labels as they arrive
@pytest.mark.parametrize("labels,pattern", [
    (["cat", "dog", "cow"] * 10, r"labels must be integer class indices .*got <U3 values such as 'cat'.*numpy.unique"),
    (np.array([object()] * 30), r"labels must be integer class indices .*got object values"),
    (np.linspace(0, 2, 30), r"labels must be integer class indices, got 28 non-integer values .*truncate"),
    (np.r_[np.zeros(29), np.nan], r"labels must be integer class indices, got 1 non-integer values such as \[nan\]"),
    (np.arange(30) % 2 == 0, r"labels must be integer class indices, got booleans"),
])
def test_from_arrays_refuses_labels_that_are_not_class_indices(labels, pattern):
    with pytest.raises(gradood.InputError, match=pattern):
        _arrays(labels=labels)


def test_whole_number_float_labels_are_accepted_as_integers():
    s = _arrays(labels=np.arange(30, dtype=np.float32) % 3)
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == [i % 3 for i in range(30)]


def test_loader_labels_are_checked_too(mlp):
    x = make_inputs(20, 6)
    probe = gradood.Probe(mlp)
    with pytest.raises(gradood.InputError, match=r"labels of batch 0 of 'data' must be integer class indices, got 18 "
                                                 r"non-integer values"):
        probe.signals((x, torch.linspace(0, 4, 20)), batch_size=20, progress=False).logits
    ok = probe.signals((x, torch.arange(20.0) % 5), batch_size=8, progress=False)
    assert ok.labels.tolist() == [i % 5 for i in range(20)]


# ---------------------------------------------------------------------- class-conditional fits
def test_mahalanobis_refuses_unlabelled_samples():
    y = np.arange(30) % 3
    y[[4, 9]] = UNLABELLED
    with pytest.raises(gradood.InputError, match=r"mahalanobis fits class statistics on true labels, but 2 of 30 "
                                                 r"samples of 'fit' are unlabelled \(label -1.*drop those samples"):
        gradood.create("mahalanobis").fit(_arrays(labels=y))


def test_mahalanobis_refuses_labels_beyond_the_models_classes():
    with pytest.raises(gradood.InputError, match=r"mahalanobis: 'fit' has labels up to 4, but the model has 3 "
                                                 r"classes \(0..2\)"):
        gradood.create("mahalanobis").fit(_arrays(labels=np.arange(30) % 5))


def test_mahalanobis_refuses_other_negative_labels():
    with pytest.raises(gradood.InputError, match=r"negative labels \(down to -3\)"):
        gradood.create("mahalanobis").fit(_arrays(labels=np.r_[np.arange(29) % 3, -3]))


def test_tied_gaussian_checks_labels_itself():
    from gradood.detectors.mahalanobis import TiedGaussian

    with pytest.raises(gradood.InputError, match=r"unlabelled"):
        TiedGaussian.fit(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, -1, 0]))


SINGLE_PASS = [n for n in gradood.available() if not gradood.create(n).needs_model]


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_every_single_pass_detector_either_ignores_or_refuses_unlabelled_fit_data(name):
    """Registry-wide: a detector that reads labels must refuse ``-1`` with an InputError about the labels; one
    that does not read them must fit. Anything else (a torch error, an IndexError) fails -- for new detectors
    too. (Detectors that use the shared gate, ``_checks.class_labels``, also say how many are unlabelled.)"""
    y = np.arange(60) % 3
    clean = _arrays(n=60, D=5, labels=y)
    y[7] = UNLABELLED
    s = _arrays(n=60, D=5, labels=y)
    det = gradood.create(name, **({"k": 5} if name == "knn" else {}))
    kwargs = {"ood_val": _arrays(n=60, D=5, seed=1), "id_val": s} if det.tunes_on_ood else {}
    try:
        det.fit(clean, **{k: (clean if k == "id_val" else v) for k, v in kwargs.items()})
    except gradood.GradoodError as e:
        pytest.skip(f"{name} does not fit on these arrays even with valid labels: {e}")
    try:
        det.fit(s, **kwargs)
    except gradood.InputError as e:
        assert "label" in str(e) and "-1" in str(e), str(e)


def _tiny_model_signals(labels: torch.Tensor):
    model = seeded(SmallCNN, 5)
    x = make_inputs(len(labels), 2, 5, 5, seed=5)
    return gradood.Probe(model).signals((x, labels), batch_size=16, progress=False, name="fit")


@pytest.mark.parametrize("name,kwargs", [
    ("mahalanobis-multilayer", {}),
    ("lowdim", {"head": "energy", "k_dims": 2, "power_iters": 0, "probe_epochs": 1}),
    ("lowdim-avg-knn", {"knn_k": 2}),
])
def test_model_detectors_refuse_unlabelled_fit_data_before_any_pass(name, kwargs):
    y = make_labels(24, 4, seed=5)
    y[3] = UNLABELLED
    with pytest.raises(gradood.InputError, match=r"1 of 24 samples of 'fit' are unlabelled"):
        gradood.create(name, **kwargs).fit(_tiny_model_signals(y))


# ---------------------------------------------------------------------- FSSD on another model
def test_fssd_scored_on_another_model_names_the_layer_and_sizes():
    fitted_on, other = seeded(SmallCNN, 1, width=6), seeded(SmallCNN, 2, width=8)
    x, y = make_inputs(24, 2, 5, 5, seed=3), make_labels(24, 4)
    det = gradood.create("fssd", n_noise=8).fit(gradood.Probe(fitted_on).signals((x, y), batch_size=8, progress=False))
    with pytest.raises(gradood.InputError, match=r"FSSD was fitted on a model whose layer 'conv2' has 150 values per "
                                                 r"sample, but the model these signals come from gives 200 .*refit"):
        det.score(gradood.Probe(other).signals(x, batch_size=8, progress=False))
    same = det.score(gradood.Probe(fitted_on).signals(x, batch_size=8, progress=False))
    assert same.shape == (24,) and np.isfinite(same).all()


def test_mahalanobis_ensemble_scored_on_another_model_names_the_layer_and_widths():
    fitted_on, other = seeded(SmallCNN, 1, width=6), seeded(SmallCNN, 2, width=8)
    x, y = make_inputs(24, 2, 5, 5, seed=3), make_labels(24, 4)
    det = gradood.create("mahalanobis-multilayer", layers=["conv2"])
    det.fit(gradood.Probe(fitted_on).signals((x, y), batch_size=8, progress=False))
    with pytest.raises(gradood.InputError, match=r"fitted on a model whose layer 'conv2' has 6 channels, but the model "
                                                 r"these signals come from gives 8"):
        det.score(gradood.Probe(other).signals(x, batch_size=8, progress=False))


def test_signals_keep_their_own_copy_of_the_labels():
    y = np.arange(30) % 3
    s = _arrays(labels=y)
    y[:] = -1  # the caller reuses the array afterwards
    assert s.labels.tolist() == [i % 3 for i in range(30)]
