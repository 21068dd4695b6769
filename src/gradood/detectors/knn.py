"""Deep nearest neighbours on normalised penultimate features (Sun et al., ICML 2022)."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..signals import FEATURES, Request, Signals
from . import _papers
from . import _hyperparams as hp
from .base import Detector, register


def normalize_rows(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``x / (||x|| + eps)`` (the knn-ood normaliser; OpenOOD's ``x/||x|| + eps`` has a precedence bug)."""
    return x / (x.norm(dim=1, keepdim=True) + eps)


def kth_neighbour_sqdist(queries: torch.Tensor, bank: torch.Tensor, k: int, *, query_chunk: int = 1024,
                         bank_chunk: int = 16384) -> torch.Tensor:
    """Squared Euclidean distance of each query to its k-th nearest bank row, exactly, in bounded memory.

    Memory is O(query_chunk x (k + bank_chunk)) whatever the bank size: a running top-k is merged with each
    bank chunk's distances.
    """
    out = torch.empty(queries.shape[0], dtype=queries.dtype)
    bank_sq = bank.pow(2).sum(dim=1)
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs: qs + query_chunk]
        q_sq = q.pow(2).sum(dim=1, keepdim=True)
        best = None
        for bs in range(0, bank.shape[0], bank_chunk):
            b = bank[bs: bs + bank_chunk]
            d = (q_sq + bank_sq[bs: bs + bank_chunk] - 2.0 * q @ b.T).clamp_min_(0.0)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
        assert best is not None
        out[qs: qs + query_chunk] = best[:, k - 1]
    return out


def _faiss_kth_sqdist(queries: torch.Tensor, bank: torch.Tensor, k: int):  # pragma: no cover - thin wrapper
    import faiss
    import numpy as np

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    d, _ = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(d[:, k - 1]).to(queries.dtype)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@register("knn")
class KNN(Detector):
    """KNN (Sun, Ming, Zhu & Li, ICML 2022): distance to the k-th nearest ID training feature.

    ``z = h / (||h||_2 + 1e-10)``; the fit stores the normalised ID features (the bank); score = minus the
    Euclidean distance from ``z(x)`` to its k-th nearest bank feature; higher = more ID.
    Inputs: penultimate features. Fit: the feature bank (N x D floats, optionally a random ``fraction``).
    Hyperparameters: ``k`` (50, the paper's CIFAR-10 value; 1000 for full ImageNet), ``normalize`` (True),
    ``fraction`` (1.0: share of the ID fit samples kept, the paper's alpha), ``backend`` "auto" (faiss when
    installed, else exact chunked torch matmul with bounded memory), "torch" or "faiss", ``seed`` (0).
    """

    paper = "Sun, Ming, Zhu & Li, Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022"
    citation = _papers.KNN
    signals = ("features",)
    fits_on_id = True

    hyperparams = {"k": hp.integer(minimum=1), "fraction": hp.real(low=0, high=1, low_open=True),
                   "backend": hp.choice("auto", "torch", "faiss"), "seed": hp.SEED}

    def __init__(self, k: int = 50, normalize: bool = True, fraction: float = 1.0, backend: str = "auto",
                 seed: int = 0) -> None:
        self.k = k
        self.normalize = normalize
        self.fraction = fraction
        self.backend = backend
        self.seed = seed
        if backend == "faiss" and not _faiss_available():
            raise ConfigError("backend='faiss' needs the faiss-cpu package: pip install faiss-cpu (or backend='torch').")

    def requests(self) -> list[Request]:
        return [FEATURES]

    def _embed(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return normalize_rows(h) if self.normalize else h

    def _fit(self, signals: Signals, **_: object) -> None:
        z = self._embed(signals.features)
        if self.fraction < 1:
            g = torch.Generator().manual_seed(self.seed)
            z = z[torch.randperm(len(z), generator=g)[: max(1, int(round(self.fraction * len(z))))]]
        if self.k > len(z):
            raise InputError(f"k={self.k} but the feature bank has only {len(z)} samples: lower k or fit on more data.")
        self.bank_ = z.contiguous()

    def _score(self, signals: Signals) -> torch.Tensor:
        q = self._embed(signals.features)
        use_faiss = self.backend == "faiss" or (self.backend == "auto" and _faiss_available())
        d2 = _faiss_kth_sqdist(q, self.bank_, self.k) if use_faiss else kth_neighbour_sqdist(q, self.bank_, self.k)
        return -d2.clamp_min(0).double().sqrt()
