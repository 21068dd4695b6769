"""Detectors: every score is one value per sample, higher = more in-distribution.

``available()`` lists registry names, ``create(name, **hyperparameters)`` builds one, ``describe(name)``
says what it reads, fits and tunes.
"""

from .base import Detector, available, create, describe, register, register_variant

__all__ = ["Detector", "available", "create", "describe", "register", "register_variant"]
