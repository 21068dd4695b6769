"""A small, seeded, deterministic training recipe, and ``gradood train <recipe> --out PATH``.

``train_classifier`` trains any classifier on an :class:`~gradood.data.ArrayDataset` with SGD (momentum,
cosine learning rate) or Adam, shows a progress bar, and saves the state_dict atomically. The same seed,
torch version and thread count give the same weights.

Recipes (``train_main``): ``lenet-fmnist`` -- :class:`~gradood.models.LeNet5` on Fashion-MNIST, the checkpoint
shipped as ``gradood/models/checkpoints/lenet_fmnist.pt`` with a JSON record beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data._cache import atomic_target
from ..data.arrays import ArrayDataset
from ..errors import ConfigError, InputError
from .checkpoints import save_state_dict


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_classifier`."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (momentum, cosine schedule) or "adam"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (None: leave as is)


@dataclass
class TrainResult:
    """What :func:`train_classifier` returns."""

    model: nn.Module
    config: TrainConfig
    history: list[dict] = field(default_factory=list)  # per epoch: loss, train accuracy, test accuracy, seconds
    test_accuracy: float | None = None
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None


@contextlib.contextmanager
def deterministic_algorithms(threads: int | None = None) -> Iterator[None]:
    """Ask torch for deterministic kernels (and optionally a fixed CPU thread count) for the duration,
    restoring the caller's settings afterwards."""
    previous, previous_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(previous_threads)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: ArrayDataset, *, mean=None, std=None, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (normalised with ``mean``/``std``, default the dataset's), in
    eval mode; the model's train/eval flag is restored."""
    if len(data) == 0:
        raise InputError(f"{data.name} is empty; cannot compute an accuracy.")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = 0
    try:
        for i in range(0, len(data), batch_size):
            sl = slice(i, i + batch_size)
            x = data.batch(sl, mean=mean, std=std).to(device)
            y = torch.from_numpy(data.labels[sl]).to(device)
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(data)


def _make_optimizer(model: nn.Module, cfg: TrainConfig, steps: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.momentum > 0)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return opt, None
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}.")


def train_classifier(model: nn.Module, train: ArrayDataset, *, test: ArrayDataset | None = None,
                     config: TrainConfig | None = None, mean=None, std=None, progress: bool = True,
                     checkpoint: str | Path | None = None) -> TrainResult:
    """Train ``model`` with cross-entropy on ``train`` and return it (in eval mode) with its history.

    Parameters
    ----------
    model: a freshly initialised classifier (seed torch before building it for reproducible initial weights).
    train, test: datasets; inputs normalised with ``mean``/``std`` (default: ``train``'s).
    config: :class:`TrainConfig` (epochs, batch size, optimizer, lr, momentum, weight decay, seed).
    progress: show a tqdm bar per epoch.
    checkpoint: where to save the final state_dict (atomically: temporary file, then rename).
    """
    cfg = config or TrainConfig()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}.")
    mean = train.mean if mean is None else mean
    std = train.std if std is None else std
    device = _device_of(model)
    gen = torch.Generator().manual_seed(cfg.seed)  # the shuffling order depends on the seed only
    n = len(train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    opt, sched = _make_optimizer(model, cfg, cfg.epochs * steps_per_epoch)
    result = TrainResult(model, cfg)
    with deterministic_algorithms(cfg.threads):
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen).numpy()
            loss_sum, correct = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                       leave=False, file=sys.stderr)
            for b in bar:
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x = train.batch(idx, mean=mean, std=std).to(device)
                y = torch.from_numpy(train.labels[idx]).to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                if b % 50 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            record = {"epoch": epoch, "loss": loss_sum / n, "train_accuracy": correct / n,
                      "seconds": round(time.perf_counter() - t0, 2)}
            if test is not None:
                record["test_accuracy"] = evaluate_accuracy(model, test, mean=mean, std=std)
            result.history.append(record)
            if progress:
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      file=sys.stderr)
    model.eval()
    result.test_accuracy = result.history[-1].get("test_accuracy")
    if checkpoint is not None:
        result.checkpoint = Path(checkpoint)
        result.checkpoint_sha256 = save_state_dict(model, result.checkpoint)
    return result


# ------------------------------------------------------------------------------------------ recipes / CLI
RECIPES = {
    # name: (architecture, dataset, config, description)
    "lenet-fmnist": ("LeNet5", "fashion_mnist", TrainConfig(epochs=12, batch_size=128, optimizer="sgd", lr=0.05,
                                                          momentum=0.9, weight_decay=5e-4, seed=0, threads=1),
                     "LeNet-5 on Fashion-MNIST (60,000 train / 10,000 test)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradood train", description="Train one of gradood's reference models.")
    p.add_argument("recipe", choices=sorted([*RECIPES, "minilm-clinc150"]),
                   help="what to train (minilm-clinc150: a linear head on the frozen MiniLM encoder, "
                        "needs gradood[text]; see gradood.models.text_training)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt); a .json record is written beside it")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--seed", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument("--optimizer", choices=["sgd", "adam"], help="default: the recipe's")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the recipe's; small models train "
                   "fastest and reproducibly on 1)")
    p.add_argument("--data-root", help="folder with the dataset files (default: fetched and cached)")
    p.add_argument("--train-subset", type=int, help="train on the first N samples only (quick checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradood train``: train a recipe, save the checkpoint atomically and its JSON record
    (sha256, test accuracy, the exact command, torch version, seed). Returns the exit code."""
    from .. import data as gdata
    from . import architectures

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.recipe == "minilm-clinc150":
        from .text_training import train_main as train_text

        return train_text(args, argv)
    arch_name, dataset, base, description = RECIPES[args.recipe]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed), ("batch_size", args.batch_size),
                                   ("lr", args.lr), ("optimizer", args.optimizer),
                                   ("threads", args.threads)) if v is not None}
    cfg = TrainConfig(**{**asdict(base), **overrides})
    train = gdata.load(dataset, "train", root=args.data_root)
    test = gdata.load(dataset, "test", root=args.data_root)
    if args.train_subset:
        train = train.head(args.train_subset)
    torch.manual_seed(cfg.seed)  # initial weights
    model = getattr(architectures, arch_name)(num_classes=train.num_classes)
    out = Path(args.out)
    t0 = time.perf_counter()
    result = train_classifier(model, train, test=test, config=cfg, progress=not args.no_progress, checkpoint=out)
    record = {
        "model": args.recipe,
        "architecture": f"gradood.models.{arch_name}",
        "description": description,
        "file": out.name,
        "sha256": result.checkpoint_sha256,
        "test_accuracy": round(float(result.test_accuracy), 4),
        "dataset": {"name": dataset, "train_samples": len(train), "test_samples": len(test),
                    "mean": list(train.mean), "std": list(train.std)},
        "command": "gradood train " + shlex.join(argv),
        "command_without_cli": "python -m gradood.models.training " + shlex.join(argv),
        "config": asdict(cfg),
        "seed": cfg.seed,
        "history": result.history,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "torch_threads": cfg.threads if cfg.threads is not None else torch.get_num_threads(),
        "note": "Bit-identical weights need the same torch version and thread count (the recipe fixes it).",
    }
    meta_path = out.with_suffix(".json")
    with atomic_target(meta_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out} (sha256 {result.checkpoint_sha256}); test accuracy {result.test_accuracy:.4f}; "
          f"record {meta_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
