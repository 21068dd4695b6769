"""Input-perturbation detectors: ODIN (docs/methods.md 3.4), FSSD (2.8) and the multi-layer Mahalanobis ensemble
(3.6), each against an independent computation with plain torch autograd (one sample at a time), numpy and
scikit-learn on small seeded float64 models in eval mode (an MLP and a CNN with Conv2d + BatchNorm2d + Linear).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score

import gradood
from conftest import BNCNN, MLP, make_inputs, make_labels, seeded
from conftest import probe_signals as _sig
from conftest import std_tensor as _std_tensor

F64 = torch.float64
CNN_STD, CNN_MEAN = (0.5, 0.25), (0.1, -0.2)


def per_sample_input_grad(x, loss_of):
    """``d loss_of(x_i) / d x_i`` one sample at a time (``loss_of`` maps a 1-sample batch to a scalar)."""
    rows = []
    for i in range(len(x)):
        xi = x[i: i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(xi), xi)
        rows.append(g)
    return torch.cat(rows)


def _models():
    return {
        "mlp": (seeded(MLP, 11, F64, d_in=6, hidden=8, n_classes=5, logit_scale=2.0),
                make_inputs(14, 6, seed=21, dtype=F64), 0.3),
        "cnn": (seeded(BNCNN, 12, F64), make_inputs(12, 2, 5, 5, seed=22, dtype=F64), CNN_STD),
    }


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def model_data(request):
    """(name, float64 model in eval mode, inputs, input std) -- scalar std for the MLP, per-channel for the CNN."""
    model, x, std = _models()[request.param]
    return request.param, model, x, std


# ============================================================================================ ODIN
def ref_odin(model, x, T, eps, std=None):
    """``max softmax(f(x_p)/T)`` with ``x_p = x - eps * sign(grad_x CE(f(x)/T, argmax f(x))) / std``."""
    def loss(xi):
        f = model(xi)
        return torch.nn.functional.cross_entropy(f / T, f.argmax(dim=1))

    xp = x - eps * torch.sign(per_sample_input_grad(x, loss)) / _std_tensor(std, x) if eps > 0 else x
    with torch.no_grad():
        return torch.softmax(model(xp) / T, dim=1).amax(dim=1).numpy()


@pytest.mark.parametrize("T,eps", [(10.0, 0.004), (1.0, 0.02), (1000.0, 0.0014)])
def test_odin_equals_hand_computed_perturbed_max_softmax(model_data, T, eps):
    _, model, x, std = model_data
    got = gradood.create("odin", temperature=T, eps=eps).score(_sig(model, x, input_std=std))
    assert got.dtype == np.float64 and got.shape == (len(x),)
    np.testing.assert_allclose(got, ref_odin(model, x, T, eps, std), rtol=1e-10)
    # the step is large enough to matter, and it raises the scaled max softmax
    unperturbed = ref_odin(model, x, T, 0.0)
    assert np.all(got > unperturbed)


def test_odin_step_is_divided_by_the_per_channel_std():
    model, x, _ = _models()["cnn"]
    with_std = gradood.create("odin", temperature=5.0, eps=0.01).score(_sig(model, x, input_std=CNN_STD))
    np.testing.assert_allclose(with_std, ref_odin(model, x, 5.0, 0.01, CNN_STD), rtol=1e-10)
    assert not np.allclose(with_std, ref_odin(model, x, 5.0, 0.01, None))
    assert not np.allclose(with_std, ref_odin(model, x, 5.0, 0.01, 0.5))


@pytest.mark.parametrize("T", [1.0, 7.0, 1000.0])
def test_odin_without_perturbation_is_msp_at_temperature_t(model_data, T):
    _, model, x, std = model_data
    s = _sig(model, x, input_std=std)
    got = gradood.create("odin", temperature=T, eps=0.0).score(s)
    np.testing.assert_allclose(got, torch.softmax(s.logits.double() / T, dim=1).amax(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(got, gradood.create("msp", temperature=T).score(s), rtol=1e-6)  # MSP is float32


def test_odin_defaults():
    det = gradood.create("odin")
    assert (det.temperature, det.eps) == (1000.0, 0.0014)
    assert det.tunes_on_ood is False and det.needs_model is True
    temps, epsilons = det.tuning_grid()  # the default grid is small; the paper's is grid="paper"
    assert temps == (1.0, 10.0, 100.0, 1000.0) and epsilons == (0.0, 0.001, 0.002, 0.004)
    temps, epsilons = gradood.create("odin", grid="paper").tuning_grid()
    assert len(temps) == 10 and len(epsilons) == 21 and epsilons[-1] == pytest.approx(0.004)


ODIN_T, ODIN_EPS = (1.0, 10.0, 100.0), (0.0, 0.01, 0.04)


@pytest.fixture(scope="module")
def odin_tuning():
    model, _, std = _models()["cnn"]
    x_id = make_inputs(16, 2, 5, 5, seed=31, dtype=F64)
    x_ood = make_inputs(16, 2, 5, 5, seed=32, dtype=F64) * 1.5
    y = np.r_[np.ones(16), np.zeros(16)]
    ref = np.array([[roc_auc_score(y, np.r_[ref_odin(model, x_id, T, e, std), ref_odin(model, x_ood, T, e, std)])
                     for e in ODIN_EPS] for T in ODIN_T])
    return model, std, x_id, x_ood, ref


def test_odin_tuned_picks_the_grid_argmax(odin_tuning):
    model, std, x_id, x_ood, ref = odin_tuning
    best = np.unravel_index(np.argmax(ref), ref.shape)
    assert np.sum(ref == ref.max()) == 1 and best != (0, 0)  # a unique, non-trivial optimum
    det = gradood.create("odin-tuned", temperatures=ODIN_T, epsilons=ODIN_EPS)
    assert det.tunes_on_ood is True
    x_train = make_inputs(6, 2, 5, 5, seed=30, dtype=F64)
    det.fit(_sig(model, x_train, input_std=std), ood_val=_sig(model, x_ood, input_std=std),
            id_val=_sig(model, x_id, input_std=std))
    np.testing.assert_allclose(det.grid_auroc_, ref, atol=1e-12)
    assert (det.temperature_, det.eps_) == (ODIN_T[best[0]], ODIN_EPS[best[1]])
    np.testing.assert_allclose(det.score(_sig(model, x_train, input_std=std)),
                               ref_odin(model, x_train, det.temperature_, det.eps_, std), rtol=1e-10)


def test_odin_tuned_without_ood_val(odin_tuning):
    model, std, x_id, _, _ = odin_tuning
    det = gradood.create("odin-tuned", temperatures=ODIN_T, epsilons=ODIN_EPS)
    with pytest.raises(gradood.TuningDataError, match="ood_val"):
        det.fit(_sig(model, x_id, input_std=std))
    with pytest.raises(gradood.NotFittedError):
        det.score(_sig(model, x_id, input_std=std))


@pytest.mark.parametrize("kwargs", [
    {"eps": -0.001}, {"eps": float("nan")}, {"eps": float("inf")}, {"eps": "big"}, {"temperature": 0.0},
    {"temperature": -5.0}, {"temperature": float("nan")}, {"temperatures": ()}, {"temperatures": (1.0, -1.0)},
    {"temperatures": (0.0,)}, {"epsilons": ()}, {"epsilons": (0.0, -0.002)}, {"epsilons": (float("nan"),)},
])
@pytest.mark.parametrize("name", ["odin", "odin-tuned"])
def test_odin_rejects_bad_hyperparameters(name, kwargs):
    with pytest.raises(gradood.ConfigError):
        gradood.create(name, **kwargs)


def test_odin_on_a_model_in_train_mode_scores_as_in_eval_mode():
    model, x, std = _models()["cnn"]
    ref = ref_odin(model, x, 10.0, 0.01, std)
    trained = copy.deepcopy(model).train()
    got = gradood.create("odin", temperature=10.0, eps=0.01).score(_sig(trained, x, input_std=std))
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert all(m.training for m in trained.modules())
    assert torch.equal(trained.bn1.running_mean, model.bn1.running_mean)


# ============================================================================================ FSSD
FSSD_LAYERS = ("act1", "act2", "logits")


def layer_outputs(model, x, layers=FSSD_LAYERS):
    """Flattened outputs of the named modules ("logits" = the model output) by forward hooks, differentiable."""
    out, handles = {}, []
    for name in layers:
        if name != "logits":
            handles.append(getattr(model, name).register_forward_hook(
                lambda _m, _i, o, n=name: out.__setitem__(n, o.reshape(o.shape[0], -1))))
    try:
        out["logits"] = model(x)
    finally:
        for h in handles:
            h.remove()
    return [out[k].double() for k in layers]


def ref_centres(model, noise_mode, n_noise, seed, shape=(2, 5, 5), mean=None, std=None):
    g = torch.Generator().manual_seed(seed)
    if noise_mode == "code":  # official code: pixels randint(0, 255 inclusive), (p - 127.5) / 255, unnormalised
        x = (torch.randint(0, 256, (n_noise, *shape), generator=g).double() - 127.5) / 255.0
    else:  # U[0, 1] pixels through the probe's normalisation
        u = torch.rand((n_noise, *shape), generator=g).double()
        x = (u - _std_tensor(mean, u)) / _std_tensor(std, u)
    with torch.no_grad():
        return [f.mean(dim=0) for f in layer_outputs(model, x.to(F64))]


def ref_fssd(model, x, centres):
    with torch.no_grad():
        return torch.stack([(f - c).norm(dim=1) for f, c in zip(layer_outputs(model, x), centres)], dim=1).numpy()


@pytest.fixture(scope="module")
def fssd_data():
    model = seeded(BNCNN, 50, F64)
    x_fit = make_inputs(20, 2, 5, 5, seed=51, dtype=F64)
    x_test = make_inputs(12, 2, 5, 5, seed=52, dtype=F64)
    return model, x_fit, x_test


def _fssd_sig(model, x, batch_size=8):
    return _sig(model, x, batch_size=batch_size, input_std=CNN_STD, input_mean=CNN_MEAN)


@pytest.mark.parametrize("noise", ["code", "normalized"])
def test_fssd_centres_are_mean_layer_outputs_on_the_documented_noise(fssd_data, noise):
    model, x_fit, _ = fssd_data
    det = gradood.create("fssd", noise=noise, n_noise=16, seed=3).fit(_fssd_sig(model, x_fit))
    assert det.layers_ == FSSD_LAYERS  # default: the activation modules reached once, plus the logits
    ref = ref_centres(model, noise, 16, 3, mean=CNN_MEAN, std=CNN_STD)
    for got, want in zip(det.centers_, ref):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    other_seed = ref_centres(model, noise, 16, 4, mean=CNN_MEAN, std=CNN_STD)
    assert not np.allclose(det.centers_[0].numpy(), other_seed[0].numpy())


def test_fssd_per_layer_distances_equal_a_direct_computation(fssd_data):
    model, x_fit, x_test = fssd_data
    det = gradood.create("fssd", n_noise=16).fit(_fssd_sig(model, x_fit))
    ref = ref_fssd(model, x_test, ref_centres(model, "code", 16, 0))
    np.testing.assert_allclose(det.layer_scores(_fssd_sig(model, x_test)), ref, rtol=1e-6)


def _fssd_grad_step(model, x, centres, layer_index, eps, std):
    """Paper mode: ``x + eps * sign(grad_x FSSD_k(x)) / std`` for layer k, per sample."""
    def dist(xi):
        return (layer_outputs(model, xi)[layer_index] - centres[layer_index]).norm()

    return x + eps * torch.sign(per_sample_input_grad(x, dist)) / _std_tensor(std, x)


@pytest.mark.parametrize("eps", [0.002, 0.02])
def test_fssd_paper_perturbation_moves_up_the_gradient_of_each_layer(fssd_data, eps):
    model, x_fit, x_test = fssd_data
    det = gradood.create("fssd", n_noise=16, eps=eps).fit(_fssd_sig(model, x_fit))
    centres = ref_centres(model, "code", 16, 0)
    got = det.layer_scores(_fssd_sig(model, x_test))
    for k in range(len(FSSD_LAYERS)):  # each layer has its own perturbed input
        xp = _fssd_grad_step(model, x_test, centres, k, eps, CNN_STD)
        np.testing.assert_allclose(got[:, k], ref_fssd(model, xp, centres)[:, k], rtol=1e-6)
    unperturbed = ref_fssd(model, x_test, centres)
    assert np.mean(got.numpy() > unperturbed) >= 0.9  # the step increases FSSD_k for (almost) all samples


def _code_mode_ref(model, x, centres, eps, batch_size, std):
    """The official code's step, per batch: g = grad_x(-mean_batch FSSD_k), standardised by the batch's own
    mean and std, divided by the input std: x + eps * g / std."""
    out = []
    for k in range(len(FSSD_LAYERS)):
        cols = []
        for b in range(0, len(x), batch_size):
            xb = x[b: b + batch_size].clone().requires_grad_(True)
            loss = -(layer_outputs(model, xb)[k] - centres[k]).norm(dim=1).mean()
            (g,) = torch.autograd.grad(loss, xb)
            g = (g - g.mean()) / g.std()
            cols.append(ref_fssd(model, (xb + eps * g / _std_tensor(std, xb)).detach(), centres)[:, k])
        out.append(np.concatenate(cols))
    return np.stack(out, axis=1)


def test_fssd_code_perturbation_is_reproducible_and_matches_the_official_formula(fssd_data):
    model, x_fit, x_test = fssd_data
    centres = ref_centres(model, "code", 16, 0)

    def run(batch_size):
        det = gradood.create("fssd", n_noise=16, eps=0.01, perturb_mode="code").fit(_fssd_sig(model, x_fit))
        return det.layer_scores(_fssd_sig(model, x_test, batch_size=batch_size)).numpy()

    first = run(8)
    np.testing.assert_array_equal(run(8), first)
    np.testing.assert_allclose(first, _code_mode_ref(model, x_test, centres, 0.01, 8, CNN_STD), rtol=1e-6)
    # documented: batch-level standardisation makes a sample's score depend on its batch
    assert not np.allclose(run(5), first)


def test_fssd_mean_z_combination_uses_id_fit_statistics(fssd_data):
    model, x_fit, x_test = fssd_data
    det = gradood.create("fssd", n_noise=16).fit(_fssd_sig(model, x_fit))
    assert det.tunes_on_ood is False
    centres = ref_centres(model, "code", 16, 0)
    fit_vals, test_vals = ref_fssd(model, x_fit, centres), ref_fssd(model, x_test, centres)
    # z-scores with the mean and (sample) std of each layer's ID fit values, averaged over the layers
    z = (test_vals - fit_vals.mean(0)) / fit_vals.std(0, ddof=1)
    np.testing.assert_allclose(det.score(_fssd_sig(model, x_test)), z.mean(1), rtol=1e-6)


def test_fssd_single_layer_combine_is_that_layers_column(fssd_data):
    model, x_fit, x_test = fssd_data
    s = _fssd_sig(model, x_test)
    all_layers = gradood.create("fssd", n_noise=16).fit(_fssd_sig(model, x_fit)).layer_scores(s).numpy()
    for k, layer in enumerate(FSSD_LAYERS):
        det = gradood.create("fssd", n_noise=16, combine=layer).fit(_fssd_sig(model, x_fit))
        assert det.tunes_on_ood is False
        np.testing.assert_array_equal(det.score(s), all_layers[:, k])


def test_fssd_explicit_layers(fssd_data):
    model, x_fit, x_test = fssd_data
    det = gradood.create("fssd", n_noise=16, layers=["act2", "logits"]).fit(_fssd_sig(model, x_fit))
    assert det.layers_ == ("act2", "logits")
    ref = ref_fssd(model, x_test, ref_centres(model, "code", 16, 0))[:, 1:]
    np.testing.assert_allclose(det.layer_scores(_fssd_sig(model, x_test)), ref, rtol=1e-6)


def _lr_ref(pos, neg, query):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lr = LogisticRegressionCV(random_state=42, max_iter=2000).fit(
            np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    return lr.decision_function(query)


def test_fssd_lr_is_ood_tuned(fssd_data):
    model, x_fit, x_test = fssd_data
    det = gradood.create("fssd-lr", n_noise=16)
    assert det.tunes_on_ood is True and det.info()["tunes_on_ood"] is True
    with pytest.raises(gradood.TuningDataError, match="ood_val"):
        det.fit(_fssd_sig(model, x_fit))
    x_id = make_inputs(16, 2, 5, 5, seed=53, dtype=F64)
    x_ood = make_inputs(16, 2, 5, 5, seed=54, dtype=F64) * 2.0 + 0.3
    det.fit(_fssd_sig(model, x_fit), ood_val=_fssd_sig(model, x_ood), id_val=_fssd_sig(model, x_id))
    centres = ref_centres(model, "code", 16, 0)
    ref = _lr_ref(ref_fssd(model, x_id, centres), ref_fssd(model, x_ood, centres), ref_fssd(model, x_test, centres))
    np.testing.assert_allclose(det.score(_fssd_sig(model, x_test)), ref, rtol=1e-5, atol=1e-6)
    assert gradood.create("fssd", n_noise=16, tune_eps=True).tunes_on_ood is True


def _loader(x, y=None):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=8)


def test_fssd_eps_tuning_works_with_dataloaders(fssd_data):
    """eps selection splits the validation signals; with DataLoader data (the usual way) the halves must still
    be computable and give the same choice and scores as the same data passed as tensors."""
    model, x_fit, x_test = fssd_data
    x_id = make_inputs(16, 2, 5, 5, seed=53, dtype=F64)
    x_ood = make_inputs(16, 2, 5, 5, seed=54, dtype=F64) * 2.0 + 0.3
    kw = dict(n_noise=16, epsilons=(0.0, 0.02))
    probe = gradood.Probe(model, input_std=CNN_STD, input_mean=CNN_MEAN)
    ref = gradood.create("fssd-lr-eps", **kw).fit(probe.signals(x_fit, progress=False),
                                                  ood_val=probe.signals(x_ood, progress=False),
                                                  id_val=probe.signals(x_id, progress=False))
    det = gradood.create("fssd-lr-eps", **kw).fit(probe.signals(_loader(x_fit), progress=False),
                                                  ood_val=probe.signals(_loader(x_ood), progress=False),
                                                  id_val=probe.signals(_loader(x_id), progress=False))
    assert det.eps_ == ref.eps_
    test = probe.signals(x_test, progress=False)
    np.testing.assert_allclose(det.score(test), ref.score(test), rtol=1e-6)


def test_fssd_unknown_layer_names_are_clear_errors(fssd_data):
    model, x_fit, _ = fssd_data
    with pytest.raises(gradood.GradoodError, match="nope"):
        gradood.create("fssd", n_noise=4, layers=["act1", "nope"]).fit(_fssd_sig(model, x_fit))
    with pytest.raises(gradood.ConfigError, match="nope"):
        gradood.create("fssd", n_noise=4, combine="nope").fit(_fssd_sig(model, x_fit))


def test_fssd_needs_the_model(fssd_data):
    model, x_fit, _ = fssd_data
    s = _fssd_sig(model, x_fit)
    with pytest.raises(gradood.InputError, match="probe.signals"):
        gradood.create("fssd").fit(gradood.Signals.from_arrays(logits=s.logits, features=s.features))


@pytest.mark.parametrize("kwargs", [{"noise": "gaussian"}, {"perturb_mode": "both"}, {"eps": -0.1},
                                    {"n_noise": 0}, {"val_split": 1.0}, {"epsilons": (0.1, -0.1)},
                                    {"combine": ""}])
def test_fssd_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(gradood.ConfigError):
        gradood.create("fssd", **kwargs)


# ============================================================================================ Mahalanobis ensemble
MAHA_LAYERS = ("act1", "act2", "features")


def layer_means(model, x, layers=MAHA_LAYERS):
    """Lee et al.'s per-layer features: spatial means of the named modules' outputs ("features" = the head's
    input), differentiable."""
    out, handles = {}, []
    for name in layers:
        if name == "features":
            handles.append(model.fc.register_forward_pre_hook(lambda _m, i: out.__setitem__("features", i[0])))
        else:
            handles.append(getattr(model, name).register_forward_hook(
                lambda _m, _i, o, n=name: out.__setitem__(n, o.flatten(2).mean(dim=2) if o.ndim > 2 else o)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [out[k].double() for k in layers]


def fit_gaussians(model, x, y, layers=MAHA_LAYERS):
    """Class means and the tied precision per layer: sklearn EmpiricalCovariance on class-centred features."""
    y = y.numpy()
    with torch.no_grad():
        feats = [f.numpy() for f in layer_means(model, x, layers)]
    out = []
    for f in feats:
        means = np.stack([f[y == c].mean(0) for c in range(int(y.max()) + 1)])
        out.append((torch.from_numpy(means), torch.from_numpy(EmpiricalCovariance().fit(f - means[y]).precision_)))
    return out


def sqdists(f, means, prec):
    d = f[:, None, :] - means[None]
    return torch.einsum("ncd,de,nce->nc", d, prec, d)


def ref_maha(model, x, gaussians, layers=MAHA_LAYERS):
    with torch.no_grad():
        return torch.stack([-sqdists(f, m, p).amin(1) for f, (m, p) in zip(layer_means(model, x, layers), gaussians)],
                           dim=1).numpy()


def ref_maha_preprocessed(model, x, gaussians, eps, std, layers=MAHA_LAYERS):
    """Per layer: ``x - eps * sign(grad_x 1/2 d^2_c(x)) / std`` with c the closest class at x, then the score."""
    cols = []
    for k, (means, prec) in enumerate(gaussians):
        def half_sqdist(xi):
            f = layer_means(model, xi, layers)[k]
            c = sqdists(f.detach(), means, prec).argmin(1)
            d = f - means[c]
            return 0.5 * (d @ prec * d).sum()

        xp = x - eps * torch.sign(per_sample_input_grad(x, half_sqdist)) / _std_tensor(std, x)
        cols.append(ref_maha(model, xp.detach(), gaussians, layers)[:, k])
    return np.stack(cols, axis=1)


def ref_fgsm(model, x, step, std):
    """FGSM negatives: ``x + step * sign(grad_x CE(f(x), argmax f(x))) / std``."""
    def ce(xi):
        f = model(xi)
        return torch.nn.functional.cross_entropy(f, f.argmax(dim=1))

    return (x + step * torch.sign(per_sample_input_grad(x, ce)) / _std_tensor(std, x)).detach()


@pytest.fixture(scope="module")
def maha_data():
    model = seeded(BNCNN, 60, F64)
    x_fit, y_fit = make_inputs(32, 2, 5, 5, seed=61, dtype=F64), make_labels(32, 4, seed=61)
    x_test = make_inputs(12, 2, 5, 5, seed=62, dtype=F64)
    return model, x_fit, y_fit, x_test, fit_gaussians(model, x_fit, y_fit)


def _maha_sig(model, x, y=None, batch_size=8):
    return _sig(model, x, y, batch_size=batch_size, input_std=CNN_STD)


def test_mahalanobis_ensemble_per_layer_scores_equal_a_direct_computation(maha_data):
    model, x_fit, y_fit, x_test, gaussians = maha_data
    det = gradood.create("mahalanobis-multilayer").fit(_maha_sig(model, x_fit, y_fit))
    assert det.layers_ == MAHA_LAYERS  # default: activation modules reached once, plus the penultimate features
    assert det.tunes_on_ood is False
    for g, (means, prec) in zip(det.gaussians_, gaussians):
        np.testing.assert_allclose(g.means, means, rtol=1e-10)
        np.testing.assert_allclose(g.precision, prec, rtol=1e-6)
    test = _maha_sig(model, x_test)
    per_layer = test.get(det.requests()[0]).numpy()
    ref = ref_maha(model, x_test, gaussians)
    np.testing.assert_allclose(per_layer, ref, rtol=1e-6)
    fit_ref = ref_maha(model, x_fit, gaussians)  # mean-z: ID fit statistics
    z = (ref - fit_ref.mean(0)) / fit_ref.std(0, ddof=1)
    np.testing.assert_allclose(det.score(test), z.mean(1), rtol=1e-6)


def test_mahalanobis_ensemble_penultimate_layer_is_the_single_layer_detector(maha_data):
    model, x_fit, y_fit, x_test, _ = maha_data
    single = gradood.create("mahalanobis").fit(_maha_sig(model, x_fit, y_fit)).score(_maha_sig(model, x_test))
    det = gradood.create("mahalanobis-ensemble", combine="features").fit(_maha_sig(model, x_fit, y_fit))
    assert det.tunes_on_ood is False
    np.testing.assert_allclose(det.score(_maha_sig(model, x_test)), single, rtol=1e-8)


@pytest.mark.parametrize("eps", [0.0005, 0.01])
def test_mahalanobis_preprocessing_descends_the_closest_class_distance(maha_data, eps):
    model, x_fit, y_fit, x_test, gaussians = maha_data
    det = gradood.create("mahalanobis-multilayer", eps=eps).fit(_maha_sig(model, x_fit, y_fit))
    got = _maha_sig(model, x_test).get(det.requests()[0]).numpy()
    np.testing.assert_allclose(got, ref_maha_preprocessed(model, x_test, gaussians, eps, CNN_STD), rtol=1e-6)
    unperturbed = ref_maha(model, x_test, gaussians)
    assert not np.allclose(got, unperturbed)
    if eps < 0.001:  # a small step does not increase the closest-class distance (the score does not drop)
        assert np.all(got >= unperturbed - 1e-9 * np.abs(unperturbed))


def test_mahalanobis_fgsm_negatives_are_ood_free(maha_data):
    model, x_fit, y_fit, x_test, gaussians = maha_data
    det = gradood.create("mahalanobis-ensemble-fgsm")
    assert det.tunes_on_ood is False and det.info()["tunes_on_ood"] is False
    det.fit(_maha_sig(model, x_fit, y_fit))  # no ood_val needed
    # the LR contrasts the ID scores with those of FGSM-perturbed ID samples (step 0.05 / std)
    pos = ref_maha(model, x_fit, gaussians)
    neg = ref_maha(model, ref_fgsm(model, x_fit, 0.05, CNN_STD), gaussians)
    assert not np.allclose(neg, pos)
    ref = _lr_ref(pos, neg, ref_maha(model, x_test, gaussians))
    np.testing.assert_allclose(det.score(_maha_sig(model, x_test)), ref, rtol=1e-5, atol=1e-6)


def test_mahalanobis_lr_with_ood_negatives_needs_ood_val(maha_data):
    model, x_fit, y_fit, x_test, gaussians = maha_data
    for name in ("mahalanobis-ensemble", "mahalanobis-ensemble-tuned"):
        det = gradood.create(name, epsilons=(0.0, 0.002))
        assert det.tunes_on_ood is True
        with pytest.raises(gradood.TuningDataError, match="ood_val"):
            det.fit(_maha_sig(model, x_fit, y_fit))
    assert gradood.create("mahalanobis-ensemble-tuned", negatives="fgsm").tunes_on_ood is False
    x_id = make_inputs(16, 2, 5, 5, seed=63, dtype=F64)
    x_ood = make_inputs(16, 2, 5, 5, seed=64, dtype=F64) * 2.0
    det = gradood.create("mahalanobis-ensemble").fit(_maha_sig(model, x_fit, y_fit), ood_val=_maha_sig(model, x_ood),
                                                     id_val=_maha_sig(model, x_id))
    ref = _lr_ref(ref_maha(model, x_id, gaussians), ref_maha(model, x_ood, gaussians),
                  ref_maha(model, x_test, gaussians))
    np.testing.assert_allclose(det.score(_maha_sig(model, x_test)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", ["ood", "fgsm"])
def test_mahalanobis_eps_tuning_works_with_dataloaders(maha_data, negatives):
    model, x_fit, y_fit, x_test, _ = maha_data
    x_ood = make_inputs(16, 2, 5, 5, seed=64, dtype=F64) * 2.0
    kw = dict(epsilons=(0.0, 0.01), negatives=negatives)
    probe = gradood.Probe(model, input_std=CNN_STD)
    ood = {"ood_val": probe.signals(x_ood, progress=False)} if negatives == "ood" else {}
    ref = gradood.create("mahalanobis-ensemble-tuned", **kw).fit(probe.signals((x_fit, y_fit), progress=False), **ood)
    ood = {"ood_val": probe.signals(_loader(x_ood), progress=False)} if negatives == "ood" else {}
    det = gradood.create("mahalanobis-ensemble-tuned", **kw).fit(probe.signals(_loader(x_fit, y_fit), progress=False),
                                                                 **ood)
    assert det.eps_ == ref.eps_
    test = probe.signals(x_test, progress=False)
    np.testing.assert_allclose(det.score(test), ref.score(test), rtol=1e-6)


def test_mahalanobis_ensemble_needs_labels(maha_data):
    model, x_fit, _, _, _ = maha_data
    with pytest.raises(gradood.InputError, match="labels"):
        gradood.create("mahalanobis-multilayer").fit(_maha_sig(model, x_fit))


@pytest.mark.parametrize("kwargs", [{"eps": -0.001}, {"negatives": "noise"}, {"fgsm_step": -0.05},
                                    {"epsilons": ()}, {"val_split": 0.0}, {"combine": None}])
def test_mahalanobis_ensemble_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(gradood.ConfigError):
        gradood.create("mahalanobis-ensemble", **kwargs)
