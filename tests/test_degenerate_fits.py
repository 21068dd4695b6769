"""Fits that run but are decided by round-off warn, naming the numbers (rank, dim, N, D) and the fix.
Features are made rank-deficient on purpose (dead units, too few samples)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gradood
from gradood.detectors._checks import DegenerateFitWarning, covariance_rank
from gradood.signals import Signals


def _signals(n: int, live: int, dead: int, C: int = 3, seed: int = 0) -> Signals:
    """Post-ReLU-like features with ``dead`` units that are 0 on every sample."""
    rng = np.random.default_rng(seed)
    h = np.concatenate([np.abs(rng.normal(size=(n, live))) + 0.1, np.zeros((n, dead))], axis=1)
    W, b = rng.normal(size=(C, live + dead)), rng.normal(size=C)
    return Signals.from_arrays(logits=h @ W.T + b, features=h, labels=np.arange(n) % C, head_weight=W,
                               head_bias=b, name="id-fit")


def _fit_quietly(det, s):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFitWarning)
        return det.fit(s)


# ---------------------------------------------------------------------- ViM
def test_vim_warns_when_dim_reaches_the_rank_of_the_features():
    s = _signals(200, live=6, dead=4)  # h - o spans the 6 live units plus the origin's offset: rank 7 of 10
    with pytest.warns(DegenerateFitWarning, match=r"vim: the ID features span only 7 of D = 10 dimensions .*dim = 8 "
                                                   r">= 7.*alpha_ explodes.*Use dim < 7 \(e.g. dim=3\)") as rec:
        det = gradood.create("vim", dim=8).fit(s)
    assert len(rec) == 1
    assert abs(det.alpha_) > 1e6  # what the warning is about: the residual norm of ID data is round-off
    healthy = _fit_quietly(gradood.create("vim", dim=3), s)
    assert abs(healthy.alpha_) < 1e3


def test_vim_warns_when_fitted_on_fewer_samples_than_dimensions():
    with pytest.warns(DegenerateFitWarning, match=r"vim: fitted on N = 8 samples of D = 10-dimensional features.*"
                                                   r"more than 10 ID samples"):
        gradood.create("vim", dim=2).fit(_signals(8, live=10, dead=0))


def test_vim_full_rank_fit_is_silent():
    _fit_quietly(gradood.create("vim", dim=5), _signals(200, live=10, dead=0))


# ---------------------------------------------------------------------- Mahalanobis
def test_mahalanobis_warns_on_a_rank_deficient_covariance_and_says_what_it_does():
    s = _signals(120, live=5, dead=3)
    with pytest.warns(DegenerateFitWarning, match=r"mahalanobis: the tied covariance of 'id-fit' \(penultimate "
                                                   r"features\) has rank 5 < D = 8 \(3 of 8 units are constant.*"
                                                   r"pseudo-inverts.*ignore the 3 directions.*ridge=1e-6"):
        det = gradood.create("mahalanobis").fit(s)
    P = det.gaussian_.precision.numpy()
    h = s.features.double().numpy()
    y = s.labels.numpy()
    means = np.stack([h[y == c].mean(0) for c in range(3)])
    centred = h - means[y]
    cov = centred.T @ centred / len(h)
    np.testing.assert_allclose(P, np.linalg.pinv(cov, hermitian=True), atol=1e-8)  # the documented pinv


def test_mahalanobis_ridge_inverts_the_regularised_covariance_without_warning():
    s = _signals(120, live=5, dead=3)
    det = _fit_quietly(gradood.create("mahalanobis", ridge=1e-3), s)
    h, y = s.features.double().numpy(), s.labels.numpy()
    means = np.stack([h[y == c].mean(0) for c in range(3)])
    cov = (h - means[y]).T @ (h - means[y]) / len(h)
    want = np.linalg.inv(cov + 1e-3 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]))
    np.testing.assert_allclose(det.gaussian_.precision.numpy(), want, rtol=1e-9)
    # the dead directions are now penalised: a sample that differs from ID only there scores lower
    q = torch.tensor(np.r_[h[0, :5], [0.0, 0.0, 5.0]])[None]
    base = torch.tensor(h[:1])
    assert det._score(Signals.from_arrays(features=q)) < det._score(Signals.from_arrays(features=base))


def test_mahalanobis_full_rank_fit_is_silent():
    _fit_quietly(gradood.create("mahalanobis"), _signals(120, live=8, dead=0))


def test_mahalanobis_ensemble_names_the_layer():
    from gradood.detectors.mahalanobis import TiedGaussian

    f = torch.cat([torch.rand(40, 3), torch.zeros(40, 2)], dim=1)
    with pytest.warns(DegenerateFitWarning, match=r"mahalanobis-ensemble: the tied covariance of 'x' at layer "
                                                   r"'conv2' has rank 3 < D = 5"):
        TiedGaussian.fit(f, torch.arange(40) % 2, who="mahalanobis-ensemble", data="'x' at layer 'conv2'")


def test_covariance_rank():
    a = torch.randn(50, 4, dtype=torch.float64)
    x = torch.cat([a, a[:, :1] * 2.0 - a[:, 1:2]], dim=1)  # 5th column a combination of two others
    assert covariance_rank(x.T @ x) == 4
    assert covariance_rank(a.T @ a) == 4
