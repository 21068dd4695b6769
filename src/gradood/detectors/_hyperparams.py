"""The one validation path for detector hyperparameters.

Every detector's constructor arguments are described by a schema: one :class:`Param` per argument, giving
its type (bool, int, real number, sequence of real numbers, one of a set of strings, ...) and range. The
schema of a class is its ``hyperparams`` declarations (ranges, choices) merged over what the constructor's
annotations and defaults say (``float`` -> a real number, ``int | None`` -> an integer or None,
``Sequence[float]`` -> a sequence of reals, ``bool`` -> True/False), so a detector that declares nothing
still gets its types checked. :meth:`Detector.__new__ <gradood.detectors.base.Detector>` validates every
argument against it before ``__init__`` runs, for ``create(name, ...)`` and direct construction alike; the
constructor then stores the arguments unchanged (sequences as tuples).

Strings are never converted: ``"false"`` is not a bool (``bool("false")`` is True), ``"1"`` is not a number
(a spec or command line that yields strings is a configuration error, named, not a silently different run).
Integers refuse floats (``k=2.5`` and ``k=5.0`` alike: write ``5``) and booleans (``True`` is an int in
Python).
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError

KINDS = ("bool", "int", "real", "reals", "choice", "str", "strs", "custom", "any")
#: kinds the registry-wide contract test feeds strings and other wrong types to
NUMERIC_KINDS = ("bool", "int", "real", "reals")


@dataclass(frozen=True)
class Param:
    """How one hyperparameter is validated. Build with :func:`boolean`, :func:`integer`, :func:`real`,
    :func:`reals`, :func:`choice`, :func:`text`, :func:`names` or :func:`custom`."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False
    none_ok: bool = False
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], bool] | None = None
    what: str = ""  # description for kind "custom"

    def validate(self, value: Any, name: str, owner: str = "") -> None:
        """Raise :class:`ConfigError` naming ``name`` (and ``owner``, the detector) if ``value`` does not fit."""
        if value is None and self.none_ok:
            return
        problem = self._problem(value)
        if problem is not None:
            where = f"{owner}: " if owner else ""
            raise ConfigError(f"{where}{name} must be {problem}, got {value!r}{_type_note(value)}.")

    # ------------------------------------------------------------------ descriptions
    def describe(self) -> str:
        """What a valid value is, in words ("a number > 0", "an integer >= 2 or None")."""
        return self._kind_words() + (" or None" if self.none_ok else "")

    def _kind_words(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            return _int_words(self.low)
        if self.kind == "real":
            return "a number" + self._range_words(" ")
        if self.kind == "reals":
            return "a non-empty list of numbers" + self._range_words(", each ")
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        if self.kind == "str":
            return "a non-empty string"
        if self.kind == "strs":
            return "a list of names (strings)"
        if self.kind == "custom":
            return self.what
        return "anything"

    def _range_words(self, sep: str) -> str:
        if self.low is not None and self.high is not None:
            return f"{sep}in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}"
            return f"{sep}{bound}{' (inf allowed)' if self.allow_inf else ' and finite'}"
        if self.high is not None:
            return f"{sep}{'<' if self.high_open else '<='} {self.high:g}"
        return f"{sep}(finite)" if not self.allow_inf else ""

    def _bound_words(self) -> str:
        """The range alone, for values of the right type outside it (``> 0 and finite``, ``in (0, 1]``)."""
        if self.kind == "int":
            return self.describe() if self.low in (0, 1) else f">= {int(self.low)}"  # type: ignore[arg-type]
        if self.low is None and self.high is None:
            return "finite"
        return self._range_words("").strip()

    # ------------------------------------------------------------------ checks
    def _problem(self, value: Any) -> str | None:
        """None if ``value`` is valid, else what it must be."""
        if self.kind == "bool":
            return None if isinstance(value, (bool, np.bool_)) else self.describe()
        if self.kind == "int":
            if not _is_int(value):
                return self.describe()
            return None if self.low is None or value >= self.low else self._bound_words()
        if self.kind == "real":
            if not _is_real(value):
                return self.describe()
            return None if self._in_range(float(value)) else self._bound_words()
        if self.kind == "reals":
            if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) == 0:
                return self.describe()
            if isinstance(value, np.ndarray) and value.ndim != 1:
                return self.describe()
            if not all(_is_real(v) and self._in_range(float(v)) for v in value):
                return self.describe()
            return None
        if self.kind == "choice":
            ok = any(type(value) is type(c) and value == c for c in self.choices)
            return None if ok else self.describe()
        if self.kind == "str":
            return None if isinstance(value, str) and value else self.describe()
        if self.kind == "strs":
            ok = (not isinstance(value, (str, bytes)) and isinstance(value, Sequence)
                  and all(isinstance(v, str) and v for v in value))
            return None if ok else self.describe()
        if self.kind == "custom":
            assert self.check is not None
            return None if self.check(value) else self.describe()
        return None

    def _in_range(self, v: float) -> bool:
        if math.isnan(v) or (math.isinf(v) and not self.allow_inf):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


def _int_words(low: float | None) -> str:
    return {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        low, f"an integer >= {low}")  # type: ignore[arg-type]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _type_note(value: Any) -> str:
    """`` (a str)`` for values whose repr hides the type that made them invalid."""
    return f" (a {type(value).__name__})" if isinstance(value, (str, bool, np.bool_)) else ""


# ---------------------------------------------------------------------- constructors
def boolean(*, none: bool = False) -> Param:
    return Param("bool", none_ok=none)


def integer(*, minimum: int | None = None, none: bool = False) -> Param:
    return Param("int", low=minimum, none_ok=none)


def real(*, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
         inf: bool = False, none: bool = False) -> Param:
    """A real number (not a bool, not a string) in the range; NaN never, inf only with ``inf=True``."""
    return Param("real", low=low, high=high, low_open=low_open, high_open=high_open, allow_inf=inf, none_ok=none)


def positive(*, inf: bool = False, none: bool = False) -> Param:
    """A real number > 0 (a temperature, a scale)."""
    return real(low=0, low_open=True, inf=inf, none=none)


def non_negative(*, inf: bool = False, none: bool = False) -> Param:
    """A real number >= 0 (an input-perturbation step, a weight)."""
    return real(low=0, inf=inf, none=none)


def reals(*, low: float | None = None, high: float | None = None, low_open: bool = False, none: bool = False) -> Param:
    """A non-empty list/tuple/1-d array of real numbers, each in the range (a tuning grid)."""
    return Param("reals", low=low, high=high, low_open=low_open, none_ok=none)


def choice(*options: Any, none: bool = False) -> Param:
    return Param("choice", choices=tuple(options), none_ok=none)


def text(*, none: bool = False) -> Param:
    return Param("str", none_ok=none)


def names(*, none: bool = False) -> Param:
    """A list of module/parameter names."""
    return Param("strs", none_ok=none)


def custom(check: Callable[[Any], bool], what: str, *, none: bool = False) -> Param:
    """Anything ``check`` accepts; ``what`` says what that is ("'all', an int or a list of parameter names")."""
    return Param("custom", check=check, what=what, none_ok=none)


ANY = Param("any")
SEED = integer(minimum=0)
#: which network parameters a gradient counts: "all", the last k parametrised layers, or a list of names
PARAM_SCOPE = custom(lambda v: (isinstance(v, str) and v == "all") or (_is_int(v) and v >= 1) or (
    isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(p, str) and p for p in v)),
    "'all', a positive integer (the last k parametrised layers) or a list of parameter names")


# ---------------------------------------------------------------------- inference from the signature
def _strip_none(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # type: ignore[return-value]
    return tp, False


def _sequence_of(tp: Any) -> Any | None:
    """The element type of ``Sequence[X]`` / ``list[X]`` / ``tuple[X, ...]``, else None."""
    origin = typing.get_origin(tp)
    if origin is None or not isinstance(origin, type):
        return None
    if not issubclass(origin, Sequence) or issubclass(origin, str):
        return None
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return args[0] if len(set(args)) == 1 else None


def infer_param(annotation: Any, default: Any) -> Param:
    """The Param an annotation (and default value) implies; :data:`ANY` when neither says a type."""
    if annotation is Any:
        return ANY
    if annotation is inspect.Parameter.empty:
        tp, none = None, default is None
    else:
        tp, none = _strip_none(annotation)
    if tp is None and default is not None and default is not inspect.Parameter.empty:
        tp = type(default) if isinstance(default, (bool, int, float, str)) else None
    if tp is bool:
        return boolean(none=none)
    if tp is int:
        return integer(none=none)
    if tp is float:
        return real(none=none)
    if tp is str:
        return text(none=none)
    elem = _sequence_of(tp) if tp is not None else None
    if elem in (float, int):
        return reals(none=none)
    if elem is str:
        return names(none=none)
    return ANY


def signature_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {p.name: p for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _annotations(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that names a TYPE_CHECKING-only type: fall back to the defaults
        return {}


def schema_of(cls: type) -> dict[str, Param]:
    """The full schema of ``cls``: declared ``hyperparams`` (nearest class first) over inferred ones."""
    cached = cls.__dict__.get("_schema_cache")
    if cached is not None:
        return cached
    declared: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        declared.update(getattr(klass, "__dict__", {}).get("hyperparams", {}) or {})
    hints = _annotations(cls)
    out = {}
    for name, p in signature_params(cls).items():
        out[name] = declared.get(name) or infer_param(hints.get(name, p.annotation if not isinstance(
            p.annotation, str) else inspect.Parameter.empty), p.default)
    cls._schema_cache = out  # type: ignore[attr-defined]
    return out


def validate_arguments(cls: type, args: tuple, kwargs: Mapping[str, Any], owner: str) -> None:
    """Validate the arguments a constructor call would bind (and the defaults it would fill in)."""
    params = signature_params(cls)
    if len(args) > len(params):
        raise ConfigError(f"{owner} takes at most {len(params)} hyperparameters, got {len(args)} positional ones.")
    bound = dict(zip(params, args))
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"unknown hyperparameter(s) {unknown} for {owner}; valid ones: {', '.join(params) or 'none'}.")
    bound.update(kwargs)
    schema = schema_of(cls)
    for name, p in params.items():
        if name in bound:
            schema[name].validate(bound[name], name, owner)
