"""Imports every detector module so that each registers itself (kept in one place for the registry)."""

from __future__ import annotations

import importlib

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
]

for _m in _MODULES:
    try:
        importlib.import_module(f"{__package__}.{_m}")
    except ModuleNotFoundError as e:  # a module not written yet; anything else is a real error
        if e.name != f"{__package__}.{_m}":
            raise
