"""Saving a fitted detector to a folder and loading it back: safetensors + JSON, no pickle.

A detector folder holds exactly two files that gradood reads:

* ``detector.json``: format and gradood version, registry name and class, hyperparameters, the signals it
  needs, the model contract (see :mod:`gradood.deploy.contract`), calibration (threshold, tpr, n), optional
  user metadata (the CLI records how to rebuild the model and data there), and the sha256 of the tensors file;
* ``state.safetensors``: every tensor / array of the fitted state.

Anything else in the folder is ignored (never opened). The folder is written next to its destination and
renamed into place, so an interrupted save leaves the previous folder (or nothing), never half a detector.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputError
from ._state import class_ref, decode

if TYPE_CHECKING:
    from ..detectors.base import Detector

FORMAT = "gradood-detector"
FORMAT_VERSION = 1
JSON_NAME = "detector.json"
TENSORS_NAME = "state.safetensors"
_MAX_JSON_BYTES = 64 * 2**20


class VersionWarning(UserWarning):
    """A detector folder was written by another gradood version (it loads; scores may differ if a detector
    changed between the versions)."""


def fitted_state(detector: "Detector") -> dict[str, Any]:
    """The fitted attributes: every public instance attribute whose name ends in ``_`` (scikit-learn's
    convention, which every gradood detector follows)."""
    return {k: v for k, v in vars(detector).items() if k.endswith("_") and not k.startswith("_")}


def _version() -> str:
    from .. import __version__

    return __version__


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_detector_folder(path: Path) -> bool:
    return path.is_dir() and (path / JSON_NAME).is_file()


def save_detector(detector: "Detector", path: str | os.PathLike[str], *, overwrite: bool = False,
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write ``detector`` (fitted, and calibrated if it was) to the folder ``path``; returns the path.

    ``overwrite=True`` replaces an existing detector folder (never a folder that is not one). ``metadata``: a
    JSON-able dict stored as is (read it back with :func:`read_record`)."""
    from safetensors.torch import save as st_save

    detector._check_fitted()
    _check_registered(detector)
    dest = Path(path).expanduser()
    if dest.exists():
        if not is_detector_folder(dest):
            raise ConfigError(f"{dest} exists and is not a gradood detector folder: choose another path (gradood "
                              "never writes into or replaces other folders).")
        if not overwrite:
            raise ConfigError(f"{dest} already holds a saved detector: pass overwrite=True (--overwrite) to "
                              "replace it, or choose another path.")
    params_tree, state_tree, tensors = _encode_detector(detector)
    blob = st_save(tensors, metadata={"format": FORMAT})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gradood_version": _version(),
        "detector": detector.name,
        "class": class_ref(type(detector)),
        "params": params_tree,
        "signals": list(detector.signals),
        "requests": _request_keys(detector),
        "needs_model": bool(detector.needs_model),
        "model": getattr(detector, "model_contract_", None),
        "calibration": _calibration_summary(detector),
        "metadata": _check_metadata(metadata),
        "state": state_tree,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    text = json.dumps(doc, indent=1, allow_nan=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        _fsync_write(tmp / TENSORS_NAME, blob)
        _fsync_write(tmp / JSON_NAME, text.encode())
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_registered(detector: "Detector") -> None:
    from ..detectors.base import detector_class

    try:
        cls, _ = detector_class(detector.name)
    except ConfigError:
        cls = None
    if cls is not type(detector):
        raise ConfigError(f"only registered detectors can be saved (loading rebuilds them from the registry); "
                          f"{type(detector).__name__} is not registered as {detector.name!r}: decorate it with "
                          "@gradood.detectors.register(name) and build it with gradood.create(name).")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _encode_detector(detector: "Detector") -> tuple[Any, Any, dict]:
    from ._state import Encoder

    enc = Encoder()
    params = enc.encode(detector.get_params(), "params")
    state = enc.encode(fitted_state(detector), "state")
    return params, state, enc.tensors


def _request_keys(detector: "Detector") -> list[str] | None:
    try:
        return [r.key for r in detector.requests()]
    except Exception:  # requests that need state an unfitted, fit-free detector does not have
        return None


def _calibration_summary(detector: "Detector") -> dict[str, Any] | None:
    if getattr(detector, "threshold_", None) is None:
        return None
    return {"threshold": detector.threshold_, "tpr": detector.tpr_, "n": int(detector.calibration_scores_.size),
            "rank": int(detector.calibration_rank_)}


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metadata must be JSON-serialisable (strings, numbers, lists, dicts): {e}") from None
    return dict(metadata)


# ---------------------------------------------------------------------- loading
def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``detector.json`` of a detector folder (checked to be one); nothing else is read."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"{folder} does not exist: pass the folder written by detector.save(path) or gradood fit.")
    if not is_detector_folder(folder):
        what = "a file" if folder.is_file() else "a folder without detector.json"
        raise InputError(f"{folder} is {what}, not a gradood detector folder: pass the folder written by "
                         "detector.save(path) or gradood fit --out.")
    raw = (folder / JSON_NAME).read_bytes()
    if len(raw) > _MAX_JSON_BYTES:
        raise InputError(f"{folder / JSON_NAME} is {len(raw)} bytes, larger than any detector record: not a "
                         "gradood detector folder.")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{folder / JSON_NAME} is not valid JSON ({e}): the folder is damaged; re-save the "
                         "detector.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{folder / JSON_NAME} is not a gradood detector record (format "
                         f"{doc.get('format') if isinstance(doc, dict) else None!r}).")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{folder} was written in detector format {version!r}, newer than this gradood reads "
                         f"({FORMAT_VERSION}): upgrade gradood (it was saved by gradood {doc.get('gradood_version')}).")
    return doc


def load_detector(path: str | os.PathLike[str]) -> "Detector":
    """The detector saved in folder ``path`` (fitted, with its threshold when it was calibrated).

    Loading runs no code from the folder: the JSON is parsed, the tensors are read by safetensors, and the
    detector is rebuilt from gradood's registry; a name gradood does not know is an error. A folder written by
    another gradood version loads with a :class:`VersionWarning`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from ..detectors.base import detector_class

    folder = Path(path).expanduser()
    doc = read_record(folder)
    where = str(folder)
    saved_version = doc.get("gradood_version")
    if saved_version != _version():
        warnings.warn(f"{folder} was saved by gradood {saved_version}, this is {_version()}: the detector loads, "
                      "but scores may differ if the detector changed between versions; refit to be sure.",
                      VersionWarning, stacklevel=2)
    name = doc.get("detector")
    if not isinstance(name, str):
        raise InputError(f"{where}: the record has no detector name.")
    try:
        cls, _defaults = detector_class(name)
    except ConfigError as e:
        raise InputError(f"{where} holds detector {name!r}, which this gradood does not have ({e})") from None
    if doc.get("class") != class_ref(cls):
        raise InputError(f"{where} holds a {doc.get('class')!r} under the name {name!r}, but gradood's {name!r} is "
                         f"{class_ref(cls)}: it was saved by another gradood version; refit.")
    blob_path = folder / TENSORS_NAME
    if not blob_path.is_file():
        raise InputError(f"{where} has no {TENSORS_NAME}: the folder is incomplete; re-save the detector.")
    blob = blob_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise InputError(f"{blob_path} does not match the sha256 recorded in {JSON_NAME}: the files were changed or "
                         "come from different saves; re-save the detector.")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InputError(f"{blob_path} is not a readable safetensors file ({e}).") from None
    params = decode(doc.get("params"), tensors, where)
    state = decode(doc.get("state"), tensors, where)
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise InputError(f"{where}: params and state must be mappings.")
    from ..detectors.base import create

    try:
        det = create(name, **params)
    except ConfigError as e:
        raise InputError(f"{where}: its hyperparameters are not valid for {name!r} in this gradood ({e})") from None
    for k, v in state.items():
        if not (isinstance(k, str) and k.isidentifier() and k.endswith("_") and not k.startswith("_")):
            raise InputError(f"{where}: {k!r} is not a fitted attribute name.")
        det.__dict__[k] = v  # plain attribute, bypassing any descriptor of the class
    if det._needs_fit() and not det.is_fitted:
        raise InputError(f"{where} holds an unfitted {name!r}: fit it before saving.")
    det._deployed_from = where
    return det
