"""What the content-addressed signal cache costs: hashing the data vs extracting the signals.

The cache's key covers every input batch's bytes (gradood.cache.DataHasher, sha256 as the batches stream).
This script prints, side by side for a few models (CPU, batch 128, ``--samples`` samples each):

* ``extract``: ``probe.signals(x).require([LOGITS, FEATURES])`` without a cache (one validated forward pass);
* ``hash``: the data hash of the same batches (gradood.cache.DataHasher: XXH3-128 with ``xxhash``, else sha256) (what a cached extraction adds on its pass, and what a warm read costs
  on top of loading the arrays);
* ``hash / extract``: the ratio the design targets at <= 3 %;
* ``cold cache / no cache``: the whole extraction into an empty ``cache_dir`` (hashing, model and code
  fingerprints, writing the checksummed arrays) over the same extraction without one;
* ``warm read``: a second ``probe.signals(..., cache_dir=...)`` served from disk (hashing + verified reads),
  as a fraction of the extraction.

Methods are interleaved in every repeat and medians reported, so background load hits them alike.
ResNet-18 runs on ``--samples / 8`` samples (its extraction is long; the ratio does not depend on the count).
Usage: ``python benchmarks/bench_cache_hash.py [--samples 2048] [--repeats 7] [--sha256]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradood
from gradood.cache import DataHasher
from gradood.models.cifar_resnet import resnet18_cifar
from gradood.signals import FEATURES, LOGITS


def linear_mnist() -> tuple[nn.Module, tuple[int, ...]]:
    """The worst case for the ratio: almost no compute per input byte."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28)


def lenet() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ), (1, 28, 28)


def small_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    ), (3, 32, 32)


def resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    return resnet18_cifar(num_classes=10), (3, 32, 32)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sha256", action="store_true", help="hash with sha256 (as without the xxhash package)")
    args = ap.parse_args()
    if args.sha256:
        import hashlib

        from gradood import cache

        cache.new_hash = hashlib.sha256  # type: ignore[assignment]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from gradood.cache import new_hash

    print(f"{args.samples} samples, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}, "
          f"data hash {new_hash(b'').name}")
    print(f"{'model':<14}{'extract':>10}{'hash':>10}{'hash/extract':>14}{'cold cache/no cache':>21}{'warm read':>11}")
    for name, build in [("linear", linear_mnist), ("lenet", lenet), ("small-cnn", small_cnn),
                        ("resnet18", resnet18)]:
        model, shape = build()
        model.eval()
        n = args.samples // 8 if name == "resnet18" else args.samples
        x = torch.randn(n, *shape)
        y = torch.randint(0, 10, (n,))
        probe = gradood.Probe(model)
        probe.signals((x[:8], y[:8]), batch_size=8, progress=False).require([LOGITS])  # head found, warm

        def extract() -> None:
            probe.signals((x, y), batch_size=args.batch, progress=False).require([LOGITS, FEATURES])

        def hash_only() -> None:
            h = DataHasher()
            for i in range(0, len(x), args.batch):
                h.update(x[i:i + args.batch], y[i:i + args.batch])
            h.digest()

        ext, hsh, cold, warm = [], [], [], []
        for _ in range(args.repeats):
            folder = Path(tempfile.mkdtemp(prefix="gradood-bench-cache-"))
            try:
                ext.append(timed(extract))
                hsh.append(timed(hash_only))
                cold.append(timed(lambda: probe.signals((x, y), batch_size=args.batch, cache_dir=folder,
                                                        progress=False).require([LOGITS, FEATURES])))
                warm.append(timed(lambda: probe.signals((x, y), batch_size=args.batch, cache_dir=folder,
                                                        progress=False).require([LOGITS, FEATURES])))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        e, h, c, w = (statistics.median(v) for v in (ext, hsh, cold, warm))
        print(f"{name:<14}{e * 1e3:>8.1f}ms{h * 1e3:>8.2f}ms{100 * h / e:>13.2f}%{c / e:>20.3f}x{100 * w / e:>10.1f}%")


if __name__ == "__main__":
    main()
