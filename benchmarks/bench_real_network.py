"""gradood on a real deep network: EfficientNet-Lite0 (ImageNet) on the 20 real ImageNet images of foolbox.

Prints, measured side by side in one run (methods interleaved, median of ``--repeats`` rounds):

* the probe: head found, top-1 / top-5 on the 20 images, the time of ``probe.signals`` + the closed-form
  GradNorm / ExGrad / RG scores against a plain forward pass;
* the engine (full-network per-sample squared gradient norms of GRODIN's predicted-label loss) against one
  training step (forward + backward of the summed loss) and the ``torch.func`` reference (vmap over samples),
  how many parameters took the torch.func fallback (should be 0), and the largest relative difference to the
  reference, in float64 and the float32 roundoff of both.

    python benchmarks/bench_real_network.py      # under a minute on 2 cores (downloads the wheels once)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import gradood
from gradood import data, models
from gradood.detectors._perturb import pred_ce
from gradood.grads import FallbackWarning, per_sample_grad_sqnorms, tune_allocator
from gradood.grads.reference import sqnorms as reference_sqnorms


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(methods: dict, repeats: int) -> dict[str, float]:
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="images per batch for the gradient timings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    model, info = models.load("efficientnet-lite0")
    model.eval()
    x, y = data.load("foolbox_imagenet").tensors(mean=info.mean, std=info.std)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"EfficientNet-Lite0: {n_params / 1e6:.2f} M parameters, input {tuple(x.shape[1:])}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")

    probe = gradood.Probe(model, input_std=info.std, input_mean=info.mean)
    sig = probe.signals((x, y), batch_size=len(x), progress=False)
    top5 = sig.logits.topk(5, dim=1).indices
    top1 = int((top5[:, 0] == sig.labels).sum())
    in5 = int((top5 == sig.labels[:, None]).any(1).sum())
    print(f"probe: head {probe.head_name!r}, features {tuple(sig.features.shape)}; top-1 {top1}/{len(x)}, "
          f"top-5 {in5}/{len(x)} on the foolbox ImageNet images")

    dets = [gradood.create(n) for n in ("gradnorm", "exgrad", "rg")]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def closed_form() -> None:
        s = probe.signals((x, y), batch_size=len(x), progress=False)
        for d in dets:
            d.score(s)

    t = interleaved_medians({"forward": forward, "closed": closed_form}, args.repeats)
    print(f"closed-form GradNorm + ExGrad + RG on {len(x)} images: {t['closed']:.3f} s vs forward "
          f"{t['forward']:.3f} s = {t['closed'] / t['forward']:.2f}x")

    xb = x[: args.batch]
    loss = lambda out: pred_ce(out, 1.0)  # noqa: E731  GRODIN's loss: cross-entropy with the predicted label

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(xb)).sum().backward()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        fast = per_sample_grad_sqnorms(model, xb, loss)
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    methods = {"train step": train_step, "gradood norms": lambda: per_sample_grad_sqnorms(model, xb, loss),
               "torch.func": lambda: reference_sqnorms(model, xb, loss)}
    t = interleaved_medians(methods, max(1, args.repeats // 2))
    model.zero_grad(set_to_none=True)
    ref = reference_sqnorms(model, xb, loss)
    # float32 roundoff of both against the float64 values (where engine and reference agree to 1e-6, tested)
    m64 = copy.deepcopy(model).double()
    truth = per_sample_grad_sqnorms(m64, xb.double(), loss)
    truth_ref = reference_sqnorms(m64, xb.double(), loss)
    err = lambda v: float(((v.double() - truth).abs() / truth).max())  # noqa: E731
    print(f"full-network per-sample gradient norms, batch {len(xb)}:")
    for k, v in t.items():
        print(f"   {k:<14} {v:7.3f} s  {v / t['train step']:5.2f}x train step")
    print(f"   torch.func fallback warnings: {len(fallbacks)}; float64: gradood vs torch.func max relative "
          f"difference {float(((truth - truth_ref).abs() / truth).max()):.1e}")
    print(f"   float32 max relative error against float64: gradood {err(fast):.1e}, torch.func {err(ref):.1e}")


if __name__ == "__main__":
    main()
