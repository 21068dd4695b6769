"""Peak memory of the streamed low-dimensional gradients' fit (gradood.stream.fit_from_data) against N.

Each measurement runs in a fresh process (peak RSS = VmHWM): a 256 -> 1024 -> 10 MLP (P = 273 418 parameters),
N samples generated per index by a map-style Dataset (never all in memory), ``lowdim`` with K = 32 directions,
1 power iteration and ``n_fit=None`` (every sample), fitted by ``fit_from_data`` in blocks of 16 batches of 256.
Printed: the baseline after imports, the peak, the part above the baseline, and that part in units of one
P x K float64 sketch (70 MB): the design bounds the subspace passes by a few sketches whatever N; the head adds
the fit samples' N x K projections (what a KNN head keeps as its bank).

    python benchmarks/bench_lowdim_stream.py [--sizes 4000 40000] [--k 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

D_IN, HIDDEN, C = 256, 1024, 10


from bench_out_of_core import _rss_mb  # noqa: E402  (the script's folder is on sys.path)


def child(n: int, k: int) -> dict:
    import torch
    from torch.utils.data import Dataset

    import gradood
    from gradood import stream

    torch.set_num_threads(2)

    class Generated(Dataset):
        """Sample i: seeded by i (labels: the nearest of C fixed centres)."""

        def __init__(self) -> None:
            self.centres = torch.randn(C, D_IN, generator=torch.Generator().manual_seed(0)) * 2

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(1000 + i)
            y = int(torch.randint(0, C, (1,), generator=g))
            return (self.centres[y] + torch.randn(D_IN, generator=g)).relu(), y

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, C)).eval()
    P = sum(p.numel() for p in model.parameters())
    probe = gradood.Probe(model)
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    det = gradood.create("lowdim", k_dims=k, power_iters=1, n_fit=None, knn_k=5)
    stream.fit_from_data(det, probe, Generated(), batch_size=256, progress=False)
    return {"n": n, "P": P, "k": k, "base": base, "peak": _rss_mb("VmHWM"), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 40000])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.k)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--k", str(args.k)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    sketch = rows[0]["P"] * args.k * 8 / 2**20
    print(f"P = {rows[0]['P']}, K = {args.k}: one P x K float64 sketch = {sketch:.0f} MB")
    print(f"{'N':>8} {'base MB':>8} {'peak MB':>8} {'above MB':>9} {'above/sketch':>13} {'s':>7}")
    for r in rows:
        above = r["peak"] - r["base"]
        print(f"{r['n']:>8} {r['base']:>8.0f} {r['peak']:>8.0f} {above:>9.0f} {above / sketch:>12.1f}x "
              f"{r['seconds']:>7.1f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"memory above baseline at N = {b['n']} / at N = {a['n']}: "
              f"{(b['peak'] - b['base']) / (a['peak'] - a['base']):.2f}x for {b['n'] / a['n']:.0f}x the samples")


if __name__ == "__main__":
    main()
