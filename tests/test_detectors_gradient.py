"""Gradient detectors built on the per-sample gradient engine: GRODIN (method-specs.md 2.6) and low-dimensional
gradients (2.7), plus the registry-wide end-to-end check of every detector that needs the model.

Every reference is computed here independently with plain torch autograd (one sample at a time), numpy and
scikit-learn, on small seeded models in eval mode -- an MLP and a CNN with Conv2d + BatchNorm2d + Linear --
in float64 where exact agreement is claimed. The engine itself is tested in tests/test_grads_*.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

import gradood
from conftest import BNCNN, MLP, make_inputs, make_labels, seeded
from gradood.detectors.base import detector_class

F64 = torch.float64
CNN_STD = (0.5, 0.25)  # per-channel input std given to the probe: the perturbation step is eps * sign / std


# ============================================================================================ references
def _sig(model, x, y=None, batch_size=8, **probe_kw):
    probe = gradood.Probe(model, **probe_kw)
    return probe.signals(x if y is None else (x, y), batch_size=batch_size, progress=False)


def _std_tensor(std, x):
    if std is None:
        return torch.ones((), dtype=x.dtype)
    s = torch.as_tensor(std, dtype=x.dtype).flatten()
    return s.reshape(()) if s.numel() == 1 else s.reshape(1, -1, *([1] * (x.ndim - 2)))


def ref_odin_input(model, x, T, eps, std=None):
    """ODIN's perturbed input ``x - eps * sign(grad_x CE(f(x)/T, argmax f(x))) / std``, one sample at a time."""
    if eps == 0:
        return x.clone()
    rows = []
    for i in range(len(x)):
        xi = x[i: i + 1].clone().requires_grad_(True)
        f = model(xi)
        loss = torch.nn.functional.cross_entropy(f / T, f.argmax(dim=1))
        (g,) = torch.autograd.grad(loss, xi)
        rows.append((xi - eps * torch.sign(g) / _std_tensor(std, x)).detach())
    return torch.cat(rows)


def ref_grodin(model, x, T, eps, std=None, params=None):
    """``(S, ||grad_theta l_T||^2)`` per sample at the ODIN-perturbed input by a per-sample autograd loop;
    ``l_T = -log softmax(f/T)_argmax``; ``params``: names of the parameters that count (None = all)."""
    named = dict(model.named_parameters())
    plist = list(named.values()) if params is None else [named[n] for n in params]
    xp = ref_odin_input(model, x, T, eps, std)
    S, SG = [], []
    for i in range(len(xp)):
        f = model(xp[i: i + 1])[0]
        logp = torch.log_softmax(f / T, dim=0)
        loss = -logp[f.argmax()]
        grads = torch.autograd.grad(loss, plist)
        SG.append(sum(float((g.double() ** 2).sum()) for g in grads))
        S.append(float(logp.detach().exp().max()))
    return np.array(S), np.array(SG)


def energy_grads(model, x):
    """The explicit ``N x P`` matrix of per-sample gradients of ``LSE(f(x))`` (named_parameters order)."""
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        e = torch.logsumexp(model(x[i: i + 1]), dim=1)[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(e, params)]))
    return torch.stack(rows).double()


def flat_dirs(model, per_param):
    """A per-parameter dict ``{name: (*shape, K)}`` as a ``P x K`` matrix in named_parameters order."""
    return torch.cat([per_param[n].double().reshape(p.numel(), -1) for n, p in model.named_parameters()])


def flat_vec(model, per_param):
    return torch.cat([per_param[n].double().reshape(-1) for n, _ in model.named_parameters()])


def _models():
    mlp = seeded(MLP, 11, F64, d_in=6, hidden=8, n_classes=5, logit_scale=2.0)
    cnn = seeded(BNCNN, 12, F64)
    return {
        "mlp": (mlp, make_inputs(14, 6, seed=21, dtype=F64), 0.3),
        "cnn": (cnn, make_inputs(12, 2, 5, 5, seed=22, dtype=F64), CNN_STD),
    }


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def model_data(request):
    """(name, float64 model in eval mode, inputs, input std) -- the MLP has a scalar std, the CNN per-channel."""
    model, x, std = _models()[request.param]
    return request.param, model, x, std


# ============================================================================================ GRODIN
@pytest.mark.parametrize("T,eps", [(2.5, 0.0), (2.5, 0.02), (1.0, 0.01)])
def test_grodin_parts_equal_a_per_sample_autograd_loop(model_data, T, eps):
    _, model, x, std = model_data
    s = _sig(model, x, input_std=std)
    S, SG = ref_grodin(model, x, T, eps, std)
    assert np.all(SG > 0) and np.all(S < 1)
    sg = gradood.create("grodin-sg", temperature=T, eps=eps).score(s)
    g = gradood.create("grodin", temperature=T, eps=eps).score(s)
    s_part = gradood.create("grodin", part="S", temperature=T, eps=eps).score(s)
    for v in (sg, g, s_part):
        assert v.dtype == np.float64 and v.shape == (len(x),)
    np.testing.assert_allclose(sg, -SG, rtol=1e-6)  # ID-score = -||grad l_T||^2
    np.testing.assert_allclose(g, -SG / S**2, rtol=1e-6)  # G-part = ||grad l_T||^2 / S^2
    np.testing.assert_allclose(s_part, S, rtol=1e-10)


def test_grodin_perturbation_changes_the_scores(model_data):
    """Guards the eps > 0 references above: the step is big enough to change every score."""
    _, model, x, std = model_data
    s = _sig(model, x, input_std=std)
    a = gradood.create("grodin-sg", temperature=2.5, eps=0.0).score(s)
    b = gradood.create("grodin-sg", temperature=2.5, eps=0.02).score(s)
    assert np.all(np.abs(a - b) > 1e-6 * np.abs(a))
    # ODIN's step descends l_T, i.e. raises the temperature-scaled max softmax S
    s0 = gradood.create("grodin", part="S", temperature=2.5, eps=0.0).score(s)
    s1 = gradood.create("grodin", part="S", temperature=2.5, eps=0.02).score(s)
    assert np.all(s1 > s0)


def test_grodin_input_std_divides_the_step():
    """The same eps with input_std = 0.5 is the step 2 * eps without it (step = eps * sign / std)."""
    model, x, _ = _models()["mlp"]
    a = gradood.create("grodin-sg", temperature=2.0, eps=0.01).score(_sig(model, x, input_std=0.5))
    b = gradood.create("grodin-sg", temperature=2.0, eps=0.02).score(_sig(model, x))
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(a, gradood.create("grodin-sg", temperature=2.0, eps=0.01).score(_sig(model, x)))


def test_grodin_t1_eps0_identities(model_data):
    """method-specs 5.3: with T = 1, eps = 0 the S part is MSP (equal values); SG = S^2 * G."""
    _, model, x, std = model_data
    s = _sig(model, x, input_std=std)
    s_part = gradood.create("grodin", part="S").score(s)
    msp = gradood.create("msp").score(s)
    np.testing.assert_allclose(s_part, msp, rtol=1e-6)  # gradood's MSP is computed in float32
    p = torch.softmax(s.logits.double(), dim=1).amax(dim=1).numpy()
    np.testing.assert_allclose(s_part, p, rtol=1e-12)
    sg = gradood.create("grodin-sg").score(s)
    g = gradood.create("grodin").score(s)
    np.testing.assert_allclose(sg, s_part**2 * g, rtol=1e-10)
    assert not np.allclose(sg, g)  # S < 1: the identity is not trivial


def test_grodin_s_part_is_odin():
    model, x, std = _models()["cnn"]
    s = _sig(model, x, input_std=std)
    grodin_s = gradood.create("grodin", part="S", temperature=5.0, eps=0.01).score(s)
    odin = gradood.create("odin", temperature=5.0, eps=0.01).score(s)
    np.testing.assert_allclose(grodin_s, odin, rtol=1e-12)


@pytest.mark.parametrize("T,eps", [(1.0, 0.0), (3.0, 0.0), (3.0, 0.02)])
def test_grodin_lastlayer_equals_closed_form_and_head_autograd(model_data, T, eps):
    name, model, x, std = model_data
    s = _sig(model, x, input_std=std)
    # autograd over the head's weight and bias only, at the perturbed input
    S, SG = ref_grodin(model, x, T, eps, std, params=["fc.weight", "fc.bias"])
    # closed form at the perturbed input: ||p_T - e_c||^2 (||h||^2 + 1) / T^2
    xp = ref_odin_input(model, x, T, eps, std)
    with torch.no_grad():
        h = model.features(xp)
        f = model.fc(h)
    p = torch.softmax(f / T, dim=1)
    e = torch.nn.functional.one_hot(f.argmax(dim=1), f.shape[1]).double()
    closed = ((p - e) ** 2).sum(1) * ((h**2).sum(1) + 1) / T**2
    np.testing.assert_allclose(closed.numpy(), SG, rtol=1e-10)
    sg = gradood.create("grodin-lastlayer-sg", temperature=T, eps=eps).score(s)
    g = gradood.create("grodin-lastlayer", temperature=T, eps=eps).score(s)
    np.testing.assert_allclose(sg, -SG, rtol=1e-9)
    np.testing.assert_allclose(g, -SG / S**2, rtol=1e-9)
    # the full-network version counts more parameters: strictly larger norms
    full = gradood.create("grodin-sg", temperature=T, eps=eps).score(s)
    assert np.all(full < sg)


def test_grodin_lastlayer_without_perturbation_needs_no_model():
    model, x, _ = _models()["mlp"]
    s = _sig(model, x)
    det = gradood.create("grodin-lastlayer", temperature=2.0)
    assert det.needs_model is False
    assert gradood.create("grodin-lastlayer", eps=0.01).needs_model is True
    arrays = gradood.Signals.from_arrays(logits=s.logits, features=s.features)
    np.testing.assert_allclose(det.score(arrays), det.score(s), rtol=1e-12)


@pytest.mark.parametrize("name,params,names", [
    ("mlp", 1, ["fc.weight", "fc.bias"]),
    ("cnn", 1, ["fc.weight", "fc.bias"]),
    ("mlp", 2, ["body.0.weight", "body.0.bias", "fc.weight", "fc.bias"]),
    ("cnn", 2, ["conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]),
    ("mlp", ["fc.bias", "body.0.weight"], ["body.0.weight", "fc.bias"]),
    ("cnn", ["bn1.weight", "conv1.bias"], ["conv1.bias", "bn1.weight"]),
])
def test_grodin_parameter_selection_matches_autograd_on_the_subset(name, params, names):
    """``params``: an int k = the last k parametrised layers in forward order, or a list of names."""
    model, x, std = _models()[name]
    T, eps = 2.0, 0.01
    s = _sig(model, x, input_std=std)
    S, SG = ref_grodin(model, x, T, eps, std, params=names)
    got = gradood.create("grodin-sg", temperature=T, eps=eps, params=params).score(s)
    np.testing.assert_allclose(got, -SG, rtol=1e-6)
    got_g = gradood.create("grodin", temperature=T, eps=eps, params=params).score(s)
    np.testing.assert_allclose(got_g, -SG / S**2, rtol=1e-6)
    _, SG_all = ref_grodin(model, x, T, eps, std)
    if len(names) < len(list(model.parameters())):
        assert np.all(SG < SG_all)  # a strict subset of the parameters
    else:  # the MLP has two layers: params=2 is every parameter
        np.testing.assert_allclose(SG, SG_all, rtol=1e-12)


# ---------------------------------------------------------------------------------------- GRODIN tuning
GRID_T, GRID_EPS = (1.0, 4.0, 20.0), (0.0, 0.01, 0.05)


def _ref_grid_auroc(model, x_id, x_ood, part, std):
    """Grid AUROCs (T-major) of the G or SG part from the autograd reference and sklearn."""
    y = np.r_[np.ones(len(x_id)), np.zeros(len(x_ood))]
    out = np.zeros((len(GRID_T), len(GRID_EPS)))
    for a, T in enumerate(GRID_T):
        for b, eps in enumerate(GRID_EPS):
            scores = []
            for x in (x_id, x_ood):
                S, SG = ref_grodin(model, x, T, eps, std)
                scores.append(-SG / S**2 if part == "G" else -SG)
            out[a, b] = roc_auc_score(y, np.concatenate(scores))
    return out


@pytest.fixture(scope="module")
def tuning_data():
    model, _, std = _models()["mlp"]
    x_train = make_inputs(10, 6, seed=30, dtype=F64)
    x_id = make_inputs(16, 6, seed=31, dtype=F64)
    x_ood = make_inputs(16, 6, seed=32, dtype=F64) * 2.0  # partly separable: AUROCs between 0.7 and 0.9
    return model, std, x_train, x_id, x_ood


@pytest.mark.parametrize("name,part", [("grodin-tuned", "G"), ("grodin-sg-tuned", "SG")])
def test_grodin_tuned_picks_the_grid_argmax(tuning_data, name, part):
    model, std, x_train, x_id, x_ood = tuning_data
    ref = _ref_grid_auroc(model, x_id, x_ood, part, std)
    best = np.unravel_index(np.argmax(ref), ref.shape)
    assert np.sum(ref == ref.max()) == 1 and best != (0, 0)  # a unique, non-trivial optimum
    det = gradood.create(name, temperatures=GRID_T, epsilons=GRID_EPS)
    assert det.tunes_on_ood is True and det.info()["tunes_on_ood"] is True
    det.fit(_sig(model, x_train, input_std=std), ood_val=_sig(model, x_ood, input_std=std),
            id_val=_sig(model, x_id, input_std=std))
    np.testing.assert_allclose(det.grid_auroc_, ref, atol=1e-12)
    assert (det.temperature_, det.eps_) == (GRID_T[best[0]], GRID_EPS[best[1]])
    # scoring uses the chosen (T, eps)
    S, SG = ref_grodin(model, x_train, det.temperature_, det.eps_, std)
    np.testing.assert_allclose(det.score(_sig(model, x_train, input_std=std)),
                               -SG / S**2 if part == "G" else -SG, rtol=1e-6)


def test_grodin_tuned_uses_the_fit_data_as_id_validation_by_default(tuning_data):
    model, std, _, x_id, x_ood = tuning_data
    det = gradood.create("grodin-sg-tuned", temperatures=GRID_T, epsilons=GRID_EPS)
    det.fit(_sig(model, x_id, input_std=std), ood_val=_sig(model, x_ood, input_std=std))
    np.testing.assert_allclose(det.grid_auroc_, _ref_grid_auroc(model, x_id, x_ood, "SG", std), atol=1e-12)


@pytest.mark.parametrize("name", ["grodin-tuned", "grodin-sg-tuned"])
def test_grodin_tuned_without_ood_val_says_what_to_pass(name):
    model, x, _ = _models()["mlp"]
    det = gradood.create(name, temperatures=(1.0, 2.0), epsilons=(0.0,))
    with pytest.raises(gradood.TuningDataError) as exc:
        det.fit(_sig(model, x))
    msg = str(exc.value)
    assert "ood_val" in msg
    # the alternative: fixed hyperparameters, named so that the user knows which ones
    assert "temperature" in msg and "eps" in msg, msg
    with pytest.raises(gradood.NotFittedError):
        det.score(_sig(model, x))


def test_grodin_untuned_is_ood_agnostic_and_fits_without_ood_val():
    model, x, _ = _models()["mlp"]
    for name in ("grodin", "grodin-sg", "grodin-lastlayer", "grodin-lastlayer-sg"):
        det = gradood.create(name)
        assert det.tunes_on_ood is False
        det.fit(_sig(model, x))  # nothing to fit, no error
        assert det.score(_sig(model, x)).shape == (len(x),)


@pytest.mark.parametrize("kwargs", [
    {"eps": -0.001}, {"eps": float("nan")}, {"eps": float("inf")}, {"temperature": 0.0},
    {"temperature": -1.0}, {"temperatures": ()}, {"temperatures": (1.0, 0.0)}, {"epsilons": (0.0, -0.01)},
    {"epsilons": ()}, {"part": "GS"}, {"params": "some"}, {"params": 1.5},
])
@pytest.mark.parametrize("name", ["grodin", "grodin-lastlayer"])
def test_grodin_rejects_bad_hyperparameters(name, kwargs):
    with pytest.raises(gradood.ConfigError):
        gradood.create(name, **kwargs)


def test_grodin_params_out_of_range_is_a_config_error():
    model, x, _ = _models()["cnn"]
    with pytest.raises(gradood.ConfigError, match="1..4"):
        gradood.create("grodin", params=5).score(_sig(model, x))
    with pytest.raises(gradood.ConfigError, match="nope"):
        gradood.create("grodin", params=["nope.weight"]).score(_sig(model, x))


@pytest.mark.parametrize("name", ["grodin", "grodin-sg", "grodin-lastlayer-sg"])
def test_grodin_on_a_model_in_train_mode_scores_as_in_eval_mode(name):
    """The probe runs the model in eval mode (BatchNorm running statistics) and restores every flag."""
    model, x, std = _models()["cnn"]
    eval_scores = gradood.create(name, temperature=2.0, eps=0.01).score(_sig(model, x, input_std=std))
    trained = copy.deepcopy(model).train()
    with torch.no_grad():  # on a copy: a train-mode forward updates the running statistics
        assert not torch.allclose(copy.deepcopy(trained)(x), model(x))  # train mode would change the outputs
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    got = gradood.create(name, temperature=2.0, eps=0.01).score(_sig(trained, x, input_std=std))
    np.testing.assert_allclose(got, eval_scores, rtol=1e-12)
    assert all(m.training for m in trained.modules())
    for k, v in trained.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k
