"""Shared, generic test helpers: tiny seeded classifiers and input makers.

Kept deliberately small. The model classes and ``make_*`` helpers can be imported by test modules
(``from conftest import MLP``) or used through the fixtures below. Every model is built from an explicit
seed so that tests are deterministic whatever order they run in.
"""

from __future__ import annotations

import os

# The same for the BLAS/OpenMP pools of numpy, scipy and scikit-learn (read when those libraries load, so set
# before importing numpy): with 2 threads on a loaded machine a LogisticRegressionCV on 32 samples takes
# seconds instead of ~0.1 s.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# The test machines have 2 cores shared by parallel workers (pytest -n 2) and other jobs: intra-op threads
# only add contention for these tiny models.
torch.set_num_threads(1)


class MLP(nn.Module):
    """``x (d_in) -> Linear -> ReLU (or a signed activation) -> fc (n_classes)``. Head: ``fc``.

    ``signed=True`` replaces the ReLU by ``tanh`` so that the penultimate features take both signs.
    ``logit_shift`` is added to the head's bias (positive values make every energy > 0).
    """

    def __init__(self, d_in: int = 6, hidden: int = 8, n_classes: int = 5, *, bias: bool = True,
                 signed: bool = False, logit_scale: float = 1.0, logit_shift: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh() if signed else nn.ReLU())
        self.fc = nn.Linear(hidden, n_classes, bias=bias)
        with torch.no_grad():
            self.fc.weight.mul_(logit_scale)
            if bias:
                self.fc.bias.mul_(logit_scale).add_(logit_shift)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class SmallCNN(nn.Module):
    """``x (B, in_ch, H, W) -> conv -> ReLU -> conv -> ReLU -> global avg pool -> flatten -> fc``. Head: ``fc``."""

    def __init__(self, in_ch: int = 2, width: int = 6, n_classes: int = 4, *, logit_scale: float = 1.0,
                 logit_shift: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)
        with torch.no_grad():
            self.fc.weight.mul_(logit_scale)
            self.fc.bias.mul_(logit_scale).add_(logit_shift)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.pool(a).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SeqHeadNet(nn.Module):
    """A body followed by ``head = nn.Sequential(nn.Linear, nn.Dropout)`` (timm/torchvision style).

    The logits are the output of ``head.0``; in eval mode the dropout is the identity.
    """

    def __init__(self, d_in: int = 6, hidden: int = 8, n_classes: int = 5, *, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden))  # signed features
        self.head = nn.Sequential(nn.Linear(hidden, n_classes), nn.Dropout(0.5))
        with torch.no_grad():
            self.head[0].weight.mul_(logit_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def seeded(cls: type[nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """Build ``cls(**kwargs)`` with parameters drawn from ``torch.manual_seed(seed)``, in ``dtype``, eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(**kwargs)
    return model.to(dtype).eval()


def make_inputs(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal inputs of ``shape`` (times ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def probe_signals(model: nn.Module, x, y=None, batch_size: int = 8, **probe_kw):
    """Lazy signals of ``x`` (with labels ``y``) through a fresh probe of ``model``, without progress bars."""
    import gradood

    probe = gradood.Probe(model, **probe_kw)
    return probe.signals(x if y is None else (x, y), batch_size=batch_size, progress=False)


def std_tensor(std, x: torch.Tensor) -> torch.Tensor:
    """A per-channel input std broadcastable to ``x`` (channel dimension 1); 1 when ``std`` is None."""
    if std is None:
        return torch.ones((), dtype=x.dtype)
    s = torch.as_tensor(std, dtype=x.dtype).flatten()
    return s.reshape(()) if s.numel() == 1 else s.reshape(1, -1, *([1] * (x.ndim - 2)))


def make_labels(n: int, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Seeded labels covering every class at least once (needs ``n >= n_classes``)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    y[:n_classes] = torch.arange(n_classes)
    return y


def count_forward_passes(monkeypatch) -> dict:
    """Counts the model's forward passes through gradood (``calls["n"]``) from now on."""
    import gradood

    calls = {"n": 0}
    original = gradood.Probe.forward

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(gradood.Probe, "forward", counting)
    return calls


@pytest.fixture(autouse=True)
def _seed_everything():
    """Make code that draws from the global RNGs deterministic in every test."""
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def mlp() -> nn.Module:
    """5-class MLP with post-ReLU 8-d features, float32."""
    return seeded(MLP, 0, logit_scale=3.0)


@pytest.fixture
def cnn() -> nn.Module:
    """4-class small CNN on 2 x 5 x 5 inputs, 6-d post-ReLU pooled features, float32."""
    return seeded(SmallCNN, 1, logit_scale=3.0)


class ConvHeadNet(nn.Module):
    """BiT-style: conv body, global average pool to 1x1 maps, a 1x1 ``nn.Conv2d`` head ``cls``, then flatten.

    It contains no ``nn.Linear``, so a probe needs ``head="cls"``.
    """

    def __init__(self, in_ch: int = 2, width: int = 6, n_classes: int = 4, *, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.cls = nn.Conv2d(width, n_classes, 1)
        with torch.no_grad():
            self.cls.weight.mul_(logit_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.pool(torch.relu(self.conv(x)))).flatten(1)


class BNCNN(nn.Module):
    """``conv1 -> bn1 (BatchNorm2d) -> act1 (ReLU) -> conv2 -> act2 (ReLU) -> global avg pool -> fc``. Head: ``fc``.

    The BatchNorm has non-trivial running statistics and affine parameters, so eval mode and train mode
    give different outputs. Activations are ``nn.ReLU`` modules (tappable by name: ``act1``, ``act2``).
    """

    def __init__(self, in_ch: int = 2, width: int = 5, n_classes: int = 4, *, logit_scale: float = 3.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, width, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.3, 0.3)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.2, 0.2)
            self.fc.weight.mul_(logit_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.pool(a).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
