"""Forward passes and time of input-perturbation detectors: shared gradient-enabled forward vs a separate one.

ODIN, GRODIN with eps > 0, and Mahalanobis/FSSD preprocessing need the input gradient at the unperturbed
input and a forward at the perturbed input. gradood takes the input gradient from the shared forward that
also yields the logits/features (``gradood._passes``): 2 forwards per batch. The old structure ran a no-grad
shared forward plus a forward of its own for the gradient: 3. This script prints, per detector, the forwards
per batch and the median wall time of scoring ``--samples`` images with each structure, and their ratio.

Model: the pretrained ``mnist-cnn-digitrec`` on random 28x28 inputs (the data does not change the cost); CPU,
float32, batch 128. Methods are interleaved in every repeat and medians reported, so background load hits them
alike. Usage: ``python benchmarks/bench_perturbation_passes.py [--samples 2048] [--repeats 5]``

Printed on the 2-core CPU machine under load from other jobs (``--samples 512 --repeats 3``; times are long
because of that load, the ratios are what matters; Mahalanobis/FSSD tap 5 layers here, so 1 + 5 vs 1 + 2 x 5)::

    detector                    forwards/batch shared  separate  time shared  separate  separate/shared
    odin                                            2         3       13.34s    16.39s            1.23x
    grodin                                          2         3       18.05s    23.04s            1.28x
    mahalanobis-multilayer                          6        11       27.01s    31.42s            1.16x
    fssd                                            6        11       18.68s    25.02s            1.34x
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import gradood
from gradood import _passes, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, info = models.load("mnist-cnn-digitrec")
    x = torch.randn(args.samples, *info.input_shape)
    fit = (torch.randn(512, *info.input_shape), torch.arange(512) % info.num_classes)
    configs = [("odin", {}), ("grodin", {"eps": 0.002}), ("mahalanobis-multilayer", {"eps": 0.001}),
               ("fssd", {"eps": 0.01})]
    calls = {"n": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    print(f"{'detector':26s} {'forwards/batch shared':>22s} {'separate':>9s} {'time shared':>12s} "
          f"{'separate':>9s} {'separate/shared':>16s}")
    for name, kw in configs:
        probe = gradood.Probe(model, head=info.head, input_std=info.std, input_mean=info.mean)
        det = gradood.create(name, **kw).fit(probe.signals(fit, progress=False))
        times: dict[bool, list[float]] = {True: [], False: []}
        forwards: dict[bool, float] = {}
        for _ in range(args.repeats):
            for shared in (True, False):
                patch = mock.patch.object(_passes, "any_shares_input_grad", lambda r: False) if not shared else None
                if patch:
                    patch.start()
                try:
                    sig = probe.signals(x, batch_size=128, progress=False)
                    calls["n"] = 0
                    t0 = time.perf_counter()
                    det.score(sig)
                    times[shared].append(time.perf_counter() - t0)
                    forwards[shared] = calls["n"] / ((args.samples + 127) // 128)
                finally:
                    if patch:
                        patch.stop()
        ts, tn = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:26s} {forwards[True]:22.0f} {forwards[False]:9.0f} {ts:11.2f}s {tn:8.2f}s {tn / ts:15.2f}x")


if __name__ == "__main__":
    main()
