"""Gradient detectors built on the per-sample gradient engine: GRODIN (docs/methods.md 2.6) and low-dimensional
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
from conftest import probe_signals as _sig
from conftest import std_tensor as _std_tensor
from gradood.detectors.base import detector_class

F64 = torch.float64
CNN_STD = (0.5, 0.25)  # per-channel input std given to the probe: the perturbation step is eps * sign / std


# ============================================================================================ references
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
    """docs/methods.md 5.3: with T = 1, eps = 0 the S part is MSP (equal values); SG = S^2 * G."""
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


# ============================================================================================ low-dim gradients
N_FIT, N_CLUSTERS, K = 60, 4, 3


@pytest.fixture(scope="module")
def lowdim():
    """A 2-layer float64 MLP (P = 197; hidden unit 0 is dead on every input, so 12 gradient entries have zero
    variance), N = 60 labelled fit samples in 4 tight clusters (a clear gap after the 3rd singular value of Z,
    so that 3 power iterations converge), 20 test samples, and the explicit references."""
    model = seeded(MLP, 3, F64, d_in=6, hidden=16, n_classes=5, logit_scale=2.0)
    with torch.no_grad():
        model.body[0].bias[0] = -50.0
    centres = make_inputs(N_CLUSTERS, 6, seed=7, dtype=F64)
    x = centres.repeat(N_FIT // N_CLUSTERS, 1) + 0.02 * make_inputs(N_FIT, 6, seed=8, dtype=F64)
    y = make_labels(N_FIT, 5, seed=9)
    x_test = make_inputs(20, 6, seed=10, dtype=F64)
    G, G_test = energy_grads(model, x), energy_grads(model, x_test)
    mu = G.mean(dim=0)
    sigma = G.std(dim=0, unbiased=False)  # population std
    I2 = 1.0 / sigma
    finite = torch.isfinite(I2)
    assert int((~finite).sum()) >= 12
    I2[~finite] = I2[finite].max()
    Z, Z_test = (G - mu) * I2, (G_test - mu) * I2
    _, svals, Vh = torch.linalg.svd(Z, full_matrices=False)
    assert svals[K] / svals[K - 1] < 0.1  # the gap the tolerance below relies on
    return dict(model=model, x=x, y=y, x_test=x_test, mu=mu, I2=I2, Z=Z, Z_test=Z_test, V_ref=Vh[:K].T,
                fit=_sig(model, x, y, batch_size=16), test=_sig(model, x_test, batch_size=16))


def _basis(det, model):
    return flat_dirs(model, det.basis_.basis.directions)


def test_lowdim_normalisation_is_mean_and_population_std_of_energy_gradients(lowdim):
    model = lowdim["model"]
    det = gradood.create("lowdim", k_dims=K, power_iters=3).fit(lowdim["fit"])
    b = det.basis_.basis
    np.testing.assert_allclose(flat_vec(model, b.center), lowdim["mu"], rtol=1e-10, atol=1e-14)
    # 1/sigma, with the infinite entries (zero variance) replaced by the largest finite one
    np.testing.assert_allclose(flat_vec(model, b.scale), lowdim["I2"], rtol=1e-8)


@pytest.mark.parametrize("iters", [3, 5])
def test_lowdim_pca_basis_is_the_top_k_right_singular_subspace(lowdim, iters):
    model = lowdim["model"]
    det = gradood.create("lowdim", k_dims=K, power_iters=iters).fit(lowdim["fit"])
    V, V_ref = _basis(det, model), lowdim["V_ref"]
    assert V.shape == (197, K) and det.k_dims_ == K
    np.testing.assert_allclose(V.T @ V, np.eye(K), atol=1e-10)  # orthonormal columns
    np.testing.assert_allclose(V @ V.T, V_ref @ V_ref.T, atol=1e-6)  # same projector
    cosines = torch.linalg.svdvals(V.T @ V_ref)  # cosines of the principal angles
    np.testing.assert_allclose(cosines, np.ones(K), atol=1e-9)
    # ordered like the singular values: column k is +-the k-th right singular vector
    np.testing.assert_allclose((V * V_ref).sum(0).abs(), np.ones(K), atol=1e-5)


def test_lowdim_without_power_iterations_is_only_approximate(lowdim):
    """Guards the tolerance above: the refinements matter at this gap."""
    det = gradood.create("lowdim", k_dims=K, power_iters=0).fit(lowdim["fit"])
    V, V_ref = _basis(det, lowdim["model"]), lowdim["V_ref"]
    assert float((V @ V.T - V_ref @ V_ref.T).abs().max()) > 1e-5


def test_lowdim_projections_equal_z_times_v(lowdim):
    model = lowdim["model"]
    det = gradood.create("lowdim", k_dims=K, power_iters=3).fit(lowdim["fit"])
    V = _basis(det, model)
    np.testing.assert_allclose(lowdim["test"].get(det.request_), lowdim["Z_test"] @ V, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lowdim["fit"].get(det.request_), lowdim["Z"] @ V, rtol=1e-9, atol=1e-12)


def test_lowdim_average_subspace_is_the_normalised_class_mean_gradients(lowdim):
    model, Z, y = lowdim["model"], lowdim["Z"], lowdim["y"]
    det = gradood.create("lowdim-avg-knn").fit(lowdim["fit"])
    # (mean_c g - mu) * I2 = mean_c z; L2-normalised columns, not orthogonalised
    ref = torch.stack([Z[y == c].mean(dim=0) for c in range(5)], dim=1)
    ref = ref / ref.norm(dim=0, keepdim=True)
    V = _basis(det, model)
    assert V.shape == (197, 5) and det.k_dims_ == 5
    np.testing.assert_allclose(V, ref, rtol=1e-8, atol=1e-12)
    assert not np.allclose(V.T @ V, np.eye(5), atol=1e-3)
    np.testing.assert_allclose(lowdim["test"].get(det.request_), lowdim["Z_test"] @ ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("subspace,knn_k", [("pca", 5), ("average", 3)])
def test_lowdim_knn_head_equals_sklearn_nearest_neighbours(lowdim, subspace, knn_k):
    model = lowdim["model"]
    det = gradood.create("lowdim", subspace=subspace, k_dims=K, power_iters=3, knn_k=knn_k).fit(lowdim["fit"])
    V = _basis(det, model).numpy()
    bank = normalize(lowdim["Z"].numpy() @ V)
    query = normalize(lowdim["Z_test"].numpy() @ V)
    dist, _ = NearestNeighbors(n_neighbors=knn_k).fit(bank).kneighbors(query)
    # the bank is float32 (as FAISS): ~1e-6 absolute on distances of order 0.01-1
    np.testing.assert_allclose(det.score(lowdim["test"]), -dist[:, knn_k - 1], rtol=1e-5, atol=1e-5)


def test_lowdim_mahalanobis_head_equals_a_direct_computation(lowdim):
    model, y = lowdim["model"], lowdim["y"].numpy()
    det = gradood.create("lowdim-pca-mahalanobis", k_dims=K, power_iters=3, probe_epochs=1).fit(lowdim["fit"])
    V = _basis(det, model).numpy()
    z_fit, z_test = lowdim["Z"].numpy() @ V, lowdim["Z_test"].numpy() @ V
    means = np.stack([z_fit[y == c].mean(0) for c in range(5)])
    prec = EmpiricalCovariance().fit(z_fit - means[y]).precision_
    d = z_test[:, None, :] - means[None]
    ref = -np.einsum("ncd,de,nce->nc", d, prec, d).min(axis=1)
    np.testing.assert_allclose(det.score(lowdim["test"]), ref, rtol=1e-7)


@pytest.mark.parametrize("name", ["lowdim-pca-msp", "lowdim-pca-energy", "lowdim-avg-energy"])
def test_lowdim_probe_heads_give_finite_deterministic_scores(lowdim, name):
    kw = {"k_dims": K, "power_iters": 3} if "pca" in name else {}
    det = gradood.create(name, probe_epochs=3, **kw).fit(lowdim["fit"])
    s = det.score(lowdim["test"])
    assert s.shape == (20,) and s.dtype == np.float64 and np.isfinite(s).all()
    assert np.ptp(s) > 0
    if name.endswith("msp"):
        assert np.all((s >= 1 / 5) & (s <= 1))
    # the probe (BatchNorm1d -> Linear) reads the projections; its scores are its softmax / logsumexp
    z = torch.as_tensor(lowdim["Z_test"].numpy() @ _basis(det, lowdim["model"]).numpy()).float()
    with torch.no_grad():
        logits = det.probe_(z).double()
    ref = torch.softmax(logits, 1).amax(1) if name.endswith("msp") else torch.logsumexp(logits, 1)
    np.testing.assert_allclose(s, ref.numpy(), rtol=1e-5, atol=1e-6)
    again = gradood.create(name, probe_epochs=3, **kw).fit(_sig(lowdim["model"], lowdim["x"], lowdim["y"], 16))
    np.testing.assert_array_equal(again.score(lowdim["test"]), s)  # seeded probe training


def test_lowdim_k_larger_than_the_fit_samples_is_a_config_error(lowdim):
    with pytest.raises(gradood.ConfigError, match=r"k_dims=61.*fit samples=60"):
        gradood.create("lowdim", k_dims=61).fit(lowdim["fit"])


def test_lowdim_k_larger_than_the_parameter_count_is_a_config_error():
    model = seeded(MLP, 4, F64, d_in=2, hidden=3, n_classes=2)  # P = 17
    s = _sig(model, make_inputs(30, 2, seed=4, dtype=F64), make_labels(30, 2, seed=4))
    with pytest.raises(gradood.ConfigError, match=r"k_dims=20.*parameters=17"):
        gradood.create("lowdim", k_dims=20).fit(s)
    gradood.create("lowdim", k_dims=17, power_iters=1).fit(s)  # K = P is allowed


def test_lowdim_k_equal_to_the_fit_samples_is_refused_or_orthonormal(lowdim):
    """Z is centred, so its rank is at most N - 1: K = N directions cannot all be principal directions. Either
    refuse K = N (as K > N is refused) or return an orthonormal basis -- not a numerically random last column."""
    model = lowdim["model"]
    s = _sig(model, lowdim["x"][:20], lowdim["y"][:20], batch_size=16)
    try:
        det = gradood.create("lowdim", k_dims=20, power_iters=2, knn_k=2).fit(s)
    except gradood.ConfigError as e:
        assert "k_dims" in str(e)
        return
    V = _basis(det, model)
    np.testing.assert_allclose(V.T @ V, np.eye(20), atol=1e-8)


def test_lowdim_fit_subset_from_a_dataloader_equals_the_array_fit(lowdim):
    """n_fit < N (default n_fit=5000: any larger training set) fits on a seeded subset; the data may come as a
    DataLoader, the usual way, and must give the same result as the same data passed as arrays."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = lowdim["model"], lowdim["x"], lowdim["y"]
    kw = dict(k_dims=K, power_iters=3, knn_k=3, n_fit=40)
    ref = gradood.create("lowdim", **kw).fit(_sig(model, x, y, batch_size=16)).score(lowdim["test"])
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    s = gradood.Probe(model).signals(loader, progress=False)
    got = gradood.create("lowdim", **kw).fit(s).score(lowdim["test"])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"subspace": "average"}, {"head": "msp"}, {"head": "energy"},
                                    {"head": "mahalanobis"}])
def test_lowdim_heads_that_need_labels_say_so(lowdim, kwargs):
    s = _sig(lowdim["model"], lowdim["x"], batch_size=16)  # no labels
    with pytest.raises(gradood.InputError, match="labels"):
        gradood.create("lowdim", k_dims=K, power_iters=1, **kwargs).fit(s)


def test_lowdim_needs_the_model_not_arrays(lowdim):
    arrays = gradood.Signals.from_arrays(logits=lowdim["fit"].logits, features=lowdim["fit"].features,
                                         labels=lowdim["y"])
    with pytest.raises(gradood.InputError, match="probe.signals"):
        gradood.create("lowdim", k_dims=K).fit(arrays)


@pytest.mark.parametrize("kwargs", [{"k_dims": 0}, {"knn_k": 0}, {"power_iters": -1}, {"ensemble": -1.0},
                                    {"ensemble": float("inf")}, {"n_fit": 1}, {"subspace": "svd"},
                                    {"head": "rankfeat"}])
def test_lowdim_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(gradood.ConfigError):
        gradood.create("lowdim", **kwargs)


def test_lowdim_variants_share_the_basis_without_rerunning_the_model(lowdim):
    model = lowdim["model"]
    s = _sig(model, lowdim["x"], lowdim["y"], batch_size=16)
    first = gradood.create("lowdim", k_dims=K, power_iters=2).fit(s)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        second = gradood.create("lowdim-pca-energy", k_dims=K, power_iters=2, probe_epochs=1).fit(s)
        third = gradood.create("lowdim-pca-mahalanobis", k_dims=K, power_iters=2, probe_epochs=1).fit(s)
        assert calls == []
        assert second.basis_ is first.basis_ and third.basis_ is first.basis_
        assert second.request_.key == first.request_.key
        other = gradood.create("lowdim", k_dims=K + 1, power_iters=2).fit(s)  # other settings: a new fit
        assert len(calls) > 0 and other.basis_ is not first.basis_
    finally:
        handle.remove()


def test_lowdim_ensemble(lowdim):
    """a = 0 is the gradient head alone; a > 0 adds a times the z-scored forward head (same head on the
    penultimate features), both z-scored with the ID fit scores. Unclustered fit data here: with near-duplicate
    samples the float32 kNN distances of the fit statistics lose precision."""
    model, test = lowdim["model"], lowdim["test"]
    fit = _sig(model, make_inputs(40, 6, seed=16, dtype=F64), batch_size=16)
    alone = gradood.create("lowdim", k_dims=K, power_iters=3, knn_k=4).fit(fit)
    zero = gradood.create("lowdim", k_dims=K, power_iters=3, knn_k=4, ensemble=0.0).fit(fit)
    np.testing.assert_array_equal(zero.score(test), alone.score(test))
    a = 2.0
    ens = gradood.create("lowdim", k_dims=K, power_iters=3, knn_k=4, ensemble=a).fit(fit)
    assert ens.basis_ is alone.basis_

    def knn(bank, query):
        d, _ = NearestNeighbors(n_neighbors=4).fit(normalize(bank)).kneighbors(normalize(query))
        return -d[:, 3]

    zf, zt = fit.get(alone.request_).numpy(), test.get(alone.request_).numpy()  # = Z V (tested above)
    hf, ht = fit.features.numpy(), test.features.numpy()
    g_fit, f_fit = knn(zf, zf), knn(hf, hf)  # fit statistics as the detector takes them (self included)
    ref = (knn(zf, zt) - g_fit.mean()) / g_fit.std(ddof=1) + a * (knn(hf, ht) - f_fit.mean()) / f_fit.std(ddof=1)
    np.testing.assert_allclose(ens.score(test), ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ens.score(test), alone.score(test))


def test_lowdim_on_a_model_in_train_mode_scores_as_in_eval_mode():
    model = seeded(BNCNN, 13, F64)
    x, y = make_inputs(16, 2, 5, 5, seed=14, dtype=F64), make_labels(16, 4, seed=14)
    x_test = make_inputs(6, 2, 5, 5, seed=15, dtype=F64)
    ref = gradood.create("lowdim", k_dims=4, power_iters=2, knn_k=2).fit(_sig(model, x, y)).score(_sig(model, x_test))
    trained = copy.deepcopy(model).train()
    det = gradood.create("lowdim", k_dims=4, power_iters=2, knn_k=2).fit(_sig(trained, x, y))
    np.testing.assert_allclose(det.score(_sig(trained, x_test)), ref, rtol=1e-8)
    assert all(m.training for m in trained.modules())
    np.testing.assert_array_equal(trained.bn1.running_mean, model.bn1.running_mean)


# ============================================================================================ registry
def _model_detectors():
    return [n for n in gradood.available() if gradood.create(n).needs_model]


#: small grids and sizes, applied to every detector that has the hyperparameter
SMALL = dict(temperatures=(1.0, 10.0), epsilons=(0.0, 0.002), k_dims=4, power_iters=1, probe_epochs=2, knn_k=3,
             n_noise=8, n_fit=None)


def test_the_registry_has_the_model_based_detectors():
    names = _model_detectors()
    for expected in ("odin", "odin-tuned", "grodin", "grodin-sg-tuned", "fssd", "fssd-lr-eps", "lowdim",
                     "lowdim-avg-knn", "mahalanobis-ensemble", "mahalanobis-ensemble-fgsm"):
        assert expected in names
    assert "msp" not in names and "grodin-lastlayer" not in names  # no perturbation: cached signals suffice


@pytest.fixture(scope="module")
def registry_signals():
    model = seeded(BNCNN, 20)  # float32, BatchNorm in eval mode
    probe = gradood.Probe(model, input_std=CNN_STD, input_mean=(0.1, -0.1))

    def sig(n, seed, scale=1.0, labels=True):
        x = make_inputs(n, 2, 5, 5, seed=seed, scale=scale)
        return probe.signals((x, make_labels(n, 4, seed=seed)) if labels else x, batch_size=8, progress=False)

    return dict(fit=sig(24, 40), id_val=sig(16, 41), ood_val=sig(16, 42, scale=3.0, labels=False),
                test=sig(10, 43, labels=False))


@pytest.mark.parametrize("name", _model_detectors())
def test_every_model_based_detector_fits_and_scores_end_to_end(registry_signals, name):
    if name == "mc-dropout":
        pytest.skip("BNCNN has no dropout (the refusal and a dropout model: test_detectors_gradfamily.py)")
    cls, _ = detector_class(name)
    det = gradood.create(name, **{k: v for k, v in SMALL.items() if k in cls._param_names()})
    kw = dict(ood_val=registry_signals["ood_val"], id_val=registry_signals["id_val"]) if det.tunes_on_ood else {}
    assert det.fit(registry_signals["fit"], **kw) is det
    s = det.score(registry_signals["test"])
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (10,)
    assert np.isfinite(s).all()
    assert np.ptp(s) > 0  # not a constant
