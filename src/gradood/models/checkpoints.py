"""Safe checkpoint I/O: weights only (``torch.load(weights_only=True)``: tensors and plain containers, never
arbitrary pickled objects), clear errors for damaged files, atomic saves."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..data._cache import atomic_target, sha256_file
from ..errors import ModelError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` on the CPU with ``weights_only=True``.

    Accepts a bare state_dict or one wrapped as ``{"state_dict": ...}`` / ``{"model_state_dict": ...}``.
    A missing, truncated, corrupt or non-weights file raises :class:`ModelError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        raise ModelError(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a weights-only PyTorch file "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Delete it and fetch or "
            "train it again."
        ) from e
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} does not hold a state_dict (a mapping of names to tensors).")
    return dict(obj)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
                 ) -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)``, with missing/unexpected keys and shape mismatches
    reported as :class:`ModelError`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{source} does not match {type(model).__name__}: {e}") from e
    return model


def save_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Save a state_dict atomically (temporary file + rename) and return its sha256."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    state = {k: v.detach().cpu() for k, v in state.items()}
    path = Path(path)
    # torch.save names the zip's records after the target file; saving through a buffer keeps the bytes (and
    # so the sha256) independent of the random temporary name.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        digest = sha256_file(tmp)
    return digest
