"""The one hyperparameter validation path (``Detector.__new__`` against each class's schema) and its
registry-wide contract: every bool/int/float/grid hyperparameter of every registered detector -- including
detectors registered after this test was written -- refuses strings and other wrong types with a
ConfigError that names the parameter."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import pytest

import gradood
from gradood.detectors import _hyperparams as hp
from gradood.detectors.base import (Detector, check_bool, check_choice, check_int, check_number,
                                    check_open_fraction, check_positive, detector_class)

NAMES = gradood.available()


def _schema(name: str) -> dict[str, hp.Param]:
    cls, _ = detector_class(name)
    return cls.param_schema()


def _bad_values(p: hp.Param) -> list[Any]:
    """Values of the wrong type for a parameter of kind ``p.kind`` (strings first: a TOML/CLI typo)."""
    maybe_none = [] if p.none_ok else [None]
    if p.kind == "bool":
        return ["false", "true", "False", "0", 1, 0, 1.0, [True], *maybe_none]
    if p.kind == "int":
        return ["3", "1", 2.5, 3.0, True, [3], float("nan"), *maybe_none]
    if p.kind == "real":
        return ["1", "0.5", "inf", True, False, [1.0], float("nan"), 1 + 0j, *maybe_none]
    if p.kind == "reals":
        return ["0.1", "0.1, 0.2", 0.1, [], ["0.1"], [True], [float("nan")], [[0.1]], *maybe_none]
    raise AssertionError(p.kind)


CASES = [(name, param) for name in NAMES for param, p in _schema(name).items() if p.kind in hp.NUMERIC_KINDS]


@pytest.mark.parametrize("name,param", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_wrong_type_is_a_config_error_naming_the_parameter(name, param):
    problems = []
    for bad in _bad_values(_schema(name)[param]):
        try:
            gradood.create(name, **{param: bad})
        except gradood.ConfigError as e:
            msg = str(e)
            if not (re.search(rf"\b{param}\b", msg) and f"got {bad!r}" in msg):
                problems.append(f"{bad!r}: message does not name {param!r} and the value: {msg}")
        else:
            problems.append(f"{bad!r} was accepted")
    assert not problems, f"{name}.{param}: " + "; ".join(problems)


def test_the_contract_covers_the_registry():
    """The registry-wide test above cannot pass vacuously: it checks every numeric hyperparameter, and there
    are many (138 bool/int/float ones when the issue was filed, more since)."""
    numeric = [(n, p) for n in NAMES for p, spec in _schema(n).items() if spec.kind in hp.NUMERIC_KINDS]
    assert len(numeric) >= 138
    assert {"tune", "temperature", "temperatures", "epsilons", "k", "dim"} <= {p for _, p in numeric}


_SCALAR = {"bool": "bool", "int": "int", "float": "real"}


def _kind_from_annotation(annotation: str) -> str | None:
    """The kind an annotation string demands, read independently of the library's inference."""
    a = re.sub(r"\s*\|\s*None$", "", annotation.replace("Optional[", "").rstrip("]") if annotation.startswith(
        "Optional[") else annotation)
    if a in _SCALAR:
        return _SCALAR[a]
    if re.fullmatch(r"(Sequence|list|tuple)\[(float|int)(, \.\.\.)?\]", a):
        return "reals"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_every_hyperparameter_has_a_checked_type(name):
    """Every constructor argument is typed (annotation or ``hyperparams`` entry), and a numeric annotation or
    default cannot be declared away as an unchecked kind."""
    import inspect

    cls, _ = detector_class(name)
    schema = cls.param_schema()
    sig = inspect.signature(cls.__init__)
    for pname, spec in schema.items():
        assert spec.kind != "any", f"{name}: hyperparameter {pname!r} has no type: annotate it or declare it in hyperparams"
        par = sig.parameters[pname]
        ann = par.annotation if isinstance(par.annotation, str) else getattr(par.annotation, "__name__", "")
        want = _kind_from_annotation(ann)
        if want is not None:
            assert spec.kind == want or (want == "int" and spec.kind == "real"), (name, pname, ann, spec.kind)
        default = par.default
        if isinstance(default, bool):
            assert spec.kind == "bool", (name, pname)
        elif isinstance(default, (int, float)) and spec.kind not in ("custom",):
            assert spec.kind in ("int", "real"), (name, pname, spec.kind)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_pass_their_own_schema_and_are_stored_unchanged(name):
    cls, variant = detector_class(name)
    det = gradood.create(name)
    for pname, value in det.get_params().items():
        cls.param_schema()[pname].validate(value, pname)
    for pname, value in variant.items():
        stored = det.get_params()[pname]
        assert stored == (tuple(value) if isinstance(value, list) else value) and type(stored) is type(value)


# ---------------------------------------------------------------------- the examples
def test_string_false_does_not_turn_tuning_on():
    with pytest.raises(gradood.ConfigError, match=r"grodin: tune must be true or false, got 'false' \(a str\)"):
        gradood.create("grodin", tune="false")
    with pytest.raises(gradood.ConfigError, match=r"temperature must be a number > 0.*got '1'"):
        gradood.create("msp", temperature="1")


def test_direct_construction_takes_the_same_path():
    from gradood.detectors.grodin import GRODIN
    from gradood.detectors.knn import KNN

    with pytest.raises(gradood.ConfigError, match=r"tune must be true or false"):
        GRODIN(tune="false")
    with pytest.raises(gradood.ConfigError, match=r"k must be a positive integer, got '5'"):
        KNN("5")  # positional arguments are bound to their names first
    with pytest.raises(gradood.ConfigError, match=r"unknown hyperparameter\(s\) \['kk'\]"):
        KNN(kk=5)


def test_values_are_stored_as_given():
    det = gradood.create("odin", temperature=10, eps=np.float64(0.001), epsilons=[0, 0.001])
    assert det.temperature == 10 and type(det.temperature) is int
    assert type(det.eps) is np.float64
    assert det.epsilons == (0, 0.001)  # sequences as tuples (hashable), values untouched
    assert det.tuning_grid()[1] == (0.0, 0.001)


def test_numpy_numbers_are_accepted():
    det = gradood.create("knn", k=np.int64(3), fraction=np.float32(0.5), normalize=np.bool_(False))
    assert det.k == 3 and det.fraction == 0.5 and not det.normalize
    gradood.create("grodin", temperatures=np.array([1.0, 10.0]))


@pytest.mark.parametrize("value", [2.5, 3.0, "3", True])
def test_integers_refuse_floats_and_bools(value):
    with pytest.raises(gradood.ConfigError, match=r"knn: k must be a positive integer"):
        gradood.create("knn", k=value)


def test_choices_refuse_other_types():
    with pytest.raises(gradood.ConfigError, match=r"norm must be one of \['l1', 'l2', 'l2sq'\], got 1"):
        gradood.create("gradnorm", norm=1)
    with pytest.raises(gradood.ConfigError, match=r"params must be 'all', a positive integer"):
        gradood.create("grodin", params=0)
    with pytest.raises(gradood.ConfigError, match=r"params must be 'all'"):
        gradood.create("grodin", params="some")
    assert gradood.create("grodin", params=["fc.weight"]).params == ("fc.weight",)


# ---------------------------------------------------------------------- detectors written later
class _Later(Detector):
    """A detector that declares nothing but annotations, as a new module might."""

    def __init__(self, t: float = 1.0, n: int = 2, flag: bool = False, grid: Sequence[float] = (1.0,),
                 dim: int | None = None, mode: str = "a") -> None:
        self.t, self.n, self.flag, self.grid, self.dim, self.mode = t, n, flag, tuple(grid), dim, mode


@pytest.mark.parametrize("kwargs", [{"t": "1"}, {"n": "2"}, {"n": 2.0}, {"flag": "false"}, {"grid": "1.0"},
                                    {"grid": [1.0, "2"]}, {"dim": "3"}, {"mode": 3}, {"t": math.nan}])
def test_a_new_detector_is_checked_from_its_annotations_alone(kwargs):
    (key, value), = kwargs.items()
    with pytest.raises(gradood.ConfigError, match=rf"{key} must be .*got {re.escape(repr(value))}"):
        _Later(**kwargs)
    ok = _Later(t=2, n=3, flag=True, grid=[0.5, 1], dim=None, mode="b")
    assert ok.get_params() == {"t": 2, "n": 3, "flag": True, "grid": (0.5, 1), "dim": None, "mode": "b"}


def test_declared_ranges_override_the_inferred_type():
    class Ranged(_Later):
        hyperparams = {"t": hp.positive(), "n": hp.integer(minimum=2)}

    with pytest.raises(gradood.ConfigError, match=r"t must be > 0"):
        Ranged(t=0.0)
    with pytest.raises(gradood.ConfigError, match=r"n must be >= 2, got 1"):
        Ranged(n=1)
    with pytest.raises(gradood.ConfigError, match=r"flag must be true or false"):  # inherited inference
        Ranged(flag="yes")


# ---------------------------------------------------------------------- the single-value helpers
@pytest.mark.parametrize("fn", [
    lambda v: check_positive(v, "x"), lambda v: check_number(v, "x", low=0, high=2),
    lambda v: check_open_fraction(v, "x"), lambda v: check_int(v, "x"), lambda v: check_bool(v, "x"),
])
@pytest.mark.parametrize("value", ["1", "0.5", None, [1]])
def test_check_helpers_refuse_strings(fn, value):
    with pytest.raises(gradood.ConfigError, match=r"x must be .*got"):
        fn(value)


def test_check_helpers_accept_and_convert():
    assert check_positive(2, "x") == 2.0 and check_int(np.int64(4), "x") == 4 and check_bool(np.bool_(True), "x")
    assert check_open_fraction(0.25, "x") == 0.25 and check_choice("a", "x", ("a", "b")) == "a"
    with pytest.raises(gradood.ConfigError, match=r"x must be in \(0, 1\), got 1"):
        check_open_fraction(1, "x")
