"""Per-sample gradient engine.

* :mod:`gradood.grads.head`: closed forms of last-layer gradients (one forward pass, no backward).
* :mod:`gradood.grads.engine`: full-network per-sample gradient statistics -- squared norms, projections
  onto fixed directions, moments, weighted sums -- for a whole batch from one forward and one backward pass.
* :mod:`gradood.grads.reference`: the same by plain ``torch.func`` (and a per-sample loop), for tests and
  benchmarks.
"""

from ._capture import FallbackWarning, resolve_params
from ._layers import NATIVE_LAYERS
from .allocator import tune_allocator
from .basis import GradBasis
from .engine import (GradMoments, grad_moments, input_gradient, input_step_scale, per_sample_grad_projections,
                     per_sample_grad_sqnorms, perturb_input, weighted_grad_sums)

__all__ = [
    "per_sample_grad_sqnorms", "per_sample_grad_projections", "grad_moments", "weighted_grad_sums",
    "input_gradient", "perturb_input", "input_step_scale", "GradBasis", "GradMoments", "FallbackWarning",
    "resolve_params", "tune_allocator", "NATIVE_LAYERS",
]
