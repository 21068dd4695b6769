"""Peak memory of the out-of-core path (gradood.stream) for 10^5 and 10^6 samples with 512-d features.

Each measurement runs in a fresh process (peak RSS = VmHWM) that extracts the signals of N generated samples
through a 512 -> 10 linear head into shards, fits Mahalanobis, ViM, KL-matching and ReAct (exact 90th
percentile) from the shards, writes a KNN bank, and scores all N samples (KNN: the first 2 000 against the full
bank). The inputs are generated batch by batch, so no part of the pipeline is handed the whole dataset. Printed
side by side: the baseline after imports, the peak, the part above the baseline, and what the design bounds it
by (one shard of signals + the fitted state + the score vector), and for 10^5 the in-memory path's peak.

    python benchmarks/bench_out_of_core.py [--sizes 100000 1000000] [--shard-rows 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

D, C = 512, 10


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, shard_rows: int, mode: str, folder: str) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    import gradood
    from gradood import stream

    torch.set_num_threads(2)

    class Generated(IterableDataset):
        """N seeded samples, made batch by batch (labels: the nearest of C fixed centres)."""

        def __iter__(self):
            centres = torch.randn(C, D, generator=torch.Generator().manual_seed(0)) * 2
            for start in range(0, n, 4096):
                g = torch.Generator().manual_seed(1000 + start)
                y = torch.randint(0, C, (min(4096, n - start),), generator=g)
                yield (centres[y] + torch.randn(len(y), D, generator=g)).relu(), y

    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(D, C)).eval()
    torch.manual_seed(0)
    probe = gradood.Probe(model, head="1")
    data = DataLoader(Generated(), batch_size=None)
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    names = {"mahalanobis": {}, "vim": {"dim": 256}, "klmatching": {}, "react": {}}
    if mode == "stream":
        shards = stream.extract_to_shards(probe, data, [gradood.LOGITS, gradood.FEATURES], folder,
                                          shard_rows=shard_rows, progress=False)
        scores = {}
        for name, params in names.items():
            det = stream.fit_streaming(gradood.create(name, **params), shards)
            scores[name] = stream.score_streaming(det, shards)
        knn = stream.fit_streaming(gradood.create("knn", k=50), shards)
        first = stream.ShardedSignals(folder).shard_signals(0).subset(range(2000))
        scores["knn"] = stream.fit.score_shard(knn, first)
    else:
        signals = probe.signals(data, progress=False)
        scores = {name: gradood.create(name, **params).fit(signals).score(signals) for name, params in names.items()}
        knn = gradood.create("knn", k=50).fit(signals)
        scores["knn"] = knn.score(signals.subset(range(2000)))
    seconds = time.perf_counter() - t0
    assert all(np.isfinite(s).all() for s in scores.values())
    return {"n": n, "mode": mode, "base_mb": base, "peak_mb": _rss_mb("VmHWM"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--in-memory-up-to", type=int, default=100_000, help="also run the in-memory path up to this N")
    ap.add_argument("--child", nargs=3, metavar=("N", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.shard_rows, args.child[1], args.child[2])))
        return
    shard_mb = args.shard_rows * (D + C) * 4 / 2**20
    print(f"one shard = {args.shard_rows} rows x ({D} + {C}) float32 = {shard_mb:.0f} MB")
    print(f"{'N':>9} {'path':>7} {'base MB':>8} {'peak MB':>8} {'above MB':>9} {'scores MB':>10} {'above/shard':>12} "
          f"{'s':>6}")
    above: dict[tuple[str, int], float] = {}
    for n in args.sizes:
        for mode in ("stream", "memory"):
            if mode == "memory" and n > args.in_memory_up_to:
                continue
            with tempfile.TemporaryDirectory() as folder:
                out = subprocess.run([sys.executable, __file__, "--shard-rows", str(args.shard_rows), "--child",
                                      str(n), mode, folder], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            above[mode, n] = r["peak_mb"] - r["base_mb"]
            scores_mb = n * 8 * 5 / 2**20  # the five float64 score vectors the run keeps
            print(f"{n:>9} {mode:>7} {r['base_mb']:>8.0f} {r['peak_mb']:>8.0f} {above[mode, n]:>9.0f} "
                  f"{scores_mb:>10.0f} {above[mode, n] / shard_mb:>11.1f}x {r['seconds']:>6.1f}")
    lo, hi = min(args.sizes), max(args.sizes)
    if lo != hi:
        print(f"stream: memory above baseline at N = {hi} / at N = {lo}: {above['stream', hi] / above['stream', lo]:.2f}x "
              f"for {hi / lo:.0f}x the samples")

if __name__ == "__main__":
    main()
