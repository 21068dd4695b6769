"""Tuning grids that finish: small default grids, the papers' grids one named option away (grid="paper"),
and a warning with the estimated time before a run evaluates more than SAMPLE_PASS_WARNING sample-passes."""

from __future__ import annotations

import warnings

import pytest

import gradood
from conftest import SmallCNN, make_inputs, make_labels, seeded
from gradood.detectors import _checks
from gradood.detectors._checks import SAMPLE_PASS_WARNING, CostWarning
from gradood.detectors.fssd import FSSD_CODE_EPSILONS, FSSD_PAPER_EPSILONS
from gradood.detectors.mahalanobis import MAHALANOBIS_EPSILONS
from gradood.detectors.odin import ODIN_EPSILONS, ODIN_TEMPERATURES, odin_grid_passes

#: the default bench's validation splits: 500 ID + 500 OOD samples per tuning run
BENCH_VAL = 500 + 500


def test_default_and_paper_grids():
    for name in ("odin-tuned", "grodin-tuned", "grodin-sg-tuned"):
        assert gradood.create(name).tuning_grid() == ((1.0, 10.0, 100.0, 1000.0), (0.0, 0.001, 0.002, 0.004))
        assert gradood.create(name, grid="paper").tuning_grid() == (ODIN_TEMPERATURES, ODIN_EPSILONS)
        assert len(ODIN_TEMPERATURES) * len(ODIN_EPSILONS) == 210
    assert gradood.create("fssd-lr-eps").eps_grid() == (0.0, 0.001, 0.005, 0.02, 0.1)
    assert gradood.create("fssd-lr-eps", grid="paper").eps_grid() == FSSD_PAPER_EPSILONS
    assert gradood.create("fssd-lr-eps", grid="code").eps_grid() == FSSD_CODE_EPSILONS and len(FSSD_CODE_EPSILONS) == 22
    assert gradood.create("mahalanobis-ensemble-tuned").epsilons == MAHALANOBIS_EPSILONS  # Lee et al.'s 7: small


def test_explicit_grids_replace_the_named_one():
    det = gradood.create("odin-tuned", grid="paper", temperatures=[1, 1000])
    assert det.tuning_grid() == ((1.0, 1000.0), ODIN_EPSILONS)
    assert gradood.create("fssd-lr-eps", grid="paper", epsilons=[0, 0.01]).eps_grid() == (0.0, 0.01)
    with pytest.raises(gradood.ConfigError, match=r"grid must be one of \['default', 'paper'\], got 'papers'"):
        gradood.create("odin-tuned", grid="papers")


def test_default_grids_stay_below_the_warning_on_the_default_bench_sizes():
    """Per-sample pass counts of the default grids (the bench's LeNet-sized models have <= 5 tapped layers):
    well under the warning threshold on 500 + 500 validation samples, where the paper grids are not."""
    T, E = gradood.create("odin-tuned").tuning_grid()
    assert odin_grid_passes(T, E) * BENCH_VAL <= SAMPLE_PASS_WARNING / 5
    assert odin_grid_passes(ODIN_TEMPERATURES, ODIN_EPSILONS) * BENCH_VAL > SAMPLE_PASS_WARNING
    grodin = gradood.create("grodin-tuned")
    assert grodin._grid_passes(*grodin.tuning_grid()) * BENCH_VAL <= SAMPLE_PASS_WARNING / 4
    assert grodin._grid_passes(ODIN_TEMPERATURES, ODIN_EPSILONS) * BENCH_VAL > SAMPLE_PASS_WARNING
    layers = 5
    fssd_passes = lambda eps: 3 * layers * sum(e > 0 for e in eps)  # noqa: E731
    assert fssd_passes(gradood.create("fssd-lr-eps").eps_grid()) * BENCH_VAL <= SAMPLE_PASS_WARNING / 3
    # the case: the 22-value grid without id_val runs on all 5 000 ID fit samples (+ 500 OOD)
    assert fssd_passes(FSSD_CODE_EPSILONS) * 5500 > 5 * SAMPLE_PASS_WARNING


def test_the_default_bench_keeps_its_grids():
    """The default spec pins the grids it has always used, so ./dev bench figures do not move with defaults."""
    from gradood.bench.spec import load_spec

    spec = load_spec()
    refs = {r.name: r for r in spec.runs[0].detectors}
    small = ((1.0, 100.0, 1000.0), (0.0, 0.002))
    for name in ("odin-tuned", "grodin-tuned", "grodin-sg-tuned"):
        assert gradood.create(name, **refs[name].params).tuning_grid() == small
    assert gradood.create("fssd-lr-eps", **refs["fssd-lr-eps"].params).eps_grid() == (0.0, 0.005)
    assert gradood.create("mahalanobis-ensemble-tuned", **refs["mahalanobis-ensemble-tuned"].params).epsilons == (0.0, 0.005)


# ---------------------------------------------------------------------- the warning
@pytest.fixture
def tiny():
    model = seeded(SmallCNN, 1)
    probe = gradood.Probe(model)
    mk = lambda x, y=None, name="d": probe.signals(x if y is None else (x, y), batch_size=16, progress=False, name=name)  # noqa: E731
    fit = mk(make_inputs(40, 2, 5, 5, seed=1), make_labels(40, 4, seed=1), "id-fit")
    ood = mk(make_inputs(24, 2, 5, 5, seed=2, scale=3.0), name="ood-val")
    return fit, ood


def test_fssd_without_id_val_warns_before_the_grid_runs(tiny, monkeypatch):
    fit, ood = tiny
    monkeypatch.setattr(_checks, "SAMPLE_PASS_WARNING", 500)
    det = gradood.create("fssd-lr-eps", n_noise=4, layers=["conv1", "conv2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostWarning)
        with pytest.raises(CostWarning, match=r"fssd-lr-eps: the eps grid \(5 values\) over 2 layers evaluates 24 "
                                              r"forward/backward passes per sample on 64 samples = 1,536 sample-passes, "
                                              r"estimated ~\d+ s on this machine \(more than 500\)\. Pass id_val="):
            det.fit(fit, ood_val=ood)
    grid = [det._request(e) for e in det.eps_grid()]
    assert not any(fit.has(r) or ood.has(r) for r in grid)  # warned before any of the grid was computed
    with pytest.warns(CostWarning):
        det.fit(fit, ood_val=ood)  # a warning, not an error: the run goes on
    assert det.is_fitted


def test_odin_paper_grid_warns_and_default_grid_does_not(tiny, monkeypatch):
    fit, ood = tiny
    monkeypatch.setattr(_checks, "SAMPLE_PASS_WARNING", 64 * 30)  # scaled to 64 samples like 200 000 to 1 000
    with pytest.warns(CostWarning, match=r"odin-tuned: the tuning grid \(10 temperatures x 21 eps\) evaluates 220 "
                                         r"forward/backward passes per sample on 64 samples"):
        gradood.create("odin-tuned", grid="paper", temperatures=[1.0] * 10).fit(fit, ood_val=ood)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostWarning)
        gradood.create("odin-tuned").fit(fit, ood_val=ood)


def test_cached_grids_do_not_warn(tiny, monkeypatch):
    fit, ood = tiny
    monkeypatch.setattr(_checks, "SAMPLE_PASS_WARNING", 10)
    det = gradood.create("odin-tuned", temperatures=[1.0], epsilons=[0.0, 0.001])
    with pytest.warns(CostWarning):
        det.fit(fit, ood_val=ood)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostWarning)
        det.fit(fit, ood_val=ood)  # the grid's signals are in memory now: nothing left to evaluate
