"""The contract of the model a detector was fitted on, and the check that new signals honour it.

Recorded at fit time (JSON-able): class count, feature dimension, head name, per-sample input shape, the taps
the detector reads with their per-sample shapes, and a sha256 fingerprint of the model's parameters and
buffers. A loaded detector refuses signals from a model that breaks it, naming the mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import GradoodError, InputError
from ..signals import FEATURES, Signals, Tap

if TYPE_CHECKING:
    from ..detectors.base import Detector

_FINGERPRINT_MEMO = "_gradood_weights_fingerprint"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, values). Memoised on the model and
    recomputed only when a tensor was replaced or modified in place (its version counter moved)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    key = tuple((n, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for n, t in named)
    memo = model.__dict__.get(_FINGERPRINT_MEMO)
    if memo is not None and memo[0] == key:
        return memo[1]
    h = hashlib.sha256()
    for n, t in named:
        a = t.detach().to("cpu").contiguous()
        h.update(f"{n}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    model.__dict__[_FINGERPRINT_MEMO] = (key, digest)
    return digest


def _plain(v: Any) -> Any:
    """A normalisation constant (float, sequence, tensor or None) as JSON: None, a float or a list of floats."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return [float(a) for a in torch.as_tensor(v).flatten().tolist()]


def _tap_layers(detector: "Detector") -> list[str]:
    try:
        reqs = detector.requests()
    except Exception:  # a detector whose requests need state it does not have (never fitted): no taps known
        return []
    return sorted({t for r in reqs for t in r.taps})


def model_contract(detector: "Detector", signals: Signals) -> dict[str, Any]:
    """What the detector assumes about the model, from the signals it was fitted on."""
    probe = signals.probe
    contract: dict[str, Any] = {"num_classes": signals.known_num_classes(), "feature_dim": None, "head": None,
                                "input_shape": None, "input_mean": None, "input_std": None, "taps": {},
                                "weights_sha256": None}
    if signals.has(FEATURES):
        contract["feature_dim"] = int(signals.features.shape[1])
    if probe is not None:
        contract["head"] = probe.head_name
        if probe.head_name is not None and contract["feature_dim"] is None:
            with contextlib.suppress(GradoodError, AttributeError):  # a head without a readable weight
                contract["feature_dim"] = int(probe.weight.shape[1])
        if isinstance(probe.input_shape, tuple):
            contract["input_shape"] = list(probe.input_shape)
        contract["input_mean"], contract["input_std"] = _plain(probe.input_mean), _plain(probe.input_std)
        contract["weights_sha256"] = weights_fingerprint(probe.model)
    for layer in _tap_layers(detector):
        shape = None
        for reduce in ("mean", "flatten"):
            t = Tap(layer, reduce)
            if signals.has(t):
                shape = [reduce, *signals.get(t).shape[1:]]
                break
        contract["taps"][layer] = shape
    return contract


def check_contract(contract: dict[str, Any], signals: Signals, label: str, *, perturbs: bool = False) -> None:
    """:class:`InputError` when ``signals`` come from another model than the one in ``contract`` (and, for
    detectors that perturb inputs, ``perturbs=True``, another input normalisation: eps is in pixel units)."""
    probe = signals.probe
    fix = "score with the model the detector was fitted on, or refit the detector on this model's ID data."
    head = contract.get("head")
    if probe is not None and head is not None and probe.head_name is not None and probe.head_name != head:
        raise InputError(f"{label} was fitted with the classifier head {head!r}, but this probe uses "
                         f"{probe.head_name!r}: pass Probe(model, head={head!r}), or refit.")
    n_c = signals.known_num_classes()
    if contract.get("num_classes") is not None and n_c is not None and n_c != contract["num_classes"]:
        raise InputError(f"{label} was fitted on a model with {contract['num_classes']} classes, but these "
                         f"signals have {n_c}: {fix}")
    if probe is None:
        return
    shape = contract.get("input_shape")
    if shape is not None and probe.input_shape is not None and list(probe.input_shape) != list(shape):
        raise InputError(f"{label} was fitted on inputs of per-sample shape {tuple(shape)}, but these have "
                         f"{tuple(probe.input_shape)}: resize the data to the shape the model was fitted with.")
    if perturbs:
        for what in ("input_mean", "input_std"):
            if what in contract and _plain(getattr(probe, what)) != contract[what]:
                raise InputError(f"{label} was fitted with Probe({what}={contract[what]}), but these signals use "
                                 f"{what}={_plain(getattr(probe, what))}: its input perturbation steps are in pixel "
                                 f"units, so pass Probe(model, {what}={contract[what]}).")
    want = contract.get("weights_sha256")
    if want is not None:
        got = weights_fingerprint(probe.model)
        if got != want:
            raise InputError(
                f"{label} was fitted on a model whose weights have sha256 {want[:16]}..., but these signals come "
                f"from a model with {got[:16]}... (other weights or another architecture): {fix}")
