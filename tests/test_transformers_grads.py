"""Exact per-sample gradients through HuggingFace transformers, without the torch.func fallback.

Tiny BERT, RoBERTa, DistilBERT, GPT-2 and ViT classifiers (random weights from small configs, no downloads)
in float64. The reference for each sample is the gradient of its loss computed on that sample ALONE and
UNPADDED (one forward + backward of a batch of one, plain autograd): a padded batch must give every sample
exactly its unpadded result, so padded positions may contribute nothing. Squared norms, projections,
moments and weighted sums are compared; no FallbackWarning may be raised (every layer has a native rule).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from gradood.grads import (FallbackWarning, GradBasis, grad_moments, per_sample_grad_projections,
                           per_sample_grad_sqnorms, weighted_grad_sums)

tr = pytest.importorskip("transformers")

DT = torch.float64
V, H, L = 40, 16, 2
PAD = {"bert": 0, "roberta": 1, "distilbert": 0, "gpt2": 0}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(num_labels=3)
    if arch == "bert":
        cfg = tr.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=24, type_vocab_size=2, **common)
        model = tr.BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = tr.RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=24, pad_token_id=1, **common)
        model = tr.RobertaForSequenceClassification(cfg)
    elif arch == "distilbert":
        cfg = tr.DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=2, hidden_dim=32,
                                  max_position_embeddings=24, **common)
        model = tr.DistilBertForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = tr.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=2, n_positions=24, pad_token_id=0,
                            bos_token_id=2, eos_token_id=2, **common)
        model = tr.GPT2ForSequenceClassification(cfg)
    else:
        cfg = tr.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=H, num_hidden_layers=L,
                           num_attention_heads=2, intermediate_size=32, **common)
        model = tr.ViTForImageClassification(cfg)
    model = model.to(DT).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0) so no term vanishes by accident
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=DT) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=DT) - 0.5)
    return model


def token_batch(arch: str, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded ids (real tokens never equal the pad id) with their attention mask."""
    g = torch.Generator().manual_seed(2)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD[arch], dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":  # two segments, so the token-type table gets gradients in both rows
        batch["token_type_ids"] = (torch.arange(T) >= 2).long().expand(len(lengths), T) * mask
    return batch


def pred_ce(out) -> torch.Tensor:
    """Predicted-label cross-entropy at temperature 2 (GRODIN's loss): a function of each sample's output only,
    so the same function serves the batch, one sample and the fallback's per-sample calls."""
    return F.cross_entropy(out.logits / 2.0, out.logits.argmax(1), reduction="none")


def one_sample(batch, i: int):
    """Sample i alone and unpadded (what it would be without the rest of the batch)."""
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i:i + 1, :n] for k, v in batch.items()}


def alone_grads(model, batch, B: int) -> torch.Tensor:
    """``(B, P)``: each sample's full gradient from its own unpadded forward and backward."""
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(B):
        xi = one_sample(batch, i)
        out = model(**xi) if isinstance(xi, dict) else model(xi)
        loss = pred_ce(out)[0]
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(ps, gs)]))
    return torch.stack(rows)


def inputs_for(arch: str, padded: bool):
    if arch == "vit":
        return torch.randn(4, 3, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(3))
    return token_batch(arch, [3, 7, 5, 2] if padded else [6, 6, 6, 6])


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    err = float((a - b).abs().max() / b.abs().max())
    assert err < tol, f"relative error {err:.2e}"


ARCHS = ["bert", "roberta", "distilbert", "gpt2", "vit"]
CASES = [(a, True) for a in ARCHS if a != "vit"] + [(a, False) for a in ARCHS]


@pytest.mark.parametrize("arch,padded", CASES, ids=[f"{a}-{'padded' if p else 'unpadded'}" for a, p in CASES])
def test_engine_equals_each_sample_alone(arch, padded):
    model = build(arch)
    batch = inputs_for(arch, padded)
    ref = alone_grads(model, batch, 4)
    basis = GradBasis.random(model, 3, generator=torch.Generator().manual_seed(4))
    V3 = torch.cat([basis.directions[n].reshape(-1, 3) for n, _ in model.named_parameters()])
    w = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        sq = per_sample_grad_sqnorms(model, batch, pred_ce)
        proj = per_sample_grad_projections(model, batch, pred_ce, basis)
        mom = grad_moments(model, [batch], pred_ce)
        ws = weighted_grad_sums(model, batch, pred_ce, w)
    assert_close(sq, (ref * ref).sum(1))
    assert_close(proj, ref @ V3)
    flat = lambda d, k=(): torch.cat([d[n].reshape(-1, *k) for n, _ in model.named_parameters()])  # noqa: E731
    assert_close(flat(mom.sum), ref.sum(0))  # relative to the largest entry (key biases get exactly 0)
    assert_close(flat(mom.sumsq), (ref * ref).sum(0))
    assert_close(flat(ws, (2,)), ref.T @ w)


def test_padding_changes_nothing_but_an_unmasked_pad_would():
    """The padded batch's norms equal the unpadded ones; dropping the attention mask (pads attended) differs,
    so the equality above is not vacuous."""
    model = build("bert")
    batch = token_batch("bert", [3, 7, 5, 2])
    alone = torch.stack([per_sample_grad_sqnorms(model, one_sample(batch, i), pred_ce)[0]
                         for i in range(4)])
    assert_close(per_sample_grad_sqnorms(model, batch, pred_ce), alone)
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    diff = per_sample_grad_sqnorms(model, unmasked, pred_ce) - alone
    assert float(diff.abs().max() / alone.abs().max()) > 1e-5  # (random tiny weights attend almost uniformly)


def test_gpt2_lm_head_tied_to_token_table():
    """GPT-2's LM head shares the token table (tied weights): summed over both layers, exact, no fallback."""
    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=24, bos_token_id=2,
                        eos_token_id=2, tie_word_embeddings=True)
    model = tr.GPT2LMHeadModel(cfg).to(DT).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = token_batch("gpt2", [3, 6, 4])

    def lm_loss(out, mask=batch["attention_mask"], ids=batch["input_ids"]):
        T = out.logits.shape[1]
        ce = F.cross_entropy(out.logits.transpose(1, 2), ids[:out.logits.shape[0], :T].roll(-1, 1), reduction="none")
        return (ce * mask[:out.logits.shape[0], :T]).sum(1)

    ps = list(model.parameters())
    ref = []
    for i in range(3):
        xi = one_sample(batch, i)
        n = xi["input_ids"].shape[1]
        out = model(**xi)
        ce = F.cross_entropy(out.logits.transpose(1, 2), batch["input_ids"][i:i + 1].roll(-1, 1)[:, :n],
                             reduction="none")
        gs = torch.autograd.grad(ce.sum(), ps)
        ref.append(torch.cat([g.reshape(-1) for g in gs]))
    ref = torch.stack(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        sq = per_sample_grad_sqnorms(model, batch, lm_loss)
    assert_close(sq, (ref * ref).sum(1))


def test_fallback_loops_over_samples_when_vmap_cannot_run_the_model(monkeypatch):
    """HF attention branches on the mask's values, which vmap cannot trace: the fallback then runs one backward
    per sample (with a warning saying so) and stays exact."""
    import gradood.grads._capture as cap
    real = cap.handler_for
    monkeypatch.setattr(cap, "handler_for", lambda m: None if isinstance(m, torch.nn.LayerNorm) else real(m))
    model = build("bert")
    batch = token_batch("bert", [3, 7, 5, 2])
    ref = alone_grads(model, batch, 4)
    with pytest.warns(FallbackWarning) as rec:
        sq = per_sample_grad_sqnorms(model, batch, pred_ce)
    messages = " ".join(str(r.message) for r in rec)
    assert "LayerNorm" in messages and "one sample at a time" in messages
    assert_close(sq, (ref * ref).sum(1))
