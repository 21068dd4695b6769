"""Extraction throughput on a local Ray cluster with 1 and 2 workers against the single-process path.

The same data (N MNIST-sized inputs through gradood's LeNet architecture, random weights) and the same
signals: the forward signals (logits, features) and GRODIN's per-sample full-network gradient norms, the
costliest signal gradood computes. Each Ray figure is the wall time of one ``distributed.extract`` call,
actor start-up included (Ray itself is started once, before the clock). Printed side by side with the ratio
to the single-process time; the results are checked equal.

    python benchmarks/bench_ray.py [--n 20000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import gradood
    from gradood import distributed
    from gradood.models.architectures import LeNet5

    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.rand(args.n, 1, 28, 28)
    requests = [gradood.LOGITS, gradood.FEATURES, *gradood.create("grodin").requests()]

    t0 = time.perf_counter()
    distributed.init(None, num_cpus=2)
    print(f"ray start-up: {time.perf_counter() - t0:.1f} s (not counted below)")
    torch.set_num_threads(1)  # each path gets one core per worker
    t0 = time.perf_counter()
    local = gradood.Probe(model).signals(x, batch_size=args.batch_size, progress=False)
    local.require(requests)
    single = time.perf_counter() - t0
    print(f"{'path':<22} {'seconds':>8} {'samples/s':>10} {'vs 1 process':>13}")
    print(f"{'1 process (1 thread)':<22} {single:>8.1f} {args.n / single:>10.0f} {1.0:>12.2f}x")
    for workers in (1, 2):
        t0 = time.perf_counter()
        got, _ = distributed.extract(gradood.Probe(model), x, requests, workers=workers, batch_size=args.batch_size)
        took = time.perf_counter() - t0
        for r in requests:
            torch.testing.assert_close(got[r.key], local.get(r))
        print(f"{f'Ray, {workers} worker(s)':<22} {took:>8.1f} {args.n / took:>10.0f} {single / took:>12.2f}x")


if __name__ == "__main__":
    main()
