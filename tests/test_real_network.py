"""Smoke run on a real deep network: EfficientNet-Lite0 (ImageNet) on the 20 real ImageNet images of foolbox.

Proves the probe (head discovery, features, taps) and the gradient engine (depthwise/pointwise convs,
BatchNorm, ReLU6, the head) work on a real architecture, and that the engine equals the torch.func reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gradood
from gradood import data, models
from gradood.detectors._perturb import pred_ce
from gradood.grads import FallbackWarning
from gradood.grads import per_sample_grad_sqnorms
from gradood.grads.reference import sqnorms as reference_sqnorms


@pytest.fixture(scope="module")
def effnet():
    model, info = models.load("efficientnet-lite0")
    images = data.load("foolbox_imagenet")
    x, y = images.tensors(mean=info.mean, std=info.std)
    return model, info, x, y


def test_probe_finds_the_head_and_classifies_real_images(effnet):
    model, info, x, y = effnet
    probe = gradood.Probe(model, input_std=info.std, input_mean=info.mean)
    s = probe.signals((x, y), batch_size=10, progress=False)
    assert s.logits.shape == (20, 1000) and s.features.shape == (20, 1280)  # runs the (lazy) pass
    assert probe.head_name == info.head == "_fc"
    top1 = float((s.logits.argmax(1) == s.labels).double().mean())
    assert top1 >= 0.85  # 17/20, as measured when the model was added
    for name in ("msp", "energy", "gradnorm", "rg", "exgrad", "grodin-lastlayer"):
        scores = gradood.create(name).score(s)
        assert scores.shape == (20,) and np.isfinite(scores).all()


@pytest.mark.slow
def test_engine_matches_the_reference_on_efficientnet(effnet):
    import copy

    model, _, x, _ = effnet
    m = copy.deepcopy(model).double().eval()  # exactness is proven in float64 (fp32 flips ReLU6 decisions)
    xb = x[:2].double()
    loss = lambda out: pred_ce(out, 2.0)  # noqa: E731  GRODIN's predicted-label loss at T = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # every conv / BN / linear on the exact fast path
        fast = per_sample_grad_sqnorms(m, xb, loss)
    ref = reference_sqnorms(m, xb, loss)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0.0)


def test_grodin_runs_on_efficientnet(effnet):
    model, info, x, y = effnet
    probe = gradood.Probe(model, input_std=info.std, input_mean=info.mean)
    s = probe.signals((x[:8], y[:8]), batch_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        g = gradood.create("grodin", eps=0.001).score(s)
    sg = gradood.create("grodin-sg", eps=0.001).score(s)
    assert np.isfinite(g).all() and np.isfinite(sg).all()
    assert (g <= 0).all() and (sg <= 0).all()  # minus squared norms
