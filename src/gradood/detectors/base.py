"""Detector base class and the registry.

Every detector is a function of :class:`~gradood.signals.Signals` plus fitted state, and every
``score`` returns one value per sample with **higher = more in-distribution** (ID). Detectors follow
scikit-learn habits: constructor arguments are the hyperparameters, stored unchanged; ``fit`` returns
``self``; fitted attributes end in ``_``; using a detector that needs fitting before ``fit`` raises
:class:`~gradood.errors.NotFittedError`.

Each detector declares:

* ``signals``: what it reads (``"logits"``, ``"features"``, ``"taps"``, ``"param-grads"``, ``"input-grads"``);
* ``fits_on_id``: whether ``fit`` needs ID (training) data;
* ``tunes_on_ood``: whether ``fit`` tunes on an OOD validation split (results tables mark these: they are
  not OOD-agnostic).

Hyperparameters are validated in ONE place, :meth:`Detector.__new__`, against the class's schema
(:mod:`gradood.detectors._hyperparams`) before ``__init__`` runs -- for ``create(name, ...)`` and direct
construction alike. The schema is inferred from the constructor's annotations and defaults (``float`` -> a
real number, ``int | None`` -> an integer or None, ``bool`` -> True/False, ``Sequence[float]`` -> a non-empty
list of numbers), refined by a class-level ``hyperparams`` mapping for ranges and choices::

    from . import _hyperparams as hp

    @register("my-detector")
    class MyDetector(Detector):
        hyperparams = {"temperature": hp.positive(), "k": hp.integer(minimum=1), "mode": hp.choice("a", "b")}

        def __init__(self, temperature: float = 1.0, k: int = 5, mode: str = "a", tune: bool = False) -> None:
            self.temperature, self.k, self.mode, self.tune = temperature, k, mode, tune  # stored unchanged

``__init__`` then stores its arguments unchanged (sequences as tuples, so that detectors stay hashable) and
checks only what involves several arguments at once. Strings are never coerced (``"false"`` is not False,
``"1"`` is not a number). ``tests/test_hyperparams.py`` checks every registered detector automatically: every
argument must have a typed annotation or a ``hyperparams`` entry, and every bool/int/float/grid argument
must refuse strings and other wrong types with a :class:`~gradood.errors.ConfigError` naming it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import numpy as np
import torch

from ..deploy._mixin import DeployMixin
from ..errors import ConfigError, InputError, NotFittedError, TuningDataError
from ..signals import FEATURES, LOGITS, Request, Signals
from . import _hyperparams as hp
from ._papers import Citation

D = TypeVar("D", bound="Detector")


class Detector(DeployMixin):
    """Base class. Subclasses implement ``requests`` (signals needed to score), optionally ``_fit``, and
    ``_score`` (a torch tensor of shape ``(N,)``, higher = more ID)."""

    #: registry name of the class's default configuration (set by :func:`register`)
    name: ClassVar[str] = ""
    #: citation of the method's source
    paper: ClassVar[str] = ""
    #: the same as a structured citation (tables show ``citation.short``: "first author et al., venue year")
    citation: ClassVar["Citation | None"] = None
    #: human-readable list of the signals the detector reads
    signals: ClassVar[tuple[str, ...]] = ("logits",)
    #: whether ``fit`` needs ID data
    fits_on_id: ClassVar[bool] = False
    #: whether this configuration tunes on OOD validation data (may be overridden per instance)
    tunes_on_ood: bool = False
    #: whether scoring needs the model itself (perturbation or gradients), not just cached forward signals
    needs_model: ClassVar[bool] = False
    #: type/range declarations of the constructor's arguments, over those inferred from its annotations
    #: (see the module docstring and :mod:`gradood.detectors._hyperparams`)
    hyperparams: ClassVar[dict[str, hp.Param]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> "Detector":
        # The one validation path: every constructor argument against the class's schema, before __init__.
        hp.validate_arguments(cls, args, kwargs, owner=cls.__dict__.get("name") or cls.name or cls.__name__)
        return super().__new__(cls)

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def param_schema(cls) -> dict[str, hp.Param]:
        """How each constructor argument is validated (declared ``hyperparams`` over inferred types)."""
        return dict(hp.schema_of(cls))

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters as passed to the constructor."""
        return {k: getattr(self, k) for k in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    @property
    def label(self) -> str:
        """Name used in results tables: the registry name, marked when tuned on OOD data."""
        return self.name or type(self).__name__.lower()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "class": type(self).__name__,
            "paper": self.paper,
            "signals": list(self.signals),
            "fits_on_id": self.fits_on_id,
            "tunes_on_ood": bool(self.tunes_on_ood),
            "needs_model": self.needs_model,
            "params": self.get_params(),
        }

    # ------------------------------------------------------------------ protocol
    def requests(self) -> list[Request]:
        """The signals ``score`` reads (may depend on fitted state)."""
        return [LOGITS]

    def fit_requests(self) -> list[Request]:
        """The signals ``fit`` reads from the ID data (default: the scoring signals when the detector fits or
        tunes, none when it does not: a detector without fitted state never runs the model over its fit data)."""
        return self.requests() if self._needs_fit() else []

    def fit(self: D, id_signals: Signals, *, ood_val: Signals | None = None,
            id_val: Signals | None = None) -> D:
        """Fit on ID data (``id_signals``). Detectors that tune on OOD data also take an OOD validation split
        ``ood_val`` and an ID validation split ``id_val`` (default: ``id_signals``). Returns ``self``."""
        _check_signals(id_signals, "id_signals")
        if ood_val is not None:
            _check_signals(ood_val, "ood_val")
        if id_val is not None:
            _check_signals(id_val, "id_val")
        if self.tunes_on_ood and ood_val is None:
            raise TuningDataError(
                f"{self.label} tunes on OOD validation data, so fit() needs ood_val=<signals of an OOD validation "
                f"split> (and ideally id_val=). Or {self._untuned_hint()}"
            )
        needed = self.fit_requests()
        if needed:
            id_signals.require(needed)
        else:
            id_signals.warm_up()  # one batch at most: the head and class count for the shape checks and contract
        self._record_shapes(id_signals)
        self._fit(id_signals, ood_val=ood_val, id_val=id_val)
        self._after_fit(id_signals)  # model contract for save/load (gradood.deploy)
        self.fitted_ = True
        return self

    def _untuned_hint(self) -> str:
        """How to configure this detector so that it needs no OOD data (used in the tuning error)."""
        return "use a configuration that needs no tuning (see the detector's docstring)."

    def _fit(self, signals: Signals, *, ood_val: Signals | None, id_val: Signals | None) -> None:
        """Compute fitted state. Default: nothing to fit."""

    def score(self, signals: Signals) -> np.ndarray:
        """One score per sample, float64 numpy array, higher = more in-distribution."""
        _check_signals(signals, "signals")
        self._check_fitted()
        self._check_contract(signals)  # a loaded detector refuses another model's signals
        signals.require(self.requests())
        self._check_shapes(signals)
        s = self._score(signals)
        if s.ndim != 1 or s.shape[0] != len(signals):
            raise RuntimeError(f"{self.label} returned scores of shape {tuple(s.shape)} for {len(signals)} samples.")
        return s.detach().to("cpu", torch.float64).numpy()

    def _score(self, signals: Signals) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "fitted_", False))

    def _needs_fit(self) -> bool:
        return self.fits_on_id or bool(self.tunes_on_ood)

    def _check_fitted(self) -> None:
        if self._needs_fit() and not self.is_fitted:
            raise NotFittedError(
                f"{self.label} is not fitted yet: call .fit(<signals of ID training data>) before .score()."
            )

    def _record_shapes(self, signals: Signals) -> None:
        n_c = signals.known_num_classes()
        if n_c is not None:
            self.n_classes_ = n_c
        if "features" in self.signals and signals.has(FEATURES):
            self.n_features_ = int(signals.features.shape[1])

    def _check_shapes(self, signals: Signals) -> None:
        n_c = getattr(self, "n_classes_", None)
        now = signals.known_num_classes()
        if n_c is not None and now is not None and now != n_c:
            raise InputError(
                f"{self.label} was fitted on a model with {n_c} classes, but these signals have "
                f"{now}: score with the model it was fitted on, or refit on this model's ID data."
            )
        n_f = getattr(self, "n_features_", None)
        if n_f is not None and signals.has(FEATURES) and signals.features.shape[1] != n_f:
            raise InputError(
                f"{self.label} was fitted on {n_f}-dimensional features, but these signals have "
                f"{signals.features.shape[1]}: score with the model/layer it was fitted on, or refit."
            )


def _check_signals(s: Any, what: str) -> None:
    if not isinstance(s, Signals):
        raise InputError(
            f"{what} must be gradood Signals (from probe.signals(data) or Signals.from_arrays(...)), "
            f"got {type(s).__name__}."
        )


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, tuple[type[Detector], dict[str, Any]]] = {}


def register(name: str, **defaults: Any) -> Callable[[type[D]], type[D]]:
    """Class decorator: register ``cls`` under ``name`` (with default hyperparameters ``defaults``).

    The first registration of a class sets its ``name``; further names (variants) are added with
    :func:`register_variant`."""

    def deco(cls: type[D]) -> type[D]:
        register_variant(name, cls, **defaults)
        if "name" not in cls.__dict__:
            cls.name = name
        return cls

    return deco


def register_variant(name: str, cls: type[Detector], **defaults: Any) -> None:
    if name in _REGISTRY and _REGISTRY[name][0] is not cls:
        raise ConfigError(f"detector name {name!r} is registered twice.")
    bad = set(defaults) - set(cls._param_names())
    if bad:
        raise ConfigError(f"variant {name!r} sets unknown hyperparameters {sorted(bad)} of {cls.__name__}.")
    _REGISTRY[name] = (cls, dict(defaults))


def _ensure_loaded() -> None:
    from . import _all  # noqa: F401  (imports every detector module, which registers them)


def available() -> list[str]:
    """Names of every registered detector, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def create(name: str, **hyperparameters: Any) -> Detector:
    """Create a detector by registry name with keyword hyperparameters (overriding the variant's defaults)."""
    _ensure_loaded()
    if name not in _REGISTRY:
        # sorted: the suggestions must not depend on which detector module happened to be imported first
        close = sorted(n for n in _REGISTRY if name.lower().replace("_", "-") in n or n in name.lower())
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"unknown detector {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    cls, defaults = _REGISTRY[name]
    valid = cls._param_names()
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {unknown} for detector {name!r}; valid ones: {', '.join(valid) or 'none'}."
        )
    det = cls(**{**defaults, **hyperparameters})
    det.name = name  # instance attribute: the variant's name
    return det


def detector_class(name: str) -> tuple[type[Detector], dict[str, Any]]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector {name!r}. Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def describe(name: str) -> dict[str, Any]:
    """What a registered detector reads, fits and tunes, without fitting it."""
    return create(name).info()


# ---------------------------------------------------------------------- single-value checks
# For values that are not constructor arguments (constructor arguments go through the class schema). Each
# applies the same rules as the schema, so both paths accept and refuse exactly the same values.
def check_positive(value: float, what: str, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """A real number > 0 (>= 0 with ``allow_zero``), finite unless ``allow_inf``; strings are refused."""
    hp.real(low=0, low_open=not allow_zero, inf=allow_inf).validate(value, what)
    return float(value)


def check_int(value: Any, what: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer (bools, floats and strings are refused) >= ``minimum``."""
    hp.integer(minimum=minimum, none=allow_none).validate(value, what)
    return None if value is None else int(value)


def check_bool(value: Any, what: str) -> bool:
    """Only True/False (a string "false" from a config file is refused, since ``bool("false")`` is True)."""
    hp.boolean().validate(value, what)
    return bool(value)


def check_number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    hp.real(low=low, high=high, low_open=low_open, inf=high is None).validate(value, what)
    return float(value)


def check_open_fraction(value: Any, what: str) -> float:
    """A real number strictly between 0 and 1 (a split of the validation data)."""
    hp.real(low=0, high=1, low_open=True, high_open=True).validate(value, what)
    return float(value)


def check_choice(value: Any, what: str, choices: Sequence[Any]) -> Any:
    hp.choice(*choices).validate(value, what)
    return value
