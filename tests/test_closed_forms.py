"""The library's core claim: last-layer gradient scores need ONE forward pass and no backward.

Every closed form (docs/methods.md section 1, 2.3, 2.4, 2.5, 3.10) is compared with a plain per-sample
autograd reference: loop over the samples, build that sample's loss from the model's output with an
independent definition of the loss, and ask ``torch.autograd.grad`` for the gradient w.r.t. the head's
weight (and bias). The fast scores come through the real path: ``Probe(model).signals(x)`` +
``gradood.create(name, ...)``.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import gradood
from conftest import MLP, ConvHeadNet, SeqHeadNet, SmallCNN, make_inputs, seeded
from gradood.grads.head import expected_logprob_grad_output_term, head_grad_norm, loss_delta

N = 9          # samples per test
BATCH = 4      # probe batch size (several batches, the last one partial)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------------------- models
def _model_and_inputs(kind: str, dtype: torch.dtype):
    """(model, inputs, probe head name or None). Logit scales make the softmax far from uniform."""
    if kind == "mlp":
        return seeded(MLP, 0, dtype, logit_scale=3.0), make_inputs(N, 6, seed=1, dtype=dtype), None
    if kind == "mlp-signed":
        return seeded(MLP, 2, dtype, signed=True, logit_scale=4.0), make_inputs(N, 6, seed=2, dtype=dtype), None
    if kind == "mlp-nobias":
        return seeded(MLP, 3, dtype, bias=False, logit_scale=3.0), make_inputs(N, 6, seed=3, dtype=dtype), None
    if kind == "cnn":
        return seeded(SmallCNN, 4, dtype, logit_scale=4.0), make_inputs(N, 2, 5, 5, seed=4, dtype=dtype), None
    if kind == "seqhead":
        return seeded(SeqHeadNet, 5, dtype, logit_scale=1.5), make_inputs(N, 6, seed=5, dtype=dtype), None
    if kind == "conv1x1-head":
        return seeded(ConvHeadNet, 6, dtype, logit_scale=4.0), make_inputs(N, 2, 5, 5, seed=6, dtype=dtype), "cls"
    raise AssertionError(kind)


MODELS = ["mlp", "mlp-signed", "mlp-nobias", "cnn", "seqhead", "conv1x1-head"]
DTYPES = [torch.float32, torch.float64]


class _Head:
    """The head module as the test knows it (not as the probe found it), for the autograd reference."""

    def __init__(self, model):
        self.head = model.cls if isinstance(model, ConvHeadNet) else (
            model.head[0] if isinstance(model, SeqHeadNet) else model.fc)


def _signals(model, x, head=None):
    """A lazy Signals over ``x``: the detectors trigger the (batched) forward pass themselves."""
    probe = gradood.Probe(model, head=head)
    return _Head(model), probe.signals(x, batch_size=BATCH, progress=False)


# ----------------------------------------------------------------------------------------- reference
def _kl_uniform(z, T):
    C = z.numel()
    logp = F.log_softmax(z / T, dim=0)
    return ((1.0 / C) * (math.log(1.0 / C) - logp)).sum()


def _ones(z, T):
    return -F.log_softmax(z / T, dim=0).sum()


def _pred_ce(z, T):
    return -F.log_softmax(z / T, dim=0)[z.argmax()]


def _sumexp(z, T):
    return torch.exp(z).sum()


def _energy(z, T):
    return torch.logsumexp(z, dim=0)


LOSSES = {"kl_uniform": _kl_uniform, "ones": _ones, "pred_ce": _pred_ce, "sumexp": _sumexp, "energy": _energy}


def _head_params(head, include_bias):
    ps = [head.weight]
    if include_bias and head.bias is not None:
        ps.append(head.bias)
    return ps


def per_sample_grads(model, head, x, loss_fn, include_bias):
    """``N x P``: each sample's gradient of ``loss_fn(logits)`` w.r.t. the head weight (and bias)."""
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        z = model(x[i: i + 1]).reshape(-1)
        g = torch.autograd.grad(loss_fn(z), _head_params(head, include_bias))
        rows.append(torch.cat([t.reshape(-1) for t in g]).detach())
    return torch.stack(rows)


def norms(g):
    return {"l1": g.abs().sum(dim=1), "l2": g.norm(dim=1), "l2sq": g.pow(2).sum(dim=1)}


def per_sample_expected_norms(model, head, x, T, include_bias):
    """ExGrad reference: ``E_{y ~ p_T} ||d log softmax(z/T)_y / d head||`` by C backward passes per sample."""
    model.eval()
    out = {"l1": [], "l2": [], "l2sq": []}
    params = _head_params(head, include_bias)
    for i in range(x.shape[0]):
        z = model(x[i: i + 1]).reshape(-1)
        logp = F.log_softmax(z / T, dim=0)
        p = logp.detach().exp()
        acc = {k: 0.0 for k in out}
        for y in range(z.numel()):
            g = torch.autograd.grad(logp[y], params, retain_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g]).double()
            for k, v in norms(flat[None]).items():
                acc[k] = acc[k] + p[y].double() * v[0]
        for k in out:
            out[k].append(acc[k])
    return {k: torch.stack(v) for k, v in out.items()}


def _assert_close(actual, expected, dtype, what):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=0.0, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------- sanity of the setup
@pytest.mark.parametrize("kind", ["mlp-signed", "seqhead"])
def test_signed_models_really_have_mixed_sign_features(kind):
    model, x, head = _model_and_inputs(kind, torch.float64)
    _, s = _signals(model, x, head)
    h = s.features
    # every sample has both signs, so ||h||_1 != sum h and the L1 factorisation is tested for any sign pattern
    assert bool(((h > 0).any(dim=1) & (h < 0).any(dim=1)).all())


# ----------------------------------------------------------------------------------------- GradNorm
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("loss", ["kl_uniform", "ones"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", MODELS)
def test_gradnorm_equals_autograd(kind, dtype, loss, T):
    model, x, head_name = _model_and_inputs(kind, dtype)
    probe, s = _signals(model, x, head_name)
    g_all = per_sample_grads(model, probe.head, x, lambda z: LOSSES[loss](z, T), include_bias=True)
    n_w = probe.head.weight.numel()
    # (include_bias on a bias-free head is covered by test_include_bias_on_a_bias_free_head)
    for include_bias in (False, True) if probe.head.bias is not None else (False,):
        g = g_all if include_bias else g_all[:, :n_w]
        for norm, ref in norms(g.double()).items():
            det = gradood.create("gradnorm", temperature=T, norm=norm, include_bias=include_bias, loss=loss)
            fast = det.score(s)
            _assert_close(fast, ref, dtype, f"gradnorm {kind} loss={loss} norm={norm} bias={include_bias} T={T}")


@pytest.mark.parametrize("name", ["gradnorm", "exgrad-id", "rg-eq5"])
def test_include_bias_on_a_bias_free_head(name):
    """A head without a bias has no bias gradient: ``include_bias=True`` must give the weight-only gradient
    norm (all the head's parameters) or refuse clearly -- not the norm of a bias that does not exist."""
    model, x, _ = _model_and_inputs("mlp-nobias", torch.float64)
    probe, s = _signals(model, x)
    assert probe.head.bias is None
    if name == "gradnorm":
        ref = norms(per_sample_grads(model, probe.head, x, lambda z: _kl_uniform(z, 1.0), True))["l1"]
    elif name == "exgrad-id":
        ref = per_sample_expected_norms(model, probe.head, x, 1.0, True)["l1"]
    else:
        ref = norms(per_sample_grads(model, probe.head, x, lambda z: _sumexp(z, 1.0), True))["l1"].log()
    det = gradood.create(name, include_bias=True)
    try:
        fast = det.score(s)
    except gradood.GradoodError as e:
        assert "bias" in str(e)
        return
    _assert_close(fast, ref, torch.float64, f"{name} include_bias=True on a bias-free head")


def test_gradnorm_default_is_the_paper_definition():
    """Default hyperparameters: KL to uniform, L1, weights only, T = 1 (docs/methods.md 3.10)."""
    model, x, _ = _model_and_inputs("mlp", torch.float64)
    probe, s = _signals(model, x)
    ref = norms(per_sample_grads(model, probe.head, x, lambda z: _kl_uniform(z, 1.0), False))["l1"]
    _assert_close(gradood.create("gradnorm").score(s), ref, torch.float64, "gradnorm defaults")


# ----------------------------------------------------------------------------------------- ExGrad
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mlp", "mlp-signed", "cnn", "seqhead", "conv1x1-head"])
def test_exgrad_equals_expectation_of_autograd_norms(kind, dtype, T):
    model, x, head_name = _model_and_inputs(kind, dtype)
    probe, s = _signals(model, x, head_name)
    for include_bias in (False, True):
        ref = per_sample_expected_norms(model, probe.head, x, T, include_bias)
        for norm in ("l1", "l2", "l2sq"):
            raw = gradood.create("exgrad-id", temperature=T, norm=norm, include_bias=include_bias).score(s)
            _assert_close(raw, ref[norm], dtype, f"exgrad {kind} norm={norm} bias={include_bias} T={T}")
            neg = gradood.create("exgrad", temperature=T, norm=norm, include_bias=include_bias).score(s)
            _assert_close(-neg, ref[norm], dtype, f"exgrad (default sign) {kind} norm={norm}")


# ----------------------------------------------------------------------------------------- RG eq. 5
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mlp", "mlp-signed", "cnn", "seqhead", "conv1x1-head"])
def test_rg_eq5_is_log_of_sumexp_gradient_l1(kind, dtype):
    model, x, head_name = _model_and_inputs(kind, dtype)
    probe, s = _signals(model, x, head_name)
    for include_bias in (False, True):
        g = per_sample_grads(model, probe.head, x, lambda z: _sumexp(z, 1.0), include_bias).double()
        ref = g.abs().sum(dim=1).log()
        fast = gradood.create("rg-eq5", include_bias=include_bias).score(s)
        # log form: an absolute tolerance on the log is a relative one on eq. 5 itself
        torch.testing.assert_close(torch.as_tensor(fast), ref, rtol=0.0, atol=RTOL[dtype])


def test_rg_eq5_log_form_does_not_overflow_for_large_logits():
    """Logits above ~88 overflow exp() in float32; the log form must stay finite and exact."""
    model = seeded(MLP, 7, torch.float32, logit_shift=200.0)
    x = make_inputs(N, 6, seed=7)
    _, s = _signals(model, x)
    f, h = s.logits.double(), s.features.double()
    ref = torch.logsumexp(f, dim=1) + h.abs().sum(dim=1).log()  # float64 reference
    fast = torch.as_tensor(gradood.create("rg-eq5").score(s))
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=2e-6, atol=0.0)  # float32 model: scored in float32


# ----------------------------------------------------------------------------------------- grads/head.py
# sumexp and energy are defined without a temperature: only T = 1 applies to them
LOSS_T = [(loss, T) for loss in LOSSES for T in (1.0, 2.5) if T == 1.0 or loss not in ("sumexp", "energy")]


@pytest.mark.parametrize("loss,T", LOSS_T)
def test_loss_delta_equals_autograd_wrt_logits(loss, T):
    z = make_inputs(7, 6, seed=11, dtype=torch.float64, scale=3.0)
    ref = []
    for i in range(z.shape[0]):
        zi = z[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(LOSSES[loss](zi, T), zi)
        ref.append(g)
    torch.testing.assert_close(loss_delta(loss, z, T), torch.stack(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mlp-signed", "seqhead", "conv1x1-head"])  # (ReLU MLP/CNN: detector tests)
def test_head_grad_norm_equals_autograd_for_every_named_loss(kind, dtype, loss):
    model, x, head_name = _model_and_inputs(kind, dtype)
    probe, s = _signals(model, x, head_name)
    Ts = (1.0,) if loss in ("sumexp", "energy") else (1.0, 2.5)
    n_w = probe.head.weight.numel()
    for T in Ts:
        g_all = per_sample_grads(model, probe.head, x, lambda z: LOSSES[loss](z, T), include_bias=True).double()
        delta = loss_delta(loss, s.logits.double(), T)
        for include_bias in (False, True):
            g = g_all if include_bias else g_all[:, :n_w]
            for norm, ref in norms(g).items():
                fast = head_grad_norm(delta, s.features.double(), norm, include_bias)
                _assert_close(fast, ref, dtype, f"head_grad_norm {kind} {loss} {norm} bias={include_bias} T={T}")


# ----------------------------------------------------------------------------------------- U x V family
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mlp", "mlp-signed", "cnn", "seqhead"])
def test_output_feature_family_gradient_instances(kind, dtype, T):
    model, x, head_name = _model_and_inputs(kind, dtype)
    probe, s = _signals(model, x, head_name)
    # gradnorm x l1 = T * ||d KL(u || p_T) / dW||_1
    kl = norms(per_sample_grads(model, probe.head, x, lambda z: _kl_uniform(z, T), False).double())["l1"]
    got = gradood.create("output-feature", output_term="gradnorm", feature_term="l1", temperature=T).score(s)
    _assert_close(got, T * kl, dtype, "gradnorm x l1")
    # exgrad x l1 (raw orientation) = (T / 2) * E_y ||d log p_T,y / dW||_1
    ex = per_sample_expected_norms(model, probe.head, x, T, False)["l1"]
    got = gradood.create("output-feature", output_term="exgrad", feature_term="l1", temperature=T,
                         higher_is_id=True).score(s)
    _assert_close(got, (T / 2.0) * ex, dtype, "exgrad x l1")
    # default orientation of the uncertainty-type term is flipped (higher = more ID)
    got = gradood.create("output-feature", output_term="exgrad", feature_term="l1", temperature=T).score(s)
    _assert_close(-got, (T / 2.0) * ex, dtype, "exgrad x l1, default sign")
    # one x l1 = ||d LSE(f) / dW||_1 (Wu et al.'s energy target: ||softmax||_1 = 1)
    en = norms(per_sample_grads(model, probe.head, x, lambda z: _energy(z, 1.0), False).double())["l1"]
    got = gradood.create("output-feature", output_term="one", feature_term="l1").score(s)
    _assert_close(got, en, dtype, "one x l1")


# ----------------------------------------------------------------------------------------- ExGrad output term
def _mp_expected_output_term(z_row, T, norm):
    """``E_{y ~ p_T} ||(e_y - p_T)/T||`` by explicit enumeration over y, in 50-digit arithmetic (mpmath)."""
    mp = mpmath.mp.clone()
    mp.dps = 50
    zz = [mp.mpf(float(v)) / mp.mpf(T) for v in z_row]
    m = max(zz)
    e = [mp.exp(v - m) for v in zz]
    S = mp.fsum(e)
    p = [v / S for v in e]
    total = mp.mpf(0)
    for y in range(len(p)):
        d = [((1 if k == y else 0) - p[k]) / mp.mpf(T) for k in range(len(p))]
        if norm == "l1":
            n = mp.fsum(abs(v) for v in d)
        elif norm == "l2sq":
            n = mp.fsum(v * v for v in d)
        else:
            n = mp.sqrt(mp.fsum(v * v for v in d))
        total += p[y] * n
    return float(total)


@pytest.mark.parametrize("norm", ["l1", "l2", "l2sq"])
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_expected_output_term_by_enumeration(T, norm):
    """ExGrad's output factor vs enumeration over y in high precision, including confident rows
    (p_max ~ 1 - 1e-9 and closer), where float64 cancellation would show."""
    z = make_inputs(6, 7, seed=12, dtype=torch.float64, scale=4.0)
    z[4, 2] += 20.0  # very confident rows
    z[5, 0] += 35.0
    ref = torch.tensor([_mp_expected_output_term(z[i].tolist(), T, norm) for i in range(z.shape[0])],
                       dtype=torch.float64)
    got = expected_logprob_grad_output_term(z, T, norm)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("norm", ["l1", "l2", "l2sq"])
def test_exgrad_keeps_precision_for_confident_predictions(norm):
    """p_max ~ 1 (float32 logits with a margin of 40): ExGrad must not cancel to 0 or lose digits
    (docs/methods.md 2.4 numerics). Reference: enumeration over y in 50-digit arithmetic."""
    C, margin = 6, 40.0
    logits = torch.zeros(3, C, dtype=torch.float32)
    logits[:, 0] = margin
    logits[1, 3] = 5.0
    h = torch.ones(3, 4)
    s = gradood.Signals.from_arrays(logits=logits, features=h)
    feat = {"l1": 4.0, "l2": 2.0, "l2sq": 4.0}[norm]
    ref = torch.tensor([_mp_expected_output_term(r.tolist(), 1.0, norm) * feat for r in logits], dtype=torch.float64)
    got = gradood.create("exgrad-id", norm=norm).score(s)
    assert got.min() > 0
    # float32 signals are scored in float32: the error is float32 rounding (~1e-7), not cancellation (O(1))
    torch.testing.assert_close(torch.as_tensor(got), ref, rtol=1e-6, atol=0.0)
