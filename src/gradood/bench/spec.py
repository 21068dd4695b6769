"""Benchmark specs: a small TOML file naming models, ID fit/test sets, OOD sets and detectors.

Example (the built-in default is ``gradood/bench/specs/default.toml``)::

    name = "mnist-small"
    batch_size = 256
    ood_val = 500                       # samples held out of every OOD set to tune OOD-tuned detectors

    [[run]]
    model = "mnist-cnn-ccexam"          # see `gradood list`
    id_fit  = { dataset = "mnist", split = "train", n = 10000 }
    id_val  = { dataset = "mnist", split = "val", n = 1000 }
    id_test = { dataset = "mnist", split = "test" }
    ood = [
      { dataset = "fashion_mnist", split = "test", group = "near" },
      { dataset = "uniform_noise", n = 2000, group = "far" },
    ]
    detectors = ["all"]                 # or names, or tables: { name = "knn", k = 10, label = "knn-10" }

    [overrides.odin-tuned]              # hyperparameters for detectors, also when expanded from "all"
    temperatures = [1, 10, 100, 1000]

Dataset entries take ``dataset``, ``split``, ``n`` (a seeded random subset), ``name`` (display name),
``resize`` (side length), ``channels`` (1 or 3), ``root`` (folder, for user datasets such as CIFAR) and
``options`` (passed to the loader, e.g. noise ``shape``), ``start``/``stop`` (a slice of the split taken
before ``n`` is drawn: keeps a validation part disjoint from the fit part). Validation happens before anything runs: unknown
datasets, models or detectors, bad hyperparameters and image-size mismatches are reported with the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_SPEC = "default.toml"


@dataclass(frozen=True)
class DataRef:
    dataset: str
    split: str | None = None
    n: int | None = None
    name: str | None = None
    group: str = "far"
    resize: int | None = None
    channels: int | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    start: int | None = None
    stop: int | None = None

    @property
    def label(self) -> str:
        return self.name or (self.dataset if self.split in (None, "all", "test") else f"{self.dataset}-{self.split}")

    def key(self, seed: int) -> str:
        """Stable identity of the exact samples (for cache folders)."""
        blob = json.dumps({**asdict(self), "seed": seed}, sort_keys=True, default=str)
        return f"{self.dataset}-{self.split or 'default'}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class DetectorRef:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or self.name

    def key(self) -> str:
        blob = json.dumps({"name": self.name, "params": self.params}, sort_keys=True, default=str)
        return f"{self.display}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class RunSpec:
    model: str
    id_fit: DataRef
    id_test: DataRef
    oods: tuple[DataRef, ...]
    detectors: tuple[DetectorRef, ...]
    id_val: DataRef | None = None


@dataclass(frozen=True)
class BenchSpec:
    name: str
    runs: tuple[RunSpec, ...]
    description: str = ""
    batch_size: int = 256
    seed: int = 0
    ood_val: int = 500
    bootstrap: int = 0
    checkpoint_every: int = 20
    source: str = ""


# ---------------------------------------------------------------------- the schema
#: A safe display name: it becomes part of file names, so no path separators, and it must be short.
SAFE_LABEL = re.compile(r"[A-Za-z0-9_.+() -]{1,64}")


@dataclass(frozen=True)
class Field:
    """One key of a spec table: its kind, its bounds and what it means (docs/spec.md is generated from these)."""

    kind: str  # "str", "int", "table", "list", "choice", "label", "data", "detectors"
    doc: str
    default: Any = None
    minimum: int | None = None
    choices: tuple[Any, ...] = ()
    example: str = ""


TOP_FIELDS: dict[str, Field] = {
    "name": Field("str", "name of the benchmark; non-default specs write to ./gradood-results-<name>",
                  example='"mnist-small"'),
    "description": Field("str", "free text shown nowhere but in the spec", default="", example='"my first spec"'),
    "batch_size": Field("int", "samples per forward pass", default=256, minimum=1, example="256"),
    "seed": Field("int", "seed of every random subset, hold-out split and noise set", default=0, minimum=0,
                  example="0"),
    "ood_val": Field("int", "samples held out of every OOD set to tune the OOD-tuned detectors (marked †); "
                     "at most half of the smallest OOD set", default=500, minimum=1, example="500"),
    "bootstrap": Field("int", "bootstrap resamples for confidence intervals of the metrics (0 = none)", default=0,
                       minimum=0, example="0"),
    "checkpoint_every": Field("int", "batches between resumable checkpoints of a signal extraction", default=20,
                              minimum=1, example="20"),
    "detectors": Field("detectors", "default detector list of every run: \"all\", names, or tables "
                       "{ name = ..., label = ..., <hyperparameter> = ... }", default=["all"],
                       example='["all"]'),
    "overrides": Field("table", "[overrides.<detector>] tables: hyperparameters for that registry name, also "
                       "when it is expanded from \"all\""),
    "run": Field("list", "[[run]] tables: one model and its ID/OOD data (at least one)"),
}

RUN_FIELDS: dict[str, Field] = {
    "model": Field("str", "registered model name (gradood list)", example='"mnist-cnn-ccexam"'),
    "id_fit": Field("data", "ID data the detectors are fitted on (required)",
                    example='{ dataset = "mnist", split = "train", n = 10000 }'),
    "id_val": Field("data", "ID validation data for the OOD-tuned detectors (default: id_fit)",
                    example='{ dataset = "mnist", split = "val", n = 1000 }'),
    "id_test": Field("data", "ID test data (required)", example='{ dataset = "mnist", split = "test" }'),
    "ood": Field("list", "non-empty list of OOD dataset entries",
                 example='[{ dataset = "fashion_mnist", split = "test", group = "near" }, '
                         '{ dataset = "uniform_noise", n = 2000, group = "far" }]'),
    "detectors": Field("detectors", "this run's detectors (default: the top-level list)", example='["msp", "knn"]'),
}

DATA_FIELDS: dict[str, Field] = {
    "dataset": Field("str", "registered dataset name (gradood list)", example='"mnist"'),
    "split": Field("str", "split of the dataset (default: its default split)", example='"test"'),
    "n": Field("int", "a seeded random subset of this many samples (at most the samples available)", minimum=1,
               example="1000"),
    "name": Field("label", "display name in the tables (default: dataset[-split])", example='"uniform noise"'),
    "group": Field("choice", "near or far OOD (tables group by it)", default="far", choices=("near", "far"),
                   example='"near"'),
    "resize": Field("int", "resize images to this side length", minimum=1, example="28"),
    "channels": Field("choice", "convert images to 1 (grey) or 3 (RGB) channels", choices=(1, 3), example="1"),
    "root": Field("str", "folder of a user dataset (CIFAR, SVHN, image folders)", example='"~/data/cifar10"'),
    "options": Field("table", "passed to the dataset's loader, e.g. noise shape", example="{ }"),
    "start": Field("int", "first sample of a slice taken before n is drawn (keeps validation disjoint from fit)",
                   minimum=0, example="50000"),
    "stop": Field("int", "end of that slice (exclusive)", minimum=0, example="60000"),
}

DETECTOR_FIELDS: dict[str, Field] = {
    "name": Field("str", "registered detector name (gradood list)", example='"knn"'),
    "label": Field("label", "display name in the tables, unique per run (default: name)", example='"knn-10"'),
}


class Problems:
    """Collects every problem of a spec so that all of them are reported together, before any work starts."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigError(f"{self.source}: {self.items[0]}")
        if self.items:
            raise ConfigError(f"{self.source} has {len(self.items)} problems:\n  - " + "\n  - ".join(self.items))


def did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_keys(table: dict[str, Any], fields: Any, where: str, problems: Problems, extra: Any = ()) -> None:
    allowed = sorted(set(fields) | set(extra))
    for key in table:
        if key not in allowed:
            problems.add(where, f"unknown key {key!r}.{did_you_mean(key, allowed)} Allowed: {', '.join(allowed)}.")


def _check_value(value: Any, f: Field, where: str, problems: Problems) -> bool:
    """Whether ``value`` is valid for ``f``; adds a problem naming the fix when it is not."""
    if f.kind in ("str", "label"):
        if not isinstance(value, str) or not value.strip():
            problems.add(where, f"must be a non-empty string, got {value!r}.")
            return False
        if f.kind == "label" and (not SAFE_LABEL.fullmatch(value) or value.strip(" .") == ""):
            problems.add(where, f"{value!r} is not a safe name: use at most 64 letters, digits, spaces and "
                                "-_.+() (no / or \\: labels become file names).")
            return False
        return True
    if f.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, f"must be an integer, got {value!r}.")
            return False
        if f.minimum is not None and value < f.minimum:
            problems.add(where, f"must be >= {f.minimum}, got {value!r}.")
            return False
        return True
    if f.kind == "choice":
        if isinstance(value, bool) or value not in f.choices:
            problems.add(where, f"must be one of {', '.join(map(repr, f.choices))}, got {value!r}.")
            return False
        return True
    if f.kind == "table":
        if not isinstance(value, dict):
            problems.add(where, f"must be a table, got {value!r}.")
            return False
        return True
    if f.kind == "list":
        if not isinstance(value, list) or not value:
            problems.add(where, f"must be a non-empty list, got {value!r}.")
            return False
        return True
    return True


def _data_ref(raw: Any, where: str, problems: Problems) -> DataRef | None:
    if isinstance(raw, str):
        raw = {"dataset": raw}
    if not isinstance(raw, dict) or "dataset" not in raw:
        problems.add(where, f"a dataset entry needs at least dataset = \"<name>\", got {raw!r}.")
        return None
    _check_keys(raw, DATA_FIELDS, where, problems)
    ok = all(_check_value(v, DATA_FIELDS[k], f"{where} {k}", problems) for k, v in raw.items() if k in DATA_FIELDS)
    start, stop = raw.get("start"), raw.get("stop")
    if ok and start is not None and stop is not None and stop <= start:
        problems.add(where, f"stop ({stop}) must be greater than start ({start}).")
        ok = False
    if not ok or set(raw) - set(DATA_FIELDS):
        return None
    return DataRef(dataset=raw["dataset"], split=raw.get("split"), n=raw.get("n"), name=raw.get("name"),
                   group=raw.get("group", "far"), resize=raw.get("resize"), channels=raw.get("channels"),
                   root=raw.get("root"), options=dict(raw.get("options", {})), start=start, stop=stop)


def _validated_params(name: str, params: dict[str, Any], where: str, problems: Problems) -> bool:
    from ..detectors import create

    try:
        create(name, **params)  # validates hyperparameters now, not an hour into the run
    except ConfigError as e:
        problems.add(where, str(e))
        return False
    return True


def _detector_refs(raw: Any, where: str, problems: Problems,
                   overrides: dict[str, dict[str, Any]]) -> tuple[DetectorRef, ...]:
    from ..detectors import available

    names = available()
    if not isinstance(raw, list) or not raw:
        problems.add(where, f"detectors must be a non-empty list of names or tables, got {raw!r}.")
        return ()
    refs: list[DetectorRef] = []
    for i, item in enumerate(raw):
        at = f"{where} detectors[{i}]"
        if item == "all":
            refs.extend(DetectorRef(r.name, dict(overrides.get(r.name, {}))) for r in all_detectors())
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.add(at, f"each detector is a name or a table with name = \"...\", got {item!r}.")
            continue
        name = item["name"]
        if name not in names:
            problems.add(at, f"unknown detector {name!r}.{did_you_mean(name, names)} See `gradood list`.")
            continue
        label = item.get("label")
        if label is not None and not _check_value(label, DETECTOR_FIELDS["label"], f"{at} label", problems):
            continue
        params = {**overrides.get(name, {}), **{k: v for k, v in item.items() if k not in DETECTOR_FIELDS}}
        if _validated_params(name, params, at, problems):
            refs.append(DetectorRef(name, params, label))
    seen: dict[str, DetectorRef] = {}
    for r in refs:
        if r.display in seen:
            same = seen[r.display] == r
            problems.add(where, f"detector {r.display!r} is listed twice"
                         + (" (drop the repeat)." if same else
                            f" with other settings: give one of them label = \"{r.display}-2\" (labels name the "
                            "rows of the results, so they must be unique)."))
            continue
        seen[r.display] = r
    return tuple(seen.values())


def all_detectors() -> list[DetectorRef]:
    """Every registered detector, minus entries whose class and hyperparameters repeat an earlier one (the
    generic ``output-feature`` family defaults to energy x l1, already listed as ``energy-x-l1``) and
    classes marked ``in_all = False`` (they apply to some models only: ``mc-dropout`` needs dropout layers)."""
    from ..detectors import available, create

    seen: set[str] = set()
    refs = []
    for name in available():
        d = create(name)
        if not getattr(type(d), "in_all", True):
            continue
        ident = f"{type(d).__name__}:{json.dumps(d.get_params(), sort_keys=True, default=str)}"
        if ident in seen:
            continue
        seen.add(ident)
        refs.append(DetectorRef(name))
    return refs


def _overrides(raw: Any, problems: Problems) -> dict[str, dict[str, Any]]:
    from ..detectors import available

    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        problems.add("overrides", "[overrides.<detector>] tables must map hyperparameter names to values.")
        return {}
    names = available()
    good = {}
    for name, params in raw.items():
        if name not in names:
            problems.add(f"[overrides.{name}]", f"unknown detector {name!r}.{did_you_mean(name, names)} "
                                                "See `gradood list`.")
        elif _validated_params(name, params, f"[overrides.{name}]", problems):
            good[name] = params
    return good


def _run_spec(r: Any, where: str, problems: Problems, top_detectors: Any,
              overrides: dict[str, dict[str, Any]]) -> RunSpec | None:
    if not isinstance(r, dict):
        problems.add(where, f"must be a table, got {r!r}.")
        return None
    _check_keys(r, RUN_FIELDS, where, problems)
    missing = [k for k in ("model", "id_fit", "id_test", "ood") if k not in r]
    for k in missing:
        problems.add(where, f"missing {k!r} ({RUN_FIELDS[k].doc}).")
    model_ok = "model" in r and _check_value(r["model"], RUN_FIELDS["model"], f"{where} model", problems)
    refs = {k: _data_ref(r[k], f"{where} {k}", problems) for k in ("id_fit", "id_test", "id_val") if k in r}
    oods: list[DataRef | None] = []
    if "ood" in r and _check_value(r["ood"], RUN_FIELDS["ood"], f"{where} ood", problems):
        oods = [_data_ref(o, f"{where} ood[{j}]", problems) for j, o in enumerate(r["ood"])]
        labels = [o.label for o in oods if o is not None]
        for dup in sorted({lab for lab in labels if labels.count(lab) > 1}):
            problems.add(f"{where} ood", f"two OOD sets are called {dup!r}: give one of them name = \"...\".")
    detectors = _detector_refs(r.get("detectors", top_detectors), where, problems, overrides)
    if missing or not model_ok or None in refs.values() or None in oods or not detectors:
        return None
    return RunSpec(model=r["model"], id_fit=refs["id_fit"], id_test=refs["id_test"], id_val=refs.get("id_val"),
                   oods=tuple(o for o in oods if o is not None), detectors=detectors)


def parse_spec(text: str, source: str = "<string>") -> BenchSpec:
    """Parse and validate a spec; every problem is reported together in one :class:`ConfigError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    problems = Problems(source)
    _check_keys(raw, TOP_FIELDS, "top level", problems)
    scalars = {k: raw[k] for k in ("name", "description", "batch_size", "seed", "ood_val", "bootstrap",
                                   "checkpoint_every") if k in raw}
    for k, v in scalars.items():
        _check_value(v, TOP_FIELDS[k], k, problems)
    overrides = _overrides(raw.get("overrides"), problems)
    runs_raw = raw.get("run")
    if not isinstance(runs_raw, list) or not runs_raw:
        problems.add("top level", "a spec needs at least one [[run]] table.")
        runs_raw = []
    top_detectors = raw.get("detectors", TOP_FIELDS["detectors"].default)
    runs = [_run_spec(r, f"run {i + 1}", problems, top_detectors, overrides) for i, r in enumerate(runs_raw)]
    problems.raise_if_any()
    get = lambda k: raw.get(k, TOP_FIELDS[k].default)  # noqa: E731
    return BenchSpec(name=str(raw.get("name", Path(source).stem)), runs=tuple(r for r in runs if r is not None),
                     description=get("description"), batch_size=get("batch_size"), seed=get("seed"),
                     ood_val=get("ood_val"), bootstrap=get("bootstrap"), checkpoint_every=get("checkpoint_every"),
                     source=source)


def _comment(f: Field) -> str:
    return f"# {f.doc}" + (f" (default {json.dumps(f.default)})" if f.default not in (None, "", ["all"]) else "")


def example_spec() -> str:
    """A commented spec that uses every key (``gradood bench --example-spec``); it parses as it is."""
    top = [f"{f'{k} = {TOP_FIELDS[k].example}':<34} {_comment(TOP_FIELDS[k])}"
           for k in ("name", "description", "batch_size", "seed", "ood_val", "bootstrap", "checkpoint_every")]
    data_keys = [f"#   {k:<9} {f.doc}" for k, f in DATA_FIELDS.items()]
    det_keys = [f"#   {k:<9} {f.doc}" for k, f in DETECTOR_FIELDS.items()]
    return "\n".join([
        "# A gradood benchmark spec (TOML). Run it with: gradood bench this-file.toml",
        "# Every key is checked before anything runs: unknown keys, wrong types and ranges, unsafe or duplicate",
        "# labels, n larger than the data and image sizes that do not fit the model are reported together.",
        "", *top, "",
        f"# {TOP_FIELDS['detectors'].doc}.",
        "# A detector table takes:", *det_keys, "#   <hyperparameter> = value (see gradood list / docs/detectors.md)",
        'detectors = ["msp", "energy", { name = "knn", k = 10, label = "knn-10" }, "odin-tuned"]', "",
        f"# {TOP_FIELDS['overrides'].doc}.",
        "[overrides.odin-tuned]",
        "temperatures = [1.0, 1000.0]",
        "epsilons = [0.0, 0.002]", "",
        f"# {TOP_FIELDS['run'].doc}. Keys of a run:",
        *[f"#   {k:<9} {f.doc}" for k, f in RUN_FIELDS.items()],
        "# A dataset entry is a name or a table with these keys:", *data_keys,
        "[[run]]",
        f"model = {RUN_FIELDS['model'].example}",
        f"id_fit = {RUN_FIELDS['id_fit'].example}",
        f"id_val = {RUN_FIELDS['id_val'].example}",
        f"id_test = {RUN_FIELDS['id_test'].example}",
        "ood = [",
        '  { dataset = "fashion_mnist", split = "test", n = 2000, group = "near", name = "fashion" },',
        '  { dataset = "uniform_noise", n = 2000, group = "far", options = { } },',
        "]",
        'detectors = ["msp", "energy", { name = "knn", k = 10, label = "knn-10" }]  # this run only', "",
        "# A second run with a slice of the training split as validation data and resized/re-channelled images:",
        "[[run]]",
        'model = "lenet-fmnist"',
        'id_fit = { dataset = "fashion_mnist", split = "train", stop = 50000, n = 5000 }',
        'id_val = { dataset = "fashion_mnist", split = "train", start = 50000, stop = 60000, n = 500, '
        'name = "fashion_mnist-val" }',
        'id_test = { dataset = "fashion_mnist", split = "test", n = 1000 }',
        'ood = [{ dataset = "mnist", split = "test", n = 1500, group = "near", resize = 28, channels = 1 }]',
        "# root = \"/path/to/data\" points a user dataset (cifar10, svhn, image_folder) at its files.",
        "",
    ])


def spec_reference_markdown() -> str:
    """docs/spec.md: every key of a spec, generated from the schema (a test keeps the file in sync)."""
    def table(fields: dict[str, Field]) -> list[str]:
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k, f in fields.items():
            kind = {"int": "integer" + (f" >= {f.minimum}" if f.minimum is not None else ""),
                    "choice": " or ".join(json.dumps(c) for c in f.choices), "label": "safe name",
                    "data": "dataset entry", "detectors": "detector list", "str": "string"}.get(f.kind, f.kind)
            default = "" if f.default is None else f"`{json.dumps(f.default)}`"
            rows.append(f"| `{k}` | {kind} | {default} | {f.doc} |")
        return rows

    return "\n".join([
        "# Benchmark spec reference", "",
        "Generated from `gradood.bench.spec` (`gradood bench --spec-reference`); `gradood bench --example-spec`",
        "prints a commented spec that uses every key. Every key is validated before anything runs, and every",
        "problem is reported together: unknown keys (with a suggestion), wrong types and ranges, unsafe or duplicate",
        "labels, `n` larger than the data, `ood_val` above half an OOD set, images that do not fit the model.", "",
        "Safe names (detector `label`, dataset `name`) are at most 64 letters, digits, spaces and `-_.+()`: they",
        "become parts of file names, so path separators are refused.", "",
        "## Top level", "", *table(TOP_FIELDS), "",
        "## `[[run]]`", "", *table(RUN_FIELDS), "",
        "## Dataset entries (`id_fit`, `id_val`, `id_test`, each item of `ood`)", "",
        "A dataset entry is a name (`\"mnist\"`) or a table:", "", *table(DATA_FIELDS), "",
        "## Detector entries", "",
        "A detector entry is a registry name, `\"all\"` (every registered detector, with `[overrides.<name>]`",
        "applied; a detector whose method a run's model lacks -- a convolutional feature map, BatchNorm, dropout,",
        "image inputs -- is reported as *not applicable* with the reason, not as a failure), or a table with these",
        "keys plus the detector's hyperparameters (docs/detectors.md):", "",
        *table(DETECTOR_FIELDS), "",
        "## Example", "", "```toml", example_spec().rstrip("\n"), "```", "",
    ])


def load_spec(path: str | Path | None = None) -> BenchSpec:
    """Read a spec file, or the built-in default when ``path`` is None."""
    if path is None:
        text = resources.files("gradood.bench").joinpath("specs", DEFAULT_SPEC).read_text()
        return parse_spec(text, f"built-in {DEFAULT_SPEC}")
    p = Path(path)
    if not p.is_file():
        builtin = resources.files("gradood.bench").joinpath("specs", f"{p.name.removesuffix('.toml')}.toml")
        if builtin.is_file():
            return parse_spec(builtin.read_text(), f"built-in {builtin.name}")
        raise ConfigError(f"benchmark spec {str(p)!r} does not exist (built-in specs: {', '.join(builtin_specs())}).")
    return parse_spec(p.read_text(), str(p))


def builtin_specs() -> list[str]:
    folder = resources.files("gradood.bench").joinpath("specs")
    return sorted(f.name.removesuffix(".toml") for f in folder.iterdir() if f.name.endswith(".toml"))
