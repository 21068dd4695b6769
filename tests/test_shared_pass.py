"""gradood.signals_for / require_for: what several detectors need, computed in one pass over each dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradood
from gradood.signals import Signals
from conftest import MLP


@pytest.fixture
def setup(monkeypatch):
    torch.manual_seed(0)
    model = MLP(d_in=6, hidden=8, n_classes=5).double().eval()
    x_fit, x_test = torch.randn(64, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64) * 3
    y_fit = torch.randint(0, 5, (64,))
    passes: list[int] = []
    extract = Signals._extract

    def counting(self, *args, **kwargs):
        passes.append(id(self))
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(Signals, "_extract", counting)
    return model, (x_fit, y_fit), x_test, passes


NAMES = ("msp", "gradnorm", "knn", "react", "energy")


def test_one_pass_per_dataset_and_the_same_scores_as_lazy_passes(setup):
    model, fit_data, x_test, passes = setup
    probe = gradood.Probe(model)
    detectors = [gradood.create(n) for n in NAMES]
    train = gradood.signals_for(probe, fit_data, detectors, fit=True, progress=False, batch_size=16)
    assert passes == [id(train)]
    for d in detectors:
        d.fit(train)
    test = gradood.signals_for(probe, x_test, detectors, progress=False, batch_size=16)
    assert passes == [id(train), id(test)], "fitting and scoring must not run further passes"
    scores = [d.score(test) for d in detectors]
    assert passes == [id(train), id(test)]

    # the lazy path (one detector at a time) gives identical scores, in more passes
    lazy_train = probe.signals(fit_data, progress=False, batch_size=16)
    lazy_test = probe.signals(x_test, progress=False, batch_size=16)
    for d, s in zip([gradood.create(n).fit(lazy_train) for n in NAMES], scores):
        np.testing.assert_array_equal(d.score(lazy_test), s)
    assert passes.count(id(lazy_train)) + passes.count(id(lazy_test)) > 2


def test_requests_are_the_union_without_duplicates():
    detectors = [gradood.create(n) for n in ("msp", "energy", "gradnorm", "knn")]
    keys = [r.key for r in gradood.requests_for(detectors)]
    assert sorted(keys) == sorted({gradood.LOGITS.key, gradood.FEATURES.key})


def test_require_for_existing_signals(setup):
    model, fit_data, _, passes = setup
    probe = gradood.Probe(model)
    s = probe.signals(fit_data, progress=False)
    assert gradood.require_for(s, [gradood.create("msp"), gradood.create("gradnorm")]) is s
    assert s.has(gradood.LOGITS) and s.has(gradood.FEATURES) and passes == [id(s)]


def test_scoring_requests_of_an_unfitted_detector_that_depends_on_its_fit_is_a_clear_error():
    with pytest.raises(gradood.NotFittedError, match="fit"):
        gradood.requests_for([gradood.create("msp"), gradood.create("fssd")])


def test_not_a_detector_is_an_input_error(setup):
    with pytest.raises(gradood.InputError, match="gradood.create"):
        gradood.requests_for(["msp"])
    with pytest.raises(gradood.InputError, match="Signals"):
        gradood.require_for(np.zeros(3), [gradood.create("msp")])


def test_progress_bars_only_on_a_terminal(setup, capsys):
    """progress=True draws the extraction bar on a terminal only: a log file gets no carriage returns."""
    model, fit_data, _, _ = setup
    probe = gradood.Probe(model)
    gradood.signals_for(probe, fit_data, [gradood.create("msp")], progress=True, batch_size=8)
    assert capsys.readouterr().err == ""


def test_the_shared_pass_is_logged(setup, caplog):
    model, fit_data, _, _ = setup
    with caplog.at_level("INFO", logger="gradood"):
        gradood.signals_for(gradood.Probe(model), fit_data, [gradood.create("msp"), gradood.create("knn")],
                            fit=True, progress=False, name="fitset")
    # msp fits nothing, so fitting reads only what knn fits on
    assert any("fitset: one pass for features (to fit)" in r.getMessage() for r in caplog.records)
