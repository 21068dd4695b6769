"""OpenMax against a reference written here: class mean activation vectors, eucos distances, a Weibull fitted by
solving the maximum-likelihood equations directly (scipy.optimize.brentq, not scipy.stats' fit), the rank
weights and the unknown-class softmax of Bendale & Boult's Algorithm 2 / the official OSDN code."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import brentq

import gradood


def _weibull_mle(x):
    """Two-parameter Weibull MLE: shape k solves sum x^k ln x / sum x^k - 1/k - mean(ln x) = 0."""
    x = np.asarray(x, dtype=np.float64)
    lx = np.log(x)

    def eq(k):
        w = np.exp(k * (lx - lx.max()))  # x^k up to a common factor (no overflow)
        return np.sum(w * lx) / np.sum(w) - 1.0 / k - lx.mean()

    k = brentq(eq, 1e-3, 1e4, xtol=1e-14)
    lam = np.exp(lx.max()) * np.mean(np.exp(k * (lx - lx.max()))) ** (1.0 / k)
    return k, lam


def _eucos(v, mu):
    return np.linalg.norm(v - mu) / 200.0 + 1.0 - v @ mu / (np.linalg.norm(v) * np.linalg.norm(mu))


def _openmax_ref(F_fit, y, F, tailsize, alpha, translate):
    C = F_fit.shape[1]
    pred = F_fit.argmax(1)
    models = []
    for c in range(C):
        sel = (pred == c) & (y == c)
        if sel.sum() < 2:
            sel = y == c
        mu = F_fit[sel].mean(0)
        d = np.sort([_eucos(v, mu) for v in F_fit[sel]])[-tailsize:]
        shift = translate - d.min()
        k, lam = _weibull_mle(d + shift)
        models.append((mu, shift, k, lam))
    out = []
    a = min(alpha, C)
    for v in F:
        order = np.argsort(-v)
        w = np.zeros(C)
        w[order[:a]] = [(a - i) / a for i in range(a)]
        vh = v.copy()
        for c, (mu, shift, k, lam) in enumerate(models):
            cdf = 1.0 - np.exp(-(((_eucos(v, mu) + shift) / lam) ** k))
            vh[c] = v[c] * (1.0 - w[c] * cdf)
        z = np.append(vh, np.sum(v - vh))
        p = np.exp(z - z.max())
        out.append(1.0 - p[-1] / p.sum())
    return np.array(out)


def _data(seed=0, C=4, n=120, D=None):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    F = rng.normal(scale=1.0, size=(n, C)) + 3.0 * np.eye(C)[y]
    F[::7] = rng.normal(size=(len(F[::7]), C))  # some misclassified samples
    return F, y


@pytest.mark.parametrize("tailsize,alpha,translate", [(10, 2, 1.0), (20, 10, 1.0), (5, 1, 3.0)])
def test_openmax_against_reference(tailsize, alpha, translate):
    F, y = _data()
    Ft = np.random.default_rng(5).normal(scale=2.0, size=(25, 4))
    det = gradood.create("openmax", tailsize=tailsize, alpha=alpha, translate=translate)
    det.fit(gradood.Signals.from_arrays(logits=F, labels=y))
    got = det.score(gradood.Signals.from_arrays(logits=Ft))
    # the Weibull parameters come from a numerical optimum of a flat likelihood (scipy.stats' fit vs the root of
    # the likelihood equations here): scores agree to ~1e-7
    np.testing.assert_allclose(got, _openmax_ref(F, y, Ft, tailsize, alpha, translate), rtol=2e-6, atol=1e-9)


def test_openmax_default_translate_is_finite_and_ranks_far_samples_lower():
    F, y = _data(1)
    det = gradood.create("openmax").fit(gradood.Signals.from_arrays(logits=F, labels=y))
    near = det.score(gradood.Signals.from_arrays(logits=3.0 * np.eye(4)))
    far = det.score(gradood.Signals.from_arrays(logits=-30.0 * np.eye(4) + 15.0))
    assert np.isfinite(near).all() and np.isfinite(far).all()
    assert near.min() > far.max()
    assert ((near >= 0) & (near <= 1)).all()


def test_openmax_needs_labels_and_two_samples_per_class():
    F, y = _data(2)
    with pytest.raises(gradood.InputError, match="on true labels"):
        gradood.create("openmax").fit(gradood.Signals.from_arrays(logits=F))
    y1 = y.copy()
    y1[y1 == 3] = 0
    y1[3] = 3
    with pytest.raises(gradood.InputError, match="1 sample\\(s\\) of class 3"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gradood.create("openmax").fit(gradood.Signals.from_arrays(logits=F, labels=y1))
    with pytest.raises(gradood.ConfigError, match="tailsize"):
        gradood.create("openmax", tailsize=1)
    with pytest.raises(gradood.ConfigError, match="distance"):
        gradood.create("openmax", distance="manhattan")
