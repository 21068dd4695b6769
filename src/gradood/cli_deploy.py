"""``gradood fit`` and ``gradood score``: a calibrated detector from the command line, and scoring new data.

``gradood fit MODEL --id DATASET --detector NAME --out DIR`` fits the detector on ID data, calibrates its
threshold on held-out ID samples (conformal: at most 1 - tpr of new ID samples rejected) and saves the folder;
``gradood score DIR --data DATASET --out FILE.csv`` writes one row per sample (score, p-value, accepted,
predicted class) and prints a summary.

MODEL: a registry name (``gradood list models``), a TorchScript file, or ``package.module:callable`` returning
an ``nn.Module`` (``--weights FILE``: a state dict, read with ``torch.load(weights_only=True)``). DATASET: a
registry name (``gradood list datasets``), a folder of images in class sub-folders, or a ``.npy`` / ``.npz``
file of pixels (uint8 0..255 or floats in [0, 1]; ``.npz`` keys ``x``/``images`` and optionally ``y``/
``labels``), normalised with the model's mean/std.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError, ModelError

DEFAULT_VAL = "0.1"


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A model as the CLI loads it, and what to record so that ``score`` can load it again."""

    model: nn.Module
    record: dict[str, Any]
    head: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_shape: tuple[int, ...] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(ref: str, weights: str | None = None) -> ModelSpec:
    """A registry name, a TorchScript file, or ``package.module:callable`` (+ ``weights``)."""
    from . import models

    if ref in models.available():
        if weights is not None:
            raise ConfigError(f"--weights is for models given as package.module:callable; {ref!r} is a registry "
                              "model with verified weights of its own.")
        model, info = models.load(ref)
        return ModelSpec(model, {"kind": "registry", "ref": ref}, info.head, tuple(info.mean), tuple(info.std),
                         tuple(info.input_shape))
    path = Path(ref).expanduser()
    if path.is_file():
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ModelError(f"{path} is not a TorchScript file ({str(e).splitlines()[0]}): save the model with "
                             "torch.jit.script(model).save(path), or pass package.module:callable + --weights.") from None
        return ModelSpec(model.eval(), {"kind": "torchscript", "ref": str(path.resolve()), "sha256": _sha256(path)})
    if ":" in ref and not path.exists():
        return _callable_model(ref, weights)
    raise ConfigError(f"unknown model {ref!r}: pass a registry name ({', '.join(models.available())}), a "
                      "TorchScript file, or package.module:callable returning an nn.Module (with --weights FILE).")


def _callable_model(ref: str, weights: str | None) -> ModelSpec:
    import importlib

    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} for --model {ref!r}: {e}. Is the package installed / on "
                          "PYTHONPATH?") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"{ref!r}: {module_name} has no callable {attr!r}.")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    record: dict[str, Any] = {"kind": "callable", "ref": ref}
    if weights is not None:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise ConfigError(f"--weights {weights}: no such file.")
        try:
            state = torch.load(str(wpath), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError / RuntimeError for anything but tensors
            raise ModelError(f"--weights {wpath} is not a plain state dict torch.load(weights_only=True) can "
                             f"read ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError) as e:
            raise ModelError(f"--weights {wpath} do not fit {ref!r}: {str(e).splitlines()[0]}") from None
        record.update(weights=str(wpath.resolve()), weights_sha256=_sha256(wpath))
    return ModelSpec(model.eval(), record)


def _as_floats(v: Any) -> tuple[float, ...] | None:
    if v is None:
        return None
    return (float(v),) if isinstance(v, (int, float)) else tuple(float(a) for a in v)


# ---------------------------------------------------------------------------------------------- data
def load_data(ref: str, split: str | None, spec: ModelSpec, what: str):
    """An :class:`~gradood.data.ArrayDataset` normalised with the model's mean/std."""
    from . import data

    path = Path(ref).expanduser()
    if ref in data.available():
        ds = data.load(ref, split=split)
    elif path.is_dir():
        shape = spec.input_shape
        ds = data.load_image_folder(path, size=shape[-1] if shape else None,
                                    grayscale=(shape[0] == 1) if shape else None)
    elif path.is_file() and path.suffix in (".npy", ".npz"):
        ds = _array_file(path)
    elif path.suffix in (".npy", ".npz"):
        raise InputError(f"{what} {path}: no such file.")
    else:
        raise ConfigError(f"{what} {ref!r} is neither a dataset name ({', '.join(data.available())}), an image "
                          "folder, nor a .npy/.npz file.")
    if spec.mean is not None and spec.std is not None:
        ds = ds.with_normalization(spec.mean, spec.std)
    else:
        ds = ds.with_normalization(0.0, 1.0)  # no normalisation recorded: the model takes [0, 1] pixels
    if spec.input_shape is not None and tuple(ds.shape) != tuple(spec.input_shape):
        raise InputError(f"{what} {ref!r} has images of shape {tuple(ds.shape)}, but the model takes "
                         f"{tuple(spec.input_shape)}: resize/convert them first (an image folder is resized for you).")
    return ds


def _array_file(path: Path):
    from .data import UNLABELLED, ArrayDataset

    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path} cannot be read without pickle ({e}): save plain numeric arrays.") from None
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        with loaded:
            keys = list(loaded.keys())
            xk = next((k for k in ("x", "images", "inputs") if k in keys), keys[0] if len(keys) == 1 else None)
            if xk is None:
                raise InputError(f"{path} has arrays {keys}: name the images 'x' (or 'images') and the labels 'y'.")
            x = loaded[xk]
            yk = next((k for k in ("y", "labels") if k in keys), None)
            y = loaded[yk] if yk is not None else None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise InputError(f"{path}: images must be N x C x H x W (or N x H x W), got shape {x.shape}.")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        if x.size and (x.min() < 0 or x.max() > 1):
            raise InputError(f"{path}: float pixels must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g}); gradood "
                             "normalises them with the model's mean/std.")
    labels = np.full(len(x), UNLABELLED, dtype=np.int64) if y is None else np.asarray(y).astype(np.int64).reshape(-1)
    n_classes = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    return ArrayDataset(np.ascontiguousarray(x), labels, tuple(str(i) for i in range(n_classes)), (0.0,), (1.0,),
                        name=path.stem, split="all", source=str(path))


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, y = ds.tensors()
    return x, (None if (y < 0).all() else y)


# ---------------------------------------------------------------------------------------------- fit
def _parse_value(text: str) -> Any:
    import json

    low = text.strip()
    if low in ("true", "false", "null"):
        return json.loads(low)
    try:
        return json.loads(low)
    except ValueError:
        return low  # a bare string (e.g. combine=mean-z)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: use key=value, e.g. --set k=10 (values are JSON: 10, 0.5, true, "
                              "[\"layer1\"]).")
        v = _parse_value(value)
        out[key.strip()] = tuple(v) if isinstance(v, list) else v
    return out


def split_held_out(n: int, val: str, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(fit indices, calibration indices)`` of a seeded split, or None when ``val`` names another split."""
    try:
        v = float(val)
    except ValueError:
        return None
    if v <= 0 or (v >= 1 and v != int(v)):
        raise ConfigError(f"--val-split {val!r}: a fraction in (0, 1), a number of samples, or a split name.")
    n_cal = int(round(v * n)) if v < 1 else int(v)
    if not 1 <= n_cal < n:
        raise ConfigError(f"--val-split {val!r} holds out {n_cal} of {n} samples: leave some to fit on.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


def cmd_fit(args: argparse.Namespace) -> int:
    from . import create
    from .cli import progress_enabled
    from .deploy.conformal import check_tpr, min_calibration_size
    from .deploy.persist import is_detector_folder
    from .probe import Probe

    progress = progress_enabled(args)
    out = Path(args.out).expanduser()
    if out.exists() and not (args.overwrite and is_detector_folder(out)):
        raise ConfigError(f"--out {out} exists: choose a new folder" + (" (pass --overwrite to replace the detector "
                          "saved there)" if is_detector_folder(out) else " (gradood never writes into other folders)."))
    check_tpr(args.tpr)
    params = parse_sets(args.set)
    detector = create(args.detector, **params)
    if detector.tunes_on_ood:
        raise ConfigError(f"{args.detector} tunes on OOD validation data, which `gradood fit` does not take: choose an "
                          "OOD-agnostic detector or configuration (see gradood list detectors).")
    spec = load_model(args.model, args.weights)
    if args.head is not None:
        spec.head = args.head
    if args.mean is not None or args.std is not None:
        spec.mean, spec.std = _as_floats(args.mean), _as_floats(args.std)
    ds = load_data(args.id, args.split, spec, "--id")
    held = split_held_out(len(ds), args.val_split, args.seed)
    if held is None:
        fit_ds, cal_ds = ds, load_data(args.id, args.val_split, spec, "--id")
        held_record: dict[str, Any] = {"split": args.val_split, "n": len(cal_ds)}
    else:
        fit_idx, cal_idx = held
        fit_ds, cal_ds = ds.subset(fit_idx), ds.subset(cal_idx)
        held_record = {"split": args.split, "seed": args.seed, "n": len(cal_idx),
                       "indices_sha256": hashlib.sha256(cal_idx.astype(np.int64).tobytes()).hexdigest()}
    if args.n_fit is not None and args.n_fit < len(fit_ds):
        fit_ds = fit_ds.sample(args.n_fit, seed=args.seed)
    need = min_calibration_size(args.tpr)
    if len(cal_ds) < need:
        raise ConfigError(f"the calibration split has {len(cal_ds)} samples; tpr={args.tpr} needs at least {need}: "
                          "raise --val-split or lower --tpr.")
    probe = Probe(spec.model, head=spec.head, input_std=spec.std, input_mean=spec.mean)
    bs = args.batch_size
    print(f"fitting {args.detector} on {len(fit_ds)} samples of {args.id}/{args.split} through {args.model} ...")
    detector.fit(probe.signals(_tensors(fit_ds), batch_size=bs, name="fit", progress=progress))
    detector.calibrate(probe.signals(_tensors(cal_ds), batch_size=bs, name="calibration", progress=progress),
                       tpr=args.tpr)
    metadata = {"cli": {"model": spec.record, "head": probe.head_name, "mean": spec.mean, "std": spec.std,
                        "input_shape": list(spec.input_shape) if spec.input_shape else None,
                        "id": {"dataset": args.id, "split": args.split, "n_fit": len(fit_ds)},
                        "calibration": held_record}}
    detector.save(out, overwrite=args.overwrite, metadata=metadata)
    k, n = detector.calibration_rank_, detector.calibration_scores_.size
    print(f"calibrated on {n} held-out ID samples ({_describe_held(held_record, args.id)}): threshold "
          f"{detector.threshold_:.6g} = the {k}-th lowest calibration score; new ID samples are rejected with "
          f"probability <= {1 - detector.tpr_:.4g} (exactly {k}/{n + 1} = {k / (n + 1):.4f} for exchangeable data)")
    print(f"saved {out}")
    return 0


def _describe_held(rec: dict[str, Any], dataset: str) -> str:
    if "seed" in rec:
        return f"a seeded part of {dataset}/{rec['split']} never used for fitting, seed {rec['seed']}"
    return f"{dataset}/{rec['split']}"


# ---------------------------------------------------------------------------------------------- score
def _score_model(record: dict[str, Any], args: argparse.Namespace) -> ModelSpec:
    cli = record.get("metadata", {}).get("cli", {}) if isinstance(record.get("metadata"), dict) else {}
    fitted = cli.get("model") or {}
    if args.model is None:
        if fitted.get("kind") != "registry":
            hint = f" (it was fitted on {fitted.get('ref')!r})" if fitted.get("ref") else ""
            raise ConfigError(f"pass --model{hint}: gradood loads only registry models by itself and never runs code "
                              "named in a detector folder (a TorchScript file or package.module:callable).")
        spec = load_model(fitted["ref"])
    else:
        spec = load_model(args.model, args.weights)
    contract = record.get("model") or {}
    spec.head = contract.get("head") or cli.get("head") or spec.head
    spec.mean = _as_floats(contract.get("input_mean")) if "input_mean" in contract else _as_floats(cli.get("mean"))
    spec.std = _as_floats(contract.get("input_std")) if "input_std" in contract else _as_floats(cli.get("std"))
    if contract.get("input_shape"):
        spec.input_shape = tuple(contract["input_shape"])
    return spec


def _atomic_csv(path: Path) -> tuple[Any, Callable[[], None], Callable[[], None]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    f = os.fdopen(fd, "w", newline="")

    def commit() -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)

    def abort() -> None:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)

    return f, commit, abort


def cmd_score(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .cli import progress_enabled
    from .deploy import load_detector, read_record
    from .deploy.guard import Guard

    record = read_record(args.detector_dir)
    detector = load_detector(args.detector_dir)
    if not detector.is_calibrated:
        raise ConfigError(f"{args.detector_dir} has no threshold: it was saved before calibration; refit it with "
                          "gradood fit (which calibrates), or detector.calibrate(...) then .save().")
    spec = _score_model(record, args)
    ds = load_data(args.data, args.split, spec, "--data")
    if args.limit is not None:
        ds = ds.head(args.limit)
    guard = Guard(spec.model, detector, head=spec.head, input_std=spec.std, input_mean=spec.mean)
    out_path = Path(args.out).expanduser()
    if out_path.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out_path}: the output is a CSV file; name it *.csv.")
    f, commit, abort = _atomic_csv(out_path)
    scores: list[np.ndarray] = []
    accepted: list[np.ndarray] = []
    labels = ds.labels
    has_labels = bool((labels >= 0).any())
    try:
        w = csv.writer(f)
        w.writerow(["index", "score", "p_value", "accepted", "predicted_class"] + (["label"] if has_labels else []))
        bs = args.batch_size
        with tqdm(total=len(ds), desc=f"scoring {args.data}", unit="sample", disable=not progress_enabled(args),
                  leave=False) as bar:
            for start in range(0, len(ds), bs):
                x = ds.batch(slice(start, start + bs))
                o = guard(x)
                s, a, p = o.scores.cpu().numpy(), o.accepted.cpu().numpy(), o.p_values.cpu().numpy()
                pred = o.logits.argmax(dim=1).cpu().numpy()
                for i in range(len(s)):
                    row = [start + i, repr(float(s[i])), repr(float(p[i])), int(a[i]), int(pred[i])]
                    w.writerow(row + ([int(labels[start + i])] if has_labels else []))
                scores.append(s)
                accepted.append(a)
                bar.update(len(s))
        commit()
    except BaseException:
        abort()
        raise
    _summary(np.concatenate(scores), np.concatenate(accepted), detector, args, out_path)
    return 0


def _summary(s: np.ndarray, a: np.ndarray, detector: Any, args: argparse.Namespace, out_path: Path) -> None:
    q = np.quantile(s, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    print(f"{args.data}{'/' + args.split if args.split else ''}: {len(s)} samples, accepted as in-distribution: "
          f"{int(a.sum())} ({100 * a.mean():.2f} %) at threshold {detector.threshold_:.6g} (calibrated for tpr "
          f"{detector.tpr_:g})")
    print("score quantiles (min 5% 25% 50% 75% 95% max): " + " ".join(f"{v:.4g}" for v in q))
    print(f"wrote {out_path}")


# ---------------------------------------------------------------------------------------------- parser
def add_deploy_commands(sub: Any, common_options: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``fit`` and ``score`` to the ``gradood`` sub-command parser."""
    f = sub.add_parser("fit", parents=[common_options()], help="fit + calibrate a detector on ID data and save it",
                       description="Fit a detector on in-distribution data, calibrate its threshold on held-out ID "
                                   "samples (at most 1 - tpr of new ID samples rejected, for exchangeable data) and "
                                   "save it as a folder (safetensors + JSON) for gradood score / gradood.load_detector.")
    f.add_argument("model", help="registry model name, TorchScript file, or package.module:callable")
    f.add_argument("--id", required=True, help="ID dataset: registry name, image folder, or .npy/.npz file")
    f.add_argument("--split", default="train", help="split of --id to fit on (default: train)")
    f.add_argument("--val-split", default=DEFAULT_VAL,
                   help="held-out calibration data: a fraction (default 0.1) or a number of samples of --split, "
                        "seeded and never used for fitting; or the name of another split of --id")
    f.add_argument("--detector", required=True, help="detector name (gradood list detectors)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter (JSON value), repeatable: --set k=10")
    f.add_argument("--tpr", type=float, default=0.95, help="share of ID samples to accept (default 0.95)")
    f.add_argument("--out", required=True, help="folder to write the detector to (must not exist)")
    f.add_argument("--overwrite", action="store_true", help="replace a detector folder at --out")
    f.add_argument("--weights", default=None, help="state dict for a package.module:callable model")
    f.add_argument("--head", default=None, help="name of the classifier head layer (default: found automatically)")
    f.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation mean (per channel)")
    f.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std (per channel)")
    f.add_argument("--n-fit", type=int, default=None, help="fit on a seeded sample of this many (default: all)")
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    f.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("score", parents=[common_options()], help="score data with a saved detector, write a CSV",
                       description="Score every sample of a dataset with a detector saved by gradood fit: one CSV "
                                   "row per sample (score, p_value, accepted, predicted_class), and a summary.")
    s.add_argument("detector_dir", metavar="DIR", help="folder written by gradood fit")
    s.add_argument("--data", required=True, help="registry dataset name, image folder, or .npy/.npz file")
    s.add_argument("--split", default=None, help="split of a registry dataset (default: its test split)")
    s.add_argument("--out", required=True, help="CSV file to write")
    s.add_argument("--model", default=None, help="the model (default: the registry model recorded by fit)")
    s.add_argument("--weights", default=None, help="state dict for a package.module:callable --model")
    s.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    s.add_argument("--batch-size", type=int, default=512, help="batch size (default 512)")
    s.set_defaults(func=cmd_score)


__all__ = ["add_deploy_commands", "cmd_fit", "cmd_score", "load_model", "load_data", "parse_sets"]
