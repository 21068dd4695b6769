"""Input gradients and ODIN-style input perturbation (gradood.grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.errors import ConfigError, InputError, ModelError
from gradood.grads import input_gradient, input_step_scale, perturb_input
from gradood.grads import reference as ref
from gradood.probe import Probe, input_step_scale as probe_step_scale


def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.double().eval()


def pred_ce(out: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out / 2.0, out.argmax(1), reduction="none")


def test_batched_input_gradient_equals_per_sample():
    model = cnn()
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    x[0] *= 1e-3
    x[1] *= 1e3
    g, out = input_gradient(model, x, pred_ce, return_output=True)
    torch.testing.assert_close(g, ref.input_gradient(model, x, pred_ce), rtol=1e-10, atol=0)
    torch.testing.assert_close(out, model(x))
    assert not g.requires_grad and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_input_gradient_refuses_train_mode_and_integer_inputs():
    model = cnn().train()
    with pytest.raises(ModelError, match="eval"):
        input_gradient(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), pred_ce)
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).eval()
    with pytest.raises(InputError, match="floating-point"):
        input_gradient(emb, torch.randint(0, 5, (2, 2)), pred_ce)


def test_perturb_input_formula_with_per_channel_std():
    x = torch.randn(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4)
    g[0, 0, 0, 0] = 0.0  # sign(0) = 0: no step there
    std = (0.5, 0.25, 2.0)
    xp = perturb_input(x, g, 0.01, input_std=std)
    expect = x - 0.01 * torch.sign(g) / torch.tensor(std).reshape(1, 3, 1, 1)
    torch.testing.assert_close(xp, expect)
    assert xp[0, 0, 0, 0] == x[0, 0, 0, 0]
    torch.testing.assert_close(perturb_input(x, g, 0.01, direction=1), x + 0.01 * torch.sign(g))
    assert torch.equal(perturb_input(x, g, 0.0), x)


def test_step_scale_matches_the_probe():
    x = torch.randn(2, 3, 4, 4)
    for std in (None, 0.5, (0.5, 0.25, 2.0)):
        probe = Probe(nn.Linear(4, 2), input_std=std)
        ours, theirs = input_step_scale(std, x), probe_step_scale(probe, x)
        torch.testing.assert_close(torch.as_tensor(ours, dtype=x.dtype), torch.as_tensor(theirs, dtype=x.dtype))


def test_perturbation_descends_the_loss():
    """A small step against sign(grad) lowers every sample's loss (ODIN / GRODIN direction)."""
    model = cnn()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    g = input_gradient(model, x, pred_ce)
    before = pred_ce(model(x))
    after = pred_ce(model(perturb_input(x, g, 1e-4)))
    assert bool((after < before).all())


@pytest.mark.parametrize("eps", [-0.001, float("nan"), float("inf"), "a"])
def test_bad_eps_is_refused(eps):
    x = torch.randn(2, 3)
    with pytest.raises(ConfigError, match="eps"):
        perturb_input(x, x, eps)


def test_bad_direction_std_and_shapes_are_refused():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ConfigError, match="direction"):
        perturb_input(x, x, 0.1, direction=0)
    with pytest.raises(InputError, match="channels"):
        perturb_input(x, x, 0.1, input_std=(1.0, 2.0))
    with pytest.raises(ConfigError, match="positive"):
        perturb_input(x, x, 0.1, input_std=(1.0, 0.0, 2.0))
    with pytest.raises(InputError, match="shape"):
        perturb_input(x, x[:1], 0.1)
