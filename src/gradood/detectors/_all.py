"""Imports every detector module so that each registers itself (kept in one place for the registry).

A module that is listed here but missing, or that fails to import, is an error naming the module and its
cause: silently skipping it would make detectors vanish from ``available()`` and from benchmark results.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import GradoodError

_MODULES = [
    "logit_scores",
    "output_feature",
    "react",
    "mahalanobis",
    "knn",
    "vim",
    "odin",
    "grodin",
    "fssd",
    "lowdim",
    "softmax_family",
    "shaping",
    "feature_geometry",
    "density",
    "gradient_family",
    "openmax",
    "gram",
    "gradient_uncertainty",
    "gaia",
    "mc_dropout",
    "feature_map",
]


class DetectorImportError(GradoodError, ImportError):
    """A detector module listed in the registry could not be imported."""


def import_detector_module(name: str) -> ModuleType:
    """Import ``gradood.detectors.<name>``; raise :class:`DetectorImportError` (with the original exception as
    its cause) if it does not exist or fails to import."""
    full = f"{__package__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            raise DetectorImportError(
                f"detector module {full} is listed in gradood/detectors/_all.py but does not exist: add the "
                f"module or remove {name!r} from _MODULES (a broken install? reinstall gradood)."
            ) from e
        raise DetectorImportError(
            f"detector module {full} needs the package {e.name!r}, which is not installed: install it "
            f"(pip install {e.name}) or the gradood extra that provides it."
        ) from e
    except Exception as e:
        raise DetectorImportError(f"detector module {full} failed to import: {type(e).__name__}: {e}") from e


for _m in _MODULES:
    import_detector_module(_m)
