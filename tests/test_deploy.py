"""Deploying detectors: save/load without pickle, conformal calibration, accept/reject, streaming metrics."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MLP, SmallCNN, make_inputs, make_labels, seeded

import gradood
from gradood.deploy import VersionWarning, conformal_threshold, min_calibration_size
from gradood.metrics import OODMetrics

#: smaller grids / fits so that every registered detector fits in well under a second on the tiny model
SHRINK = {"temperatures": (1.0, 10.0), "epsilons": (0.0, 0.002), "k_dims": 3, "n_fit": 64, "probe_epochs": 2,
          "n_noise": 8, "power_iters": 1}


def _model(seed: int = 5) -> torch.nn.Module:
    return seeded(SmallCNN, seed, dtype=torch.float64, logit_scale=2.0, logit_shift=3.0)


def _signals(model, data, name):
    return gradood.Probe(model).signals(data, batch_size=16, name=name, progress=False)


@pytest.fixture(scope="module")
def data():
    x_id, y_id = make_inputs(64, 2, 5, 5, seed=5, dtype=torch.float64), make_labels(64, 4, seed=5)
    x_val, y_val = make_inputs(24, 2, 5, 5, seed=6, dtype=torch.float64), make_labels(24, 4, seed=6)
    x_ood = make_inputs(24, 2, 5, 5, seed=7, scale=3.0, dtype=torch.float64) + 1.0
    return {"fit": (x_id, y_id), "id_val": (x_val, y_val), "ood_val": x_ood, "test": x_val}


def _fitted(name: str, model, data):
    det = gradood.create(name)
    det = gradood.create(name, **{k: v for k, v in SHRINK.items() if k in det.get_params()})
    kw = {"ood_val": _signals(model, data["ood_val"], "ood"), "id_val": _signals(model, data["id_val"], "idv")} \
        if det.tunes_on_ood else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. SHE's "class without a correct fit sample"
        return det.fit(_signals(model, data["fit"], "fit"), **kw)


# ---------------------------------------------------------------------- registry-wide round trip
@pytest.mark.parametrize("name", gradood.available())
def test_every_registered_detector_round_trips_bit_identically(name, data, tmp_path):
    if name == "mc-dropout":
        pytest.skip("needs a model with dropout; its round trip is in test_detectors_gradfamily.py")
    if name == "bats-fm":
        pytest.skip("needs a model with BatchNorm; its round trip is in test_detectors_new_feature_maps.py")
    model = _model()
    det = _fitted(name, model, data)
    s = det.score(_signals(model, data["test"], "test"))
    folder = det.save(tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["detector.json", "state.safetensors"]
    loaded = gradood.load_detector(folder)
    assert type(loaded) is type(det) and loaded.name == name and loaded.get_params() == det.get_params()
    # fresh signals: the loaded detector recomputes everything it needs from its own state
    np.testing.assert_array_equal(loaded.score(_signals(model, data["test"], "test")), s)
    # and it saves again to the same record (state is stable through a round trip)
    again = json.loads(loaded.save(tmp_path / "again").joinpath("detector.json").read_text())
    first = json.loads((folder / "detector.json").read_text())
    assert again["state"] == first["state"] and again["params"] == first["params"]


def test_record_describes_detector_and_model(data, tmp_path):
    model = _model()
    det = _fitted("mahalanobis-multilayer", model, data)
    rec = gradood.deploy.read_record(det.save(tmp_path / "d"))
    assert rec["detector"] == "mahalanobis-multilayer" and rec["gradood_version"] == gradood.__version__
    assert rec["signals"] == list(det.signals) and rec["requests"] and rec["calibration"] is None
    m = rec["model"]
    assert m["num_classes"] == 4 and m["head"] == "fc" and m["input_shape"] == [2, 5, 5] and m["feature_dim"] == 6
    assert set(m["taps"]) == set(det.layers_) and m["weights_sha256"] == gradood.deploy.weights_fingerprint(model)
    assert m["taps"]["conv1"] == ["mean", 4]


def test_save_refuses_unfitted_and_unregistered_and_foreign_folders(data, tmp_path):
    with pytest.raises(gradood.NotFittedError):
        gradood.create("knn").save(tmp_path / "x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    det = _fitted("knn", _model(), data)
    with pytest.raises(gradood.ConfigError, match="not a gradood detector folder"):
        det.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    det.save(tmp_path / "d")
    with pytest.raises(gradood.ConfigError, match="overwrite=True"):
        det.save(tmp_path / "d")
    det.save(tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "other"]  # no temporary left behind

    class Unregistered(type(det)):
        pass

    rogue = Unregistered()
    rogue.__dict__.update(det.__dict__)
    with pytest.raises(gradood.ConfigError, match="only registered detectors"):
        rogue.save(tmp_path / "r")


def test_state_that_needs_pickle_is_refused_naming_the_attribute(data, tmp_path):
    det = _fitted("knn", _model(), data)
    det.index_ = lambda q: q  # e.g. an index object gradood cannot store without pickle
    with pytest.raises(gradood.ConfigError, match=r"state\.index_"):
        det.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- hostile and damaged folders
def _saved(tmp_path, data, name="knn"):
    return _fitted(name, _model(), data).save(tmp_path / "d")


def _edit(folder: Path, change) -> None:
    rec = json.loads((folder / "detector.json").read_text())
    change(rec)
    (folder / "detector.json").write_text(json.dumps(rec))


class _Bomb:
    """Unpickling this creates a marker file (what a malicious .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_a_hostile_folder_executes_nothing(data, tmp_path):
    folder = _saved(tmp_path, data)
    marker = tmp_path / "pwned"
    (folder / "state.pt").write_bytes(pickle.dumps(_Bomb(marker)))  # a pickle dropped in: never opened
    (folder / "model.pkl").write_bytes(pickle.dumps(_Bomb(marker)))
    assert gradood.load_detector(folder).is_fitted
    assert not marker.exists()

    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    attacks = [
        lambda r: r.update(detector="os.system"),  # not a registered name
        lambda r: r.update(detector=code),
        lambda r: r["params"]["$dict"].update(k=code),  # a code-like string as a hyperparameter
        lambda r: r["state"]["$dict"].update(bank_={"$object": "pathlib:Path", "state": {"$dict": {}}}),
        lambda r: r["state"]["$dict"].update(bank_={"$object": "builtins:eval", "state": {"$dict": {}}}),
        lambda r: r["state"]["$dict"].update(bank_={"$module": "gradood.cli:main", "state": {"$dict": {}}}),
        lambda r: r["state"]["$dict"].update(bank_={"$object": "gradood.detectors.base:os.system",
                                                    "state": {"$dict": {}}}),
        lambda r: r["state"]["$dict"].update(bank_={"$dtype": "__import__"}),
        lambda r: r["state"]["$dict"].update(bank_={"$reduce": code}),
        lambda r: r["state"]["$dict"].update(__class__={"$object": "pathlib:Path", "state": {"$dict": {}}}),
    ]
    for i, attack in enumerate(attacks):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        for f in ("detector.json", "state.safetensors"):
            (bad / f).write_bytes((folder / f).read_bytes())
        _edit(bad, attack)
        with pytest.raises((gradood.InputError, gradood.ConfigError)):
            gradood.load_detector(bad)
        assert not marker.exists(), i


def test_damaged_or_foreign_folders_give_the_fix(data, tmp_path):
    with pytest.raises(gradood.InputError, match="does not exist"):
        gradood.load_detector(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gradood.InputError, match="not a gradood detector folder"):
        gradood.load_detector(tmp_path / "empty")
    folder = _saved(tmp_path, data)
    blob = bytearray((folder / "state.safetensors").read_bytes())
    blob[-1] ^= 1
    (folder / "state.safetensors").write_bytes(bytes(blob))
    with pytest.raises(gradood.InputError, match="sha256"):
        gradood.load_detector(folder)
    (folder / "state.safetensors").unlink()
    with pytest.raises(gradood.InputError, match="no state.safetensors"):
        gradood.load_detector(folder)
    (folder / "detector.json").write_text("{not json")
    with pytest.raises(gradood.InputError, match="not valid JSON"):
        gradood.load_detector(folder)
    folder = _saved(tmp_path / "v", data)
    _edit(folder, lambda r: r.update(format_version=99))
    with pytest.raises(gradood.InputError, match="upgrade gradood"):
        gradood.load_detector(folder)


def test_another_gradood_version_loads_with_a_warning(data, tmp_path):
    folder = _saved(tmp_path, data)
    _edit(folder, lambda r: r.update(gradood_version="0.0.1"))
    with pytest.warns(VersionWarning, match="saved by gradood 0.0.1"):
        gradood.load_detector(folder)


def test_loaded_detector_refuses_another_models_signals(data, tmp_path):
    folder = _saved(tmp_path, data, "odin")
    det = gradood.load_detector(folder)
    same = _model()
    det.score(_signals(same, data["test"], "t"))
    other = _model(seed=9)  # same architecture, other weights
    with pytest.raises(gradood.InputError, match="weights have sha256"):
        det.score(_signals(other, data["test"], "t"))
    with torch.no_grad():
        same.fc.bias.add_(1e-9)  # an in-place change of the weights is noticed too
    with pytest.raises(gradood.InputError, match="weights have sha256"):
        det.score(_signals(same, data["test"], "t"))
    five = seeded(SmallCNN, 5, dtype=torch.float64, n_classes=5)
    with pytest.raises(gradood.InputError, match="4 classes.*5"):
        det.score(gradood.Probe(five, head="fc").signals(data["test"], progress=False))
    mlp = seeded(MLP, 0, dtype=torch.float64)
    x = make_inputs(30, 6, dtype=torch.float64)
    msp = gradood.load_detector(gradood.create("msp").fit(_signals(mlp, x, "fit")).save(tmp_path / "msp"))
    with pytest.raises(gradood.InputError, match="head 'fc'.*'body.0'"):
        msp.score(gradood.Probe(mlp, head="body.0").signals(x, progress=False))


# ---------------------------------------------------------------------- conformal calibration
def test_threshold_is_the_floor_rank_order_statistic():
    s = np.arange(100.0)[::-1].copy()  # 99, ..., 0
    thr, k = conformal_threshold(s, 0.95)
    assert k == math.floor(101 * 0.05) == 5 and thr == 4.0
    assert conformal_threshold(np.arange(19.0), 0.95) == (0.0, 1)
    assert conformal_threshold(np.arange(20.0), 0.9) == (1.0, 2)  # (20+1)*0.1 = 2.1 -> 2, not 2.0999.. -> 2
    assert conformal_threshold(np.arange(9.0), 0.9) == (0.0, 1)  # exactly 1 = 10 * 0.1 (float 0.9999...)
    assert min_calibration_size(0.95) == 19 and min_calibration_size(0.99) == 99 and min_calibration_size(0.9) == 9


def _msp_signals(logits):
    return gradood.Signals.from_arrays(logits=logits)


def test_calibrate_predict_and_p_values_agree():
    rng = np.random.default_rng(0)
    det = gradood.create("maxlogit")
    cal = rng.normal(size=(200, 3))
    det.calibrate(_msp_signals(cal), tpr=0.9)
    s_cal = cal.max(axis=1)
    assert det.threshold_ == np.sort(s_cal)[math.floor(201 * 0.1) - 1] and det.tpr_ == 0.9
    new = _msp_signals(rng.normal(size=(500, 3)))
    acc, p = det.predict(new), det.p_values(new)
    s = det.score(new)
    np.testing.assert_array_equal(acc, s >= det.threshold_)
    np.testing.assert_array_equal(acc, p > 1 - 0.9)
    expect = (1 + (s_cal[None, :] <= s[:, None]).sum(axis=1)) / 201
    np.testing.assert_array_equal(p, expect)
    assert acc.dtype == bool and p.min() >= 1 / 201 and p.max() <= 1
    # ties: a score equal to calibration scores counts them as "<= s"
    tied = gradood.create("maxlogit").calibrate(_msp_signals(np.repeat(np.arange(10.0), 3)[:, None]), tpr=0.8)
    assert tied.threshold_ == 1.0  # k = floor(31 * 0.2) = 6: the 6th lowest of 0,0,0,1,1,1,...
    np.testing.assert_array_equal(tied.p_values(_msp_signals(np.array([[1.0], [0.5], [-1.0], [9.0]]))),
                                  np.array([7, 4, 1, 31]) / 31)
    np.testing.assert_array_equal(tied.predict(_msp_signals(np.array([[1.0], [0.99]]))), [True, False])


def test_calibration_is_refused_with_the_reason(data):
    with pytest.raises(gradood.NotFittedError, match=r"not fitted.*\.fit\("):
        gradood.create("knn").calibrate(_signals(_model(), data["test"], "t"))
    with pytest.raises(gradood.InputError, match="at least 19 held-out ID samples.*got 18"):
        gradood.create("msp").calibrate(_msp_signals(np.random.default_rng(0).normal(size=(18, 3))), tpr=0.95)
    with pytest.raises(gradood.ConfigError, match=r"tpr must be in \(0, 1\)"):
        gradood.create("msp").calibrate(_msp_signals(np.zeros((40, 3))), tpr=95)
    with pytest.raises(gradood.NotFittedError, match="calibrate"):
        gradood.create("msp").predict(_msp_signals(np.zeros((4, 3))))


def test_refit_drops_the_old_threshold(data):
    model = _model()
    det = _fitted("knn", model, data)
    det.k = 3
    det.calibrate(_signals(model, data["id_val"], "v"), tpr=0.9)
    assert det.is_calibrated
    det.fit(_signals(model, data["fit"], "fit"))
    assert not det.is_calibrated


def test_calibrated_detector_round_trips_with_its_threshold(data, tmp_path):
    model = _model()
    det = _fitted("knn", model, data)
    det.k = 3
    x = make_inputs(60, 2, 5, 5, seed=11, dtype=torch.float64)
    det.calibrate(_signals(model, x, "cal"), tpr=0.9)
    loaded = gradood.load_detector(det.save(tmp_path / "d"))
    test = _signals(model, data["test"], "t")
    assert loaded.threshold_ == det.threshold_
    np.testing.assert_array_equal(loaded.predict(test), det.predict(test))
    np.testing.assert_array_equal(loaded.p_values(test), det.p_values(test))
    assert gradood.deploy.read_record(tmp_path / "d")["calibration"] == {
        "threshold": det.threshold_, "tpr": 0.9, "n": 60, "rank": 6}


def test_conformal_guarantee_monte_carlo():
    """Exchangeable ID data: over many calibration/test splits the mean rejection rate of fresh ID samples is
    at most 1 - tpr (plus Monte Carlo error) and equals k / (n + 1) (so it is close to 1 - tpr)."""
    rng = np.random.default_rng(1)
    n, m, trials, tpr = 250, 200, 1500, 0.95  # (n + 1)(1 - tpr) = 12.55: k = 12, rejection 12/251 = 0.0478
    det = gradood.create("maxlogit")
    rates, p_small = [], []
    for _ in range(trials):
        logits = rng.standard_t(3, size=(n + m, 4))  # heavy tails: nothing Gaussian-specific
        det.calibrate(_msp_signals(logits[:n]), tpr=tpr)
        fresh = _msp_signals(logits[n:])
        rates.append(1.0 - det.predict(fresh).mean())
        p_small.append((det.p_values(fresh) <= 0.02).mean())
    rate = float(np.mean(rates))
    se = float(np.std(rates) / math.sqrt(trials))
    k = math.floor((n + 1) * (1 - tpr))
    assert rate <= (1 - tpr) + 3 * se
    assert abs(rate - k / (n + 1)) < 3 * se  # exact expectation, so "close to 1 - tpr" (within 1/(n+1))
    # the ceil rank would reject 13/251 = 0.0518 > 0.05: the test tells them apart
    assert (math.ceil((n + 1) * (1 - tpr))) / (n + 1) > (1 - tpr) + 3 * se
    assert float(np.mean(p_small)) <= 0.02 + 3 * float(np.std(p_small)) / math.sqrt(trials)


# ---------------------------------------------------------------------- streaming metrics
def test_streaming_metrics_equal_evaluate_exactly():
    rng = np.random.default_rng(0)
    s_id = np.round(rng.normal(1, 1, 1003), 1)  # rounded: many ties, across batches too
    s_ood = np.round(rng.normal(0, 1, 777), 1)
    scores = np.concatenate([s_id, s_ood])
    is_id = np.r_[np.ones(s_id.size, bool), np.zeros(s_ood.size, bool)]
    order = rng.permutation(scores.size)
    m = OODMetrics(compact_every=100)
    for chunk in np.array_split(order, 37):
        m.update(torch.from_numpy(scores[chunk]), torch.from_numpy(is_id[chunk]))
    assert m.compute() == gradood.evaluate(s_id, s_ood)
    assert m.counts == (1003, 777)
    m2 = OODMetrics().update(s_id, True).update(s_ood, np.zeros(s_ood.size, dtype=int))
    assert m2.compute() == gradood.evaluate(s_id, s_ood)


def test_streaming_metrics_bad_input():
    m = OODMetrics()
    with pytest.raises(gradood.InputError, match="one flag per score"):
        m.update(np.zeros(3), [True, False])
    with pytest.raises(gradood.InputError, match="booleans"):
        m.update(np.zeros(2), [0, 2])
    with pytest.raises(gradood.InputError, match="NaN"):
        m.update(np.array([0.0, np.nan]), True)
    m.update(np.zeros(3), True)
    with pytest.raises(gradood.InputError, match="3 ID and 0 OOD"):
        m.compute()
    with pytest.raises(gradood.InputError, match="compact_every"):
        OODMetrics(compact_every=0)
