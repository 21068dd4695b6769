"""Benchmark of gradood's batched per-sample gradient engine on CPU.

For an MLP (784-1000-1000-10), the small CNN of bench_closed_form.py (3 conv 3x3 - BN - ReLU blocks, 32x32x3) and the
CIFAR ResNet-18, batch 128, it measures side by side in one run (warm-up first, then rounds in which every
method runs once, median over rounds):

* one batched forward pass (no grad) and one batched training step (forward + backward of the mean loss);
* gradood's full-network per-sample squared gradient norms and K = 64 projections (one forward + one backward);
* the torch.func reference (functional_call + vmap(grad) over the batch, then norms);
* the per-sample loop of the official GradNorm / GRODIN code (one forward + backward per sample), timed on a
  subset of samples and extrapolated to the batch.

It prints ratios against the training step and the loop, the projections' arithmetic floor
(norm time + K*P/F forward-equivalents), the allocator effect (``gradood.grads.tune_allocator``, measured in
fresh processes) and the peak memory of each method, each measured in a fresh process at two batch sizes.

    /tmp/venv/bin/python benchmarks/bench_grads.py            # everything (several minutes on 2 cores)
    /tmp/venv/bin/python benchmarks/bench_grads.py --quick    # fewer rounds, no memory/allocator runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradood.grads import GradBasis, per_sample_grad_projections, per_sample_grad_sqnorms, tune_allocator
from gradood.grads import reference as ref
from gradood.grads._capture import func_per_sample_grads, resolve_params
from gradood.models.cifar_resnet import resnet18_cifar

K = 64
BATCH = 128
MODELS = ("mlp", "cnn", "resnet18")


# ---------------------------------------------------------------------------------------------- models
def small_cnn() -> nn.Module:
    """The project's small CNN (as in benchmarks/bench_closed_form.py)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, 10),
    )


def build(name: str, batch: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
        x = torch.randn(batch, 784)
    elif name == "cnn":
        model, x = small_cnn(), torch.randn(batch, 3, 32, 32)
    elif name == "resnet18":
        model, x = resnet18_cifar(10), torch.randn(batch, 3, 32, 32)
    else:
        raise ValueError(name)
    # non-trivial BatchNorm statistics, as in a trained model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), x


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    """GRODIN's predicted-label cross-entropy (T = 1), per sample."""
    return F.cross_entropy(out, out.argmax(1), reduction="none")


def macs_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Linear and Conv layers for one sample (F in the projection floor)."""
    total = [0]

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Linear):
            total[0] += m.in_features * m.out_features * (out.numel() // out.shape[-1] // out.shape[0])
        elif isinstance(m, nn.Conv2d):
            total[0] += m.weight.numel() * (out.numel() // out.shape[0] // m.out_channels)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x[:1])
    for h in hs:
        h.remove()
    return total[0]


# ---------------------------------------------------------------------------------------------- methods
def make_methods(name: str, model: nn.Module, x: torch.Tensor, basis: GradBasis | None) -> dict[str, Callable]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).mean().backward()

    fs: dict[str, Callable] = {"forward": forward, "train step": train_step,
                               "gradood norms": lambda: per_sample_grad_sqnorms(model, x, loss_fn)}
    if basis is not None:
        fs[f"gradood K={K} proj"] = lambda: per_sample_grad_projections(model, x, loss_fn, basis)
    return fs


def vmap_chunk(name: str, model: nn.Module) -> int:
    """Samples per vmap call for the torch.func reference: the whole batch unless B x P would not fit."""
    P = sum(p.numel() for p in model.parameters())
    return BATCH if BATCH * P * 4 < 2e9 else 16


def vmap_norms(model: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    names = resolve_params(model, "all", x)
    P = sum(p.numel() for n, p in model.named_parameters() if n in names)
    out = []
    for _, grads in func_per_sample_grads(model, x, loss_fn, names, budget=chunk * P):
        out.append(sum(g.square().sum(1) for g in grads.values()))
    return torch.cat(out)


def time_rounds(fs: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Warm up every method, then run ``rounds`` rounds of all methods; median wall time per method."""
    for f in fs.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fs}
    for _ in range(rounds):
        for k, f in fs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_once(f: Callable, repeats: int = 2) -> float:
    f()
    return statistics.median([_timed(f) for _ in range(repeats)])


def _timed(f: Callable) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- memory (child)
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0). ru_maxrss cannot be used: it survives fork and
    exec, so a child started by this (large) process would report the parent's size."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, method: str, batch: int, threads: int, allocator: bool) -> None:
    """Run one method once in this (fresh) process; print baseline and peak RSS as JSON."""
    torch.set_num_threads(threads)
    if allocator:
        tune_allocator()
    model, x = build(name, batch)
    basis = GradBasis.random(model, K, orthonormal=False) if method == "proj" else None
    fs = {
        "train": lambda: loss_fn(model(x)).mean().backward(),
        "norms": lambda: per_sample_grad_sqnorms(model, x, loss_fn),
        "proj": lambda: per_sample_grad_projections(model, x, loss_fn, basis),
        "vmap": lambda: vmap_norms(model, x, batch),
    }
    with torch.no_grad():
        model(x[:2])  # lazy initialisations (kernels, allocator arenas) before the baseline
    reset = reset_peak_rss()
    base = _status_mb("VmRSS")
    fs[method]()
    print(json.dumps({"baseline_mb": base, "peak_mb": _status_mb("VmHWM"), "reset": reset}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing_child(name: str, threads: int, allocator: bool, rounds: int) -> None:
    """Median train-step / norms / projection times in a fresh process (for the allocator comparison)."""
    torch.set_num_threads(threads)
    if allocator:
        tune_allocator()
    model, x = build(name, BATCH)
    basis = GradBasis.random(model, K, orthonormal=False)
    res = time_rounds(make_methods(name, model, x, basis), rounds)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- main
def fmt_s(t: float) -> str:
    return f"{t * 1000:9.1f} ms" if t < 10 else f"{t:9.2f} s "


def bench_model(name: str, rounds: int, loop_n: int) -> dict:
    model, x = build(name, BATCH)
    P = sum(p.numel() for p in model.parameters())
    Fm = macs_per_sample(model, x)
    basis = GradBasis.random(model, K, orthonormal=False)
    res = time_rounds(make_methods(name, model, x, basis), rounds)
    chunk = vmap_chunk(name, model)
    res["torch.func vmap"] = time_once(lambda: vmap_norms(model, x, chunk))
    n = min(loop_n, BATCH)
    res["per-sample loop"] = time_once(lambda: ref.loop_sqnorms(model, x[:n], loss_fn)) * BATCH / n
    # exactness check of this very run (float32): our norms vs the loop on the first samples
    ours = per_sample_grad_sqnorms(model, x[:8], loss_fn)
    loop = ref.loop_sqnorms(model, x[:8], loss_fn)
    rel = float(((ours - loop).abs() / loop.abs()).max())
    return {"res": res, "P": P, "F": Fm, "chunk": chunk, "loop_n": n, "rel": rel}


def print_model(name: str, r: dict) -> list[tuple[str, bool, str]]:
    res, P, Fm = r["res"], r["P"], r["F"]
    train, fwd, loop = res["train step"], res["forward"], res["per-sample loop"]
    print(f"\n== {name}: P = {P / 1e6:.2f} M parameters, F = {Fm / 1e6:.1f} M multiply-adds per sample, batch {BATCH}")
    print(f"   {'method':<22}{'time':>12}{'x forward':>11}{'x train':>9}{'loop / x':>10}")
    for k, t in res.items():
        note = ""
        if k == "torch.func vmap":
            note = f"  (vmap over {r['chunk']} samples per call)"
        if k == "per-sample loop":
            note = f"  (timed on {r['loop_n']} samples, x {BATCH / r['loop_n']:.0f})"
        print(f"   {k:<22}{fmt_s(t):>12}{t / fwd:>10.2f}x{t / train:>8.2f}x{loop / t:>9.1f}x{note}")
    norms, proj = res["gradood norms"], res[f"gradood K={K} proj"]
    floor = norms + K * P / Fm * fwd
    print(f"   projection floor = norm time + K*P/F forward-equivalents = {fmt_s(norms).strip()} + "
          f"{K * P / Fm:.2f} x {fmt_s(fwd).strip()} = {fmt_s(floor).strip()}; projections = {proj / floor:.2f}x floor")
    print(f"   float32 check on 8 samples: max relative difference to the per-sample loop {r['rel']:.1e}")
    checks = []
    if name in ("mlp", "cnn"):
        checks.append((f"{name}: norms <= 1.05 x train step", norms / train <= 1.05, f"{norms / train:.2f}x"))
        checks.append((f"{name}: norms >= 5x faster than the loop", loop / norms >= 5,
                       f"{loop / norms:.1f}x (the loop is {loop / train:.1f}x the train step here, so 5x needs "
                       f"norms <= {loop / 5 / train:.2f}x the train step)"))
    if name in ("cnn", "resnet18"):
        checks.append((f"{name}: K={K} projections <= 1.5 x train step", proj / train <= 1.5,
                       f"{proj / train:.2f}x (floor {floor / train:.2f}x train; projections {proj / floor:.2f}x floor)"))
    if name == "mlp":
        checks.append((f"mlp: K={K} projections (floor {floor / train:.1f}x train) within 1.3 x floor",
                       proj / floor <= 1.3, f"{proj / floor:.2f}x floor = {proj / train:.1f}x train"))
    return checks


def memory_table(threads: int) -> None:
    print("\n== peak memory: VmHWM - VmRSS around one call, fresh process per cell (MB above the baseline after")
    print("   building model, data and basis; the K=64 basis itself is not counted: 11.2 M x 64 x 4 B = 2.9 GB on resnet18)")
    batches = (32, BATCH)
    print(f"   {'model':<10}{'method':<8}" + "".join(f"{'B=' + str(b):>12}" for b in batches) + "   growth 32->128")
    for name in MODELS:
        for method in ("train", "norms", "proj", "vmap"):
            if method == "vmap" and name == "resnet18":
                continue  # 128 x 11.2 M x 4 bytes = 5.7 GB of per-sample gradients: the point, not worth swapping
            cells = []
            for b in batches:
                r = run_child(["--memory-child", name, method, str(b), str(threads), "1"])
                cells.append(r["peak_mb"] - r["baseline_mb"])
            growth = cells[1] / max(cells[0], 1)
            print(f"   {name:<10}{method:<8}" + "".join(f"{c:>10.0f}MB" for c in cells) + f"{growth:>10.1f}x")
    P = {n: sum(p.numel() for p in build(n, 1)[0].parameters()) for n in MODELS}
    print("   (B x P x 4 bytes, what holding all per-sample gradients takes: " +
          ", ".join(f"{n} {BATCH * P[n] * 4 / 2**20:.0f} MB" for n in MODELS) + ")")


def allocator_table(threads: int) -> None:
    print("\n== allocator (tune_allocator: mallopt M_MMAP_MAX=0 + high trim threshold), fresh processes, alternating;")
    print("   best of the processes' medians (2 + 2 processes x 8 rounds; resnet18 1 + 1 x 2 rounds)")
    print(f"   {'model':<10}{'method':<20}{'default':>12}{'tuned':>12}{'saving':>9}")
    for name in MODELS:
        procs, rounds = (1, 2) if name == "resnet18" else (2, 8)
        runs: dict[str, list[dict]] = {"0": [], "1": []}
        for _ in range(procs):
            for alloc in ("0", "1"):
                runs[alloc].append(run_child(["--timing-child", name, str(threads), alloc, str(rounds)]))
        for k in ("train step", "gradood norms", f"gradood K={K} proj"):
            a, b = min(r[k] for r in runs["0"]), min(r[k] for r in runs["1"])
            print(f"   {name:<10}{k:<20}{fmt_s(a):>12}{fmt_s(b):>12}{(1 - b / a) * 100:>8.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds, no memory and allocator runs")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--timing-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        n, m, b, t, alloc = args.memory_child
        return memory_child(n, m, int(b), int(t), alloc == "1")
    if args.timing_child:
        n, t, alloc, r = args.timing_child
        return timing_child(n, int(t), alloc == "1", int(r))

    torch.set_num_threads(args.threads)
    tuned = tune_allocator()
    rounds = 3 if args.quick else args.rounds
    print(f"gradood per-sample gradient benchmark: torch {torch.__version__}, {args.threads} threads, batch {BATCH}, "
          f"float32, median of {rounds} rounds after warm-up, allocator tuned: {tuned}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the {os.cpu_count()} cores)")
    checks = []
    for name in args.models.split(","):
        r = bench_model(name, rounds, loop_n=16 if name == "resnet18" else 32)
        checks += print_model(name, r)
    if not args.quick:
        allocator_table(args.threads)
        memory_table(args.threads)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print("\n== targets")
    for what, ok, value in checks:
        print(f"   [{'PASS' if ok else 'MISS'}] {what}: {value}")


if __name__ == "__main__":
    main()
