"""Guard (model + calibrated detector as one module) and the fewer-forward-passes pass structure."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import SmallCNN, make_inputs, make_labels, seeded
from torch.utils.data import DataLoader, TensorDataset

import gradood
from gradood import _passes


def _model():
    return seeded(SmallCNN, 5, dtype=torch.float64, logit_scale=2.0, logit_shift=3.0)


class ForwardCounter:
    """Counts calls of the model's forward (every pass gradood runs, whatever for)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


FIT_X, FIT_Y = make_inputs(64, 2, 5, 5, seed=5, dtype=torch.float64), make_labels(64, 4, seed=5)
CAL_X = make_inputs(40, 2, 5, 5, seed=8, dtype=torch.float64)
TEST_X = make_inputs(30, 2, 5, 5, seed=9, dtype=torch.float64)

#: perturbation detectors with eps > 0 and one tapped layer: 2 forwards per batch (shared + perturbed)
PERTURBING = [
    ("odin", {}),
    ("grodin", {"eps": 0.002}),
    ("grodin-lastlayer", {"eps": 0.002}),
    ("mahalanobis-multilayer", {"eps": 0.001, "layers": ["conv2"]}),
    ("fssd", {"eps": 0.01, "layers": ["conv2"]}),
]


def _fit(name, kw, model):
    probe = gradood.Probe(model)
    return gradood.create(name, **kw).fit(probe.signals((FIT_X, FIT_Y), batch_size=16, progress=False))


@pytest.mark.parametrize("name,kw", PERTURBING)
def test_perturbation_runs_two_forwards_per_batch_with_unchanged_scores(name, kw, monkeypatch):
    model = _model()
    det = _fit(name, kw, model)
    count = ForwardCounter(model)
    probe = gradood.Probe(model, head="fc")  # head given: no head-finding pass on the first batch
    s = det.score(probe.signals(TEST_X, batch_size=10, progress=False))
    assert count.n == 2 * 3, count.n  # 3 batches
    # the old structure (a no-grad shared forward, then a forward of its own for the input gradient) gives
    # the same scores with one forward more per batch
    monkeypatch.setattr(_passes, "any_shares_input_grad", lambda requests: False)
    count.n = 0
    s_old = det.score(gradood.Probe(model, head="fc").signals(TEST_X, batch_size=10, progress=False))
    assert count.n == 3 * 3
    np.testing.assert_allclose(s, s_old, rtol=1e-12, atol=0)


@dataclass(frozen=True)
class RecordsGrad(gradood.Request):
    """A request that records whether what it is given carries a graph."""

    seen: list = field(default_factory=list, compare=False, hash=False)

    @property
    def key(self) -> str:
        return "records-grad"

    def compute(self, batch):
        self.seen.append((batch.x.requires_grad, batch.logits.requires_grad, batch.features.requires_grad,
                          torch.is_grad_enabled()))
        return batch.logits.sum(dim=1, keepdim=True)


def test_other_requests_of_a_shared_pass_see_plain_tensors():
    """A single-pass detector scored in the same pass as ODIN gets the same values as alone."""
    model = _model()
    knn, odin = _fit("knn", {"k": 5}, model), _fit("odin", {}, model)
    sig = gradood.Probe(model).signals(TEST_X, batch_size=10, progress=False)
    rec = RecordsGrad()
    sig.require([*knn.requests(), *odin.requests(), gradood.Tap("conv1"), rec])
    assert [s[:3] for s in rec.seen] == [(False, False, False)] * 3  # 3 batches, none with the shared graph
    assert not any(t.requires_grad for t in (sig.features, sig.logits, sig.get(gradood.Tap("conv1"))))
    alone = gradood.Probe(model).signals(TEST_X, batch_size=10, progress=False)
    np.testing.assert_array_equal(knn.score(sig), knn.score(alone))
    np.testing.assert_array_equal(sig.get(gradood.Tap("conv1")), alone.get(gradood.Tap("conv1")))


# ---------------------------------------------------------------------- Guard
@pytest.mark.parametrize("name,kw", [("knn", {"k": 5}), ("energy", {}), ("mahalanobis", {}), *PERTURBING])
def test_guard_equals_probe_signals_score_path_in_fewest_passes(name, kw, tmp_path):
    model = _model()
    det = _fit(name, kw, model)
    det.calibrate(gradood.Probe(model).signals(CAL_X, progress=False), tpr=0.9)
    det = gradood.load_detector(det.save(tmp_path / "d"))  # as deployed
    guard = gradood.Guard(model, det)
    count = ForwardCounter(model)
    out = guard(TEST_X)
    single_pass = not det.needs_model
    assert count.n == (1 if single_pass else 2), count.n
    ref_signals = gradood.Probe(model).signals(TEST_X, progress=False)
    ref = det.score(ref_signals)
    np.testing.assert_allclose(out.scores.numpy(), ref, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(out.logits.numpy(), ref_signals.logits.numpy())
    np.testing.assert_array_equal(out.accepted.numpy(), det.predict(ref_signals))
    np.testing.assert_allclose(out.p_values.numpy(), det.p_values(ref_signals), rtol=0, atol=1e-15)
    assert out.accepted.dtype == torch.bool and out.scores.dtype == torch.float64
    assert not model.training


def test_guard_streams_a_dataloader_and_keeps_train_mode_flags():
    model = _model()
    det = _fit("knn", {"k": 5}, model).calibrate(gradood.Probe(model).signals(CAL_X, progress=False), tpr=0.9)
    guard = gradood.Guard(model, det)
    model.train()  # the guard runs it in eval mode and restores the flag
    loader = DataLoader(TensorDataset(TEST_X, torch.zeros(30)), batch_size=7)
    outs = list(guard.stream(loader))
    assert [len(o.scores) for o in outs] == [7, 7, 7, 7, 2] and model.training
    full = guard(TEST_X)
    np.testing.assert_array_equal(torch.cat([o.scores for o in outs]).numpy(), full.scores.numpy())
    assert isinstance(guard, torch.nn.Module) and "knn" in repr(guard)


def test_guard_refuses_what_it_cannot_decide(tmp_path):
    model = _model()
    det = _fit("knn", {"k": 5}, model)
    with pytest.raises(gradood.NotFittedError, match="calibrate"):
        gradood.Guard(model, det)
    guard = gradood.Guard(model, det, threshold=-0.5)  # an explicit threshold: decisions without p-values
    out = guard(TEST_X)
    assert out.p_values is None and torch.equal(out.accepted, out.scores >= -0.5)
    with pytest.raises(gradood.NotFittedError):
        gradood.Guard(model, gradood.create("knn"), threshold=0.0)
    with pytest.raises(gradood.InputError, match=r"per-sample shape \(2, 6, 6\).*\(2, 5, 5\)"):
        guard(make_inputs(4, 2, 6, 6, dtype=torch.float64))
    det.calibrate(gradood.Probe(model).signals(CAL_X, progress=False), tpr=0.9)
    loaded = gradood.load_detector(det.save(tmp_path / "d"))
    with pytest.raises(gradood.InputError, match="weights have sha256"):
        gradood.Guard(seeded(SmallCNN, 9, dtype=torch.float64), loaded)(TEST_X)
    with pytest.raises(gradood.ModelError):
        gradood.Guard("not a model", loaded)


class DictInputNet(torch.nn.Module):
    """Takes keyword inputs, as HuggingFace models do: ``model(pixels=..., scale=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(pixels * scale[:, None])))


def test_guard_takes_a_dict_batch_as_one_batch():
    model = seeded(DictInputNet, 0, dtype=torch.float64)

    def batch(n, seed):
        return {"pixels": make_inputs(n, 6, seed=seed, dtype=torch.float64), "scale": torch.ones(n, dtype=torch.float64)}

    det = gradood.create("knn", k=5).fit(gradood.Probe(model).signals(batch(60, 0), progress=False))
    det.calibrate(gradood.Probe(model).signals(batch(40, 1), progress=False), tpr=0.9)
    count = ForwardCounter(model)
    out = gradood.Guard(model, det)(batch(25, 2))
    assert count.n == 1 and out.scores.shape == (25,)
    np.testing.assert_array_equal(out.scores.numpy(), det.score(gradood.Probe(model).signals(batch(25, 2),
                                                                                               progress=False)))
    with pytest.raises(gradood.InputError, match="one batch"):
        gradood.Guard(model, det)([1, 2, 3])
