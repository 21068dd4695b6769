"""GradBasis, GradMoments accumulation/merging, weighted sums across batches, the allocator helper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradood.errors import ConfigError, InputError, ModelError
from gradood.grads import (GradBasis, GradMoments, grad_moments, per_sample_grad_projections, tune_allocator,
                           weighted_grad_sums)
from gradood.grads import reference as ref

DT = torch.float64


def model_and_data(B: int = 6):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    return m, torch.randn(B, 4, dtype=DT)


def energy(out: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(out, 1)


# ---------------------------------------------------------------------------------------------- basis
def test_from_matrix_round_trip_and_block_order():
    m, _ = model_and_data()
    names = [n for n, _ in m.named_parameters()]
    P = sum(p.numel() for p in m.parameters())
    V = torch.randn(P, 4, dtype=DT)
    b = GradBasis.from_matrix(m, V)
    assert b.k == 4 and b.num_params == P and b.names == names
    assert b.directions["0.weight"].shape == (5, 4, 4)
    torch.testing.assert_close(b.to_matrix(), V)
    torch.testing.assert_close(b.directions["0.weight"][2, 1], V[2 * 4 + 1])  # row-major within a block


def test_orthonormalized_and_normalized():
    m, x = model_and_data()
    b = GradBasis.random(m, 6, orthonormal=False, generator=torch.Generator().manual_seed(1))
    q = b.orthonormalized()
    torch.testing.assert_close(q.gram(), torch.eye(6, dtype=DT), atol=1e-12, rtol=0)
    # same span: projecting V onto Q reproduces V
    V, Q = b.to_matrix(), q.to_matrix()
    torch.testing.assert_close(Q @ (Q.T @ V), V, atol=1e-10, rtol=0)
    n = b.normalized()
    torch.testing.assert_close(n.gram().diagonal(), torch.ones(6, dtype=DT))


def test_dependent_directions_cannot_be_orthonormalized():
    v = torch.randn(7, 1, dtype=DT)
    b = GradBasis({"w": torch.cat([v, 2 * v], 1)})
    with pytest.raises(ConfigError, match="dependent"):
        b.orthonormalized()


def test_basis_validation():
    with pytest.raises(ConfigError, match="same K"):
        GradBasis({"a": torch.zeros(3, 2), "b": torch.zeros(4, 3)})
    with pytest.raises(ConfigError, match="non-empty"):
        GradBasis({})
    with pytest.raises(ConfigError, match="K = 5 .* P = 4"):
        GradBasis({"a": torch.zeros(2, 2, 5)})
    with pytest.raises(ConfigError, match="shape"):
        GradBasis({"a": torch.zeros(3, 2)}, center={"a": torch.zeros(4)})
    with pytest.raises(ConfigError, match="NaN or Inf"):
        GradBasis({"a": torch.zeros(3, 2)}, scale={"a": torch.tensor([1.0, math.inf, 1.0])})
    m, x = model_and_data()
    wrong = GradBasis({"0.weight": torch.zeros(4, 5, 2, dtype=DT)})
    with pytest.raises(ModelError, match="shape"):
        per_sample_grad_projections(m, x, energy, wrong)
    missing = GradBasis({"nope": torch.zeros(4, 2, dtype=DT)})
    with pytest.raises(ModelError, match="not a parameter"):
        per_sample_grad_projections(m, x, energy, missing)


def test_center_and_scale_given_twice_are_refused():
    m, x = model_and_data()
    named = dict(m.named_parameters())
    mu = {n: torch.zeros_like(p) for n, p in named.items()}
    b = GradBasis(GradBasis.random(m, 2).directions, center=mu)
    with pytest.raises(ConfigError, match="once"):
        per_sample_grad_projections(m, x, energy, b, center=mu)


def test_plain_dict_basis_and_subset_of_parameters():
    m, x = model_and_data()
    dirs = {"2.weight": torch.randn(3, 5, 2, dtype=DT), "2.bias": torch.randn(3, 2, dtype=DT)}
    ours = per_sample_grad_projections(m, x, energy, dirs)
    torch.testing.assert_close(ours, ref.projections(m, x, energy, GradBasis(dirs)), rtol=1e-10, atol=1e-12)


def test_basis_in_another_dtype_is_converted():
    m, x = model_and_data()
    b64 = GradBasis.random(m, 3, generator=torch.Generator().manual_seed(0))
    b32 = GradBasis({n: v.float() for n, v in b64.directions.items()})
    torch.testing.assert_close(per_sample_grad_projections(m, x, energy, b32),
                               ref.projections(m, x, energy, GradBasis({n: v.float().double()
                                                                       for n, v in b64.directions.items()})),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- moments
def test_moments_accumulate_over_batches_and_merge():
    m, x = model_and_data(9)
    whole = grad_moments(m, x, energy)
    streamed = grad_moments(m, [x[:4], (x[4:7], None), x[7:]], energy)  # iterable of batches / (x, y) tuples
    a = grad_moments(m, x[:5], energy)
    b = grad_moments(m, x[5:], energy)
    merged = GradMoments().merge(a).merge(b)
    continued = grad_moments(m, x[5:], energy, into=grad_moments(m, x[:5], energy))
    for other in (streamed, merged, continued):
        assert other.count == 9
        for n in whole.sum:
            torch.testing.assert_close(other.sum[n], whole.sum[n], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(other.sumsq[n], whole.sumsq[n], rtol=1e-12, atol=1e-15)


def test_mean_var_and_inverse_std():
    m, x = model_and_data(7)
    mom = grad_moments(m, x, energy)
    grads = ref.per_sample_grads(m, x, energy)
    for n, g in grads.items():
        torch.testing.assert_close(mom.mean()[n], g.mean(0))
        torch.testing.assert_close(mom.var()[n], g.var(0, unbiased=False), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(mom.var(ddof=1)[n], g.var(0, unbiased=True), rtol=1e-9, atol=1e-15)
    # zero-variance entries get the largest finite inverse std (Wu et al.'s rule)
    fake = GradMoments(count=2, sum={"a": torch.tensor([0.0, 2.0, 2.0], dtype=DT)},
                       sumsq={"a": torch.tensor([2.0, 2.0, 4.0], dtype=DT)})
    inv = fake.inverse_std()["a"]
    torch.testing.assert_close(inv, torch.tensor([1.0, 1.0, 1.0], dtype=DT))  # var = [1, 0, 1]
    assert bool(torch.isfinite(inv).all())


def test_empty_moments_and_bad_accumulators_are_refused():
    with pytest.raises(InputError, match="no samples"):
        GradMoments().mean()
    m, x = model_and_data()
    with pytest.raises(InputError, match="B x K"):
        weighted_grad_sums(m, x, energy, torch.ones(len(x) + 1, 2, dtype=DT))
    with pytest.raises(ConfigError, match="contiguous tensor of shape"):
        weighted_grad_sums(m, x, energy, torch.ones(len(x), 2, dtype=DT), into={"0.weight": torch.zeros(5, 4, 3)})


def test_weighted_sums_accumulate_into_a_previous_result():
    m, x = model_and_data(8)
    w = torch.randn(8, 3, dtype=DT)
    acc = weighted_grad_sums(m, x[:5], energy, w[:5])
    weighted_grad_sums(m, x[5:], energy, w[5:], into=acc)
    whole = ref.weighted_sums(m, x, energy, w)
    for n in whole:
        torch.testing.assert_close(acc[n], whole[n], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------- allocator
def test_tune_allocator_runs_in_a_subprocess():
    """mallopt is process-wide, so it is tried in a child process; on Linux/glibc it must succeed."""
    import subprocess
    import sys

    code = "from gradood.grads import tune_allocator; print(tune_allocator(), tune_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if sys.platform.startswith("linux"):
        assert out == ["True", "True"]
    else:
        assert out[0] == "False"
    assert callable(tune_allocator)
