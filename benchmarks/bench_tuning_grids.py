"""What the OOD-tuned detectors' grids cost: the default grid (measured) next to the paper's (estimated).

For each tuned detector, on one run of the default bench (mnist-cnn-digitrec, 5 000 ID fit samples, 500 ID
validation samples, 500 OOD validation samples of Fashion-MNIST), this prints side by side:

* ``points``: grid size, default vs ``grid="paper"``;
* ``passes/sample``: forward/backward passes per validation sample the grid evaluates (the count the
  cost warning uses; one sample-pass = one sample through one forward or backward pass);
* ``sample-passes``: that times the validation samples (the warning threshold is 200 000);
* ``fit s``: the measured fit time with the default grid (signals computed fresh), and the paper grid's
  time estimated as measured x (paper sample-passes / default sample-passes) -- the paper grids are not run.

Usage: ``python benchmarks/bench_tuning_grids.py [--detectors odin-tuned,fssd-lr-eps] [--cache DIR]``
(the signal cache only holds the forward signals shared by every detector; the grids are always computed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import gradood
from gradood.bench.runner import prepare
from gradood.bench.spec import parse_spec
from gradood.detectors._checks import CostWarning, DegenerateFitWarning
from gradood.detectors.fssd import FSSD_GRIDS
from gradood.detectors.mahalanobis import MAHALANOBIS_EPSILONS
from gradood.detectors.odin import ODIN_GRIDS, odin_grid_passes

SPEC = """
name = "tuning-grids"
batch_size = 500
seed = 0
ood_val = 500
detectors = ["msp"]

[[run]]
model = "mnist-cnn-digitrec"
id_fit = { dataset = "mnist", split = "train", n = 5000 }
id_val = { dataset = "mnist", split = "val", n = 500 }
id_test = { dataset = "mnist", split = "test", n = 1000 }
ood = [ { dataset = "fashion_mnist", split = "test", n = 1500, group = "near" } ]
"""

TUNED = ["odin-tuned", "grodin-tuned", "grodin-sg-tuned", "fssd-lr-eps", "mahalanobis-ensemble-tuned"]


def passes_per_sample(name: str, grid: str, n_layers: int) -> tuple[int, int]:
    """(grid points, forward/backward passes per validation sample) of a tuned detector's named grid."""
    if name.startswith("odin"):
        T, E = ODIN_GRIDS[grid]
        return len(T) * len(E), odin_grid_passes(T, E)
    if name.startswith("grodin"):
        det = gradood.create(name, grid=grid)
        T, E = det.tuning_grid()
        return len(T) * len(E), det._grid_passes(T, E)
    if name.startswith("fssd"):
        E = FSSD_GRIDS[grid]
        return len(E), 3 * n_layers * sum(e > 0 for e in E)
    E = MAHALANOBIS_EPSILONS  # Lee et al.'s 7 values are both the default and the paper's grid
    return len(E), 3 * n_layers * sum(e > 0 for e in E)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", default=",".join(TUNED))
    ap.add_argument("--cache", default=None, help="signal cache folder (default: a temporary one)")
    args = ap.parse_args()
    spec = parse_spec(SPEC, "bench_tuning_grids")
    cache = Path(args.cache or tempfile.mkdtemp(prefix="gradood-grids-"))
    p = prepare(spec, spec.runs[0], cache, progress=False)
    ood_name = next(iter(p.ood_val))
    ood_val = p.ood_val[ood_name]
    n_val = len(p.val) + len(ood_val)
    print(f"mnist-cnn-digitrec, {len(p.fit)} ID fit, {len(p.val)} ID val + {len(ood_val)} OOD val ({ood_name})")
    print(f"{'detector':28s} {'points':>12s} {'passes/sample':>14s} {'sample-passes':>20s} {'fit s':>18s}")
    print(f"{'':28s} {'dflt / paper':>12s} {'dflt / paper':>14s} {'dflt / paper':>20s} {'dflt / paper (est.)':>18s}")
    for name in args.detectors.split(","):
        det = gradood.create(name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateFitWarning)
            warnings.simplefilter("ignore", CostWarning)
            det.fit(p.fit, ood_val=ood_val, id_val=p.val)
        seconds = time.perf_counter() - t0
        n_layers = len(getattr(det, "layers_", ()))
        (pd, cd), (pp, cp) = passes_per_sample(name, "default", n_layers), passes_per_sample(name, "paper", n_layers)
        est = seconds * cp / cd if cd else float("nan")
        print(f"{name:28s} {pd:>5d} / {pp:<5d} {cd:>6d} / {cp:<6d} {cd * n_val:>9,d} / {cp * n_val:<9,d} "
              f"{seconds:>7.1f} / {est:<8.0f}")


if __name__ == "__main__":
    main()
