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

import hashlib
import json
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


_DATA_KEYS = {"dataset", "split", "n", "name", "group", "resize", "channels", "root", "options", "start", "stop"}


def _data_ref(raw: Any, where: str) -> DataRef:
    if isinstance(raw, str):
        raw = {"dataset": raw}
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise ConfigError(f"{where}: a dataset entry needs at least dataset = \"<name>\", got {raw!r}.")
    unknown = set(raw) - _DATA_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_DATA_KEYS)}.")
    group = raw.get("group", "far")
    if group not in ("near", "far"):
        raise ConfigError(f"{where}: group must be 'near' or 'far', got {group!r}.")
    n = raw.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}: n must be a positive integer, got {n!r}.")
    return DataRef(dataset=str(raw["dataset"]), split=raw.get("split"), n=n, name=raw.get("name"), group=group,
                   resize=raw.get("resize"), channels=raw.get("channels"), root=raw.get("root"),
                   options=dict(raw.get("options", {})), start=raw.get("start"), stop=raw.get("stop"))


def _detector_refs(raw: Any, where: str, overrides: dict[str, dict[str, Any]] | None = None) -> tuple[DetectorRef, ...]:
    from ..detectors import available, create

    overrides = overrides or {}
    if raw is None:
        raw = ["all"]
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: detectors must be a list of names or tables, got {raw!r}.")
    refs: list[DetectorRef] = []
    for item in raw:
        if item == "all":
            refs.extend(DetectorRef(r.name, dict(overrides.get(r.name, {}))) for r in all_detectors())
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}: each detector is a name or a table with name = ..., got {item!r}.")
        params = {**overrides.get(item["name"], {}), **{k: v for k, v in item.items() if k not in ("name", "label")}}
        if item["name"] not in available():
            raise ConfigError(f"{where}: unknown detector {item['name']!r}; available: {', '.join(available())}.")
        create(item["name"], **params)  # validates hyperparameters now, not an hour into the run
        refs.append(DetectorRef(item["name"], params, item.get("label")))
    seen: set[str] = set()
    out = []
    for r in refs:
        if r.display in seen:
            continue
        seen.add(r.display)
        out.append(r)
    return tuple(out)


def all_detectors() -> list[DetectorRef]:
    """Every registered detector, minus entries whose class and hyperparameters repeat an earlier one (the
    generic ``output-feature`` family defaults to energy x l1, already listed as ``energy-x-l1``)."""
    from ..detectors import available, create

    seen: set[str] = set()
    refs = []
    for name in available():
        d = create(name)
        ident = f"{type(d).__name__}:{json.dumps(d.get_params(), sort_keys=True, default=str)}"
        if ident in seen:
            continue
        seen.add(ident)
        refs.append(DetectorRef(name))
    return refs


def parse_spec(text: str, source: str = "<string>") -> BenchSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    runs_raw = raw.get("run")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise ConfigError(f"{source}: a spec needs at least one [[run]] table.")
    top_detectors = raw.get("detectors")
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"{source}: [overrides.<detector>] tables must map hyperparameter names to values.")
    from ..detectors import available, create

    for name, params in overrides.items():
        if name not in available():
            raise ConfigError(f"{source}: [overrides.{name}] names an unknown detector; available: {', '.join(available())}.")
        create(name, **params)
    runs = []
    for i, r in enumerate(runs_raw):
        where = f"{source} run {i + 1}"
        for key in ("model", "id_fit", "id_test", "ood"):
            if key not in r:
                raise ConfigError(f"{where}: missing {key!r}.")
        if not isinstance(r["ood"], list) or not r["ood"]:
            raise ConfigError(f"{where}: ood must be a non-empty list of dataset entries.")
        runs.append(RunSpec(
            model=str(r["model"]),
            id_fit=_data_ref(r["id_fit"], f"{where} id_fit"),
            id_test=_data_ref(r["id_test"], f"{where} id_test"),
            id_val=_data_ref(r["id_val"], f"{where} id_val") if "id_val" in r else None,
            oods=tuple(_data_ref(o, f"{where} ood[{j}]") for j, o in enumerate(r["ood"])),
            detectors=_detector_refs(r.get("detectors", top_detectors), where, overrides),
        ))
    known = {"name", "description", "batch_size", "seed", "ood_val", "bootstrap", "run", "detectors", "overrides",
             "checkpoint_every"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(known)}.")
    return BenchSpec(name=str(raw.get("name", Path(source).stem)), runs=tuple(runs),
                     description=str(raw.get("description", "")), batch_size=int(raw.get("batch_size", 256)),
                     seed=int(raw.get("seed", 0)), ood_val=int(raw.get("ood_val", 500)),
                     bootstrap=int(raw.get("bootstrap", 0)), checkpoint_every=int(raw.get("checkpoint_every", 20)),
                     source=source)


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
