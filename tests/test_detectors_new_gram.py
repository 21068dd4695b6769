"""Gram matrices (Sastry & Oore) against a numpy re-derivation from activations captured with forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradood
from conftest import BNCNN, make_inputs, make_labels, probe_signals, seeded


def _acts(model, x, layers):
    out = {}
    hooks = [getattr(model, n).register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach().numpy()))
             for n in layers]
    with torch.no_grad():
        logits = model(x).numpy()
    for h in hooks:
        h.remove()
    return logits, out


def _gram_np(a, p):
    t = a.reshape(a.shape[0], a.shape[1], -1) ** p
    s = np.einsum("bcs,bds->bcd", t, t).sum(axis=2)
    return np.sign(s) * np.abs(s) ** (1.0 / p)


def _features(acts, layers, P):
    return [np.concatenate([_gram_np(acts[n], p) for p in range(1, P + 1)], axis=1) for n in layers]


@pytest.mark.parametrize("P,val_split", [(1, 0.25), (4, 0.3)])
@pytest.mark.parametrize("seed,scale,n_pred", [(50, 3.0, 1), (53, 8.0, 2)])
def test_gram_against_numpy(P, val_split, seed, scale, n_pred):
    model = seeded(BNCNN, seed, torch.float64, logit_scale=scale)  # predicts n_pred of the 4 classes
    x_fit, y_fit = make_inputs(48, 2, 5, 5, seed=51, dtype=torch.float64), make_labels(48, 4, seed=51)
    x_test = make_inputs(12, 2, 5, 5, seed=52, dtype=torch.float64, scale=2.5)
    det = gradood.create("gram", layers=["act1", "act2"], max_power=P, val_split=val_split, seed=3)
    det.fit(probe_signals(model, x_fit, y_fit, batch_size=16))
    got = det.score(probe_signals(model, x_test, batch_size=16))

    layers = ["act1", "act2"]
    F, acts = _acts(model, x_fit, layers)
    G = _features(acts, layers, P)
    pred = F.argmax(1)
    assert len(set(pred.tolist())) == n_pred
    perm = np.random.default_rng(3).permutation(48)
    n_val = int(round(val_split * 48))
    val, tr = perm[:n_val], perm[n_val:]
    C = F.shape[1]
    bounds = []
    for g in G:
        lo, hi = np.repeat(g[tr].min(0)[None], C, 0), np.repeat(g[tr].max(0)[None], C, 0)
        for c in range(C):
            if (pred[tr] == c).any():
                lo[c], hi[c] = g[tr][pred[tr] == c].min(0), g[tr][pred[tr] == c].max(0)
        bounds.append((lo, hi))

    def devs(gs, pr):
        return np.stack([(np.maximum(lo[pr] - g, 0) / np.abs(lo[pr] + 1e-6)
                          + np.maximum(g - hi[pr], 0) / np.abs(hi[pr] + 1e-6)).sum(1)
                         for g, (lo, hi) in zip(gs, bounds)], axis=1)

    E = devs([g[val] for g in G], pred[val]).mean(0)
    E = np.where(E > 0, E, 1.0)
    Ft, acts_t = _acts(model, x_test, layers)
    ref = -(devs(_features(acts_t, layers, P), Ft.argmax(1)) / E).sum(1)
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_gram_fit_data_inside_its_ranges_has_no_deviation_and_ood_has_more():
    """Samples that set the class ranges deviate by 0 (up to round-off) on their own; far inputs deviate more than ID ones."""
    model = seeded(BNCNN, 53, torch.float64)
    x, y = make_inputs(60, 2, 5, 5, seed=54, dtype=torch.float64), make_labels(60, 4, seed=54)
    det = gradood.create("gram", max_power=3, val_split=0.5).fit(probe_signals(model, x, y, batch_size=16))
    assert det.layers_ == ("act1", "act2")  # the probe's default activation layers
    perm = np.random.default_rng(0).permutation(60)
    train_part = probe_signals(model, x[torch.from_numpy(perm[30:])], batch_size=16)
    # the same samples in other batches: the model's float64 forward may differ in the last bit (oneDNN picks
    # kernels by batch shape), so "0" is up to round-off; a wrong range gives deviations of order 1
    np.testing.assert_allclose(det.score(train_part), 0.0, atol=1e-12)
    far = probe_signals(model, make_inputs(30, 2, 5, 5, seed=55, dtype=torch.float64, scale=10.0), batch_size=16)
    held = probe_signals(model, x[torch.from_numpy(perm[:30])], batch_size=16)
    assert np.median(det.score(far)) < np.median(det.score(held))


def test_gram_bad_input():
    with pytest.raises(gradood.ConfigError, match="val_split"):
        gradood.create("gram", val_split=1.0)
    with pytest.raises(gradood.ConfigError, match="max_power"):
        gradood.create("gram", max_power=0)
    model = seeded(BNCNN, 53, torch.float64)
    tiny = probe_signals(model, make_inputs(2, 2, 5, 5, dtype=torch.float64), make_labels(2, 2), batch_size=2)
    with pytest.raises(gradood.InputError, match="leave 2 and 0"):
        gradood.create("gram", val_split=0.2).fit(tiny)
    arrays = gradood.Signals.from_arrays(logits=np.zeros((4, 2)), features=np.zeros((4, 3)))
    with pytest.raises(gradood.InputError, match="gram reads layer activations"):
        gradood.create("gram").fit(arrays)
