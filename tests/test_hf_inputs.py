"""HuggingFace classifiers end to end on the probe side: dict / BatchEncoding / dict-DataLoader inputs,
tuple / dict / ModelOutput outputs, head discovery on BERT, RoBERTa, DistilBERT, GPT-2 and ViT classifiers
built from tiny configs (no downloads), perturbation of token inputs through their embeddings, and every
registered detector on a tiny BertForSequenceClassification."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradood
from conftest import MLP, make_inputs, seeded
from gradood.detectors._perturb import input_grad, pred_ce, step
from gradood.probe import ShiftedTokens

transformers = pytest.importorskip("transformers")

VOCAB, L = 40, 8


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """A float64 HF classifier with 3 labels, from a small config."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=3)
    if arch == "bert":
        m = transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=32, **common))
    elif arch == "roberta":
        m = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common))
    elif arch == "distilbert":
        m = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32, **common))
    elif arch == "gpt2":
        m = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1, **common))
    elif arch == "vit":
        m = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=8,
            patch_size=4, num_channels=3, num_labels=3))
    else:
        raise ValueError(arch)
    return m.eval().double()


def tokens(n: int, seed: int, pad: int = 0, lo: int = 3, hi: int = VOCAB - 1) -> dict[str, torch.Tensor]:
    """Right-padded token ids (the second half of the rows padded after 5 tokens) with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, L), generator=g)
    mask = torch.ones_like(ids)
    mask[n // 2:, 5:] = 0
    ids[mask == 0] = pad
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3}


def model_inputs(d):
    return {k: v for k, v in d.items() if k != "labels"}


HEADS = {"bert": "classifier", "roberta": "classifier.out_proj", "distilbert": "classifier", "gpt2": "score",
         "vit": "classifier"}


@pytest.fixture(scope="module")
def bert():
    return tiny("bert")


# ----------------------------------------------------------------------------------------- heads and pooling
@pytest.mark.parametrize("arch", list(HEADS))
def test_hf_head_discovery_and_signals(arch):
    model = tiny(arch)
    if arch == "vit":
        data = {"pixel_values": make_inputs(6, 3, 8, 8, seed=1).double(), "label": torch.arange(6) % 3}
        inputs = {"pixel_values": data["pixel_values"]}
    else:
        data = tokens(6, 1, pad=1 if arch == "roberta" else 0)
        inputs = model_inputs(data)
    probe = gradood.Probe(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "output differs from head" warning for ModelOutput
        s = probe.signals(data, batch_size=4, progress=False)
        logits = s.logits
    assert probe.head_name == HEADS[arch]
    with torch.no_grad():
        ref = model(**inputs).logits
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.labels, torch.arange(6) % 3)
    # the features are the head's input: the head's weight maps them to the logits
    bias = 0.0 if probe.bias is None else probe.bias  # GPT-2's score has no bias
    torch.testing.assert_close(s.features @ probe.weight.T + bias, logits, rtol=1e-10, atol=1e-12)


def test_gpt2_score_is_read_at_the_last_non_pad_token():
    """GPT-2's score runs at every position and the model pools the last non-pad token: the features are
    the final hidden state there, for padded and unpadded rows alike."""
    model = tiny("gpt2")
    data = tokens(6, 2)
    s = gradood.Probe(model).signals(data, progress=False)
    with torch.no_grad():
        hidden = model.transformer(**model_inputs(data)).last_hidden_state
    last = data["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(s.features, hidden[torch.arange(6), last], rtol=1e-12, atol=1e-12)
    assert (last[:3] == L - 1).all() and (last[3:] == 4).all()


# ----------------------------------------------------------------------------------------- input formats
class TokenDataset(Dataset):
    def __init__(self, d, label_key):
        self.d, self.label_key = d, label_key

    def __len__(self):
        return len(self.d["input_ids"])

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.d.items() if k != "labels"}
        item[self.label_key] = self.d["labels"][i]
        return item


@pytest.mark.parametrize("fmt", ["dict", "batch-encoding", "loader-labels", "loader-label", "tuple"])
def test_token_input_formats(fmt, bert):
    data = tokens(7, 3)
    src = {
        "dict": lambda: data,
        "batch-encoding": lambda: transformers.BatchEncoding(data),
        "loader-labels": lambda: DataLoader(TokenDataset(data, "labels"), batch_size=3),
        "loader-label": lambda: DataLoader(TokenDataset(data, "label"), batch_size=3),
        "tuple": lambda: (transformers.BatchEncoding(model_inputs(data)), data["labels"]),
    }[fmt]()
    s = gradood.Probe(bert).signals(src, batch_size=3, progress=False)
    assert len(s) == 7
    with torch.no_grad():
        torch.testing.assert_close(s.logits, bert(**model_inputs(data)).logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(s.labels, data["labels"])


def test_labels_are_not_passed_to_the_model(bert):
    seen = []
    h = bert.register_forward_pre_hook(lambda _m, _a, kw: seen.append(sorted(kw)), with_kwargs=True)
    try:
        gradood.Probe(bert, head="classifier").signals(tokens(4, 4), progress=False).logits
    finally:
        h.remove()
    assert seen and all(k == ["attention_mask", "input_ids"] for k in seen)


def test_variable_sequence_lengths_between_batches(bert):
    """Dynamic padding: each batch has its own length; the results equal one padded batch's."""
    data = tokens(6, 5)
    short = {k: (v[:, :5] if k != "labels" else v) for k, v in data.items()}

    class Batches:
        def __iter__(self):
            yield {k: v[:3] for k, v in data.items()}
            yield {k: v[3:] for k, v in short.items()}  # rows 3.. are padded after 5 tokens anyway

    s = gradood.Probe(bert).signals(Batches(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, bert(**model_inputs(data)).logits, rtol=1e-10, atol=1e-12)


def test_bad_dict_inputs_are_explained(bert):
    p = gradood.Probe(bert)
    bad_len = {"input_ids": torch.ones(4, L, dtype=torch.long), "attention_mask": torch.ones(3, L, dtype=torch.long)}
    with pytest.raises(gradood.InputError, match=r"different lengths.*'input_ids': 4.*'attention_mask': 3"):
        p.signals(bad_len, progress=False)
    with pytest.raises(gradood.InputError, match=r"entry 'text' is a list.*return_tensors='pt'"):
        p.signals({"input_ids": torch.ones(2, L, dtype=torch.long), "text": ["a", "b"]}, progress=False)
    with pytest.raises(gradood.InputError, match=r"model failed on the keyword inputs \{input_idz: \(2, 8\)\}"):
        p.signals({"input_idz": torch.ones(2, L, dtype=torch.long)}, progress=False).logits

    class Changing:
        def __iter__(self):
            yield {"input_ids": torch.ones(2, L, dtype=torch.long)}
            yield {"input_ids": torch.ones(2, L, dtype=torch.long), "token_type_ids": torch.zeros(2, L, dtype=torch.long)}

    with pytest.raises(gradood.InputError, match=r"keys.*earlier batches had \['input_ids'\]"):
        gradood.Probe(bert).signals(Changing(), progress=False).logits
    with pytest.raises(gradood.ModelError, match=r"layer 'bert' outputs a BaseModelOutput\w*, not a tensor"):
        gradood.Probe(bert).signals(tokens(2, 0), progress=False).get(gradood.Tap("bert"))


# ----------------------------------------------------------------------------------------- output formats
class Wrapped(nn.Module):
    """An MLP whose output is wrapped: a tuple (logits first), a dict, or a dict under another key."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = seeded(MLP, 0)
        self.kind = kind

    def forward(self, x):
        z = self.net(x)
        h = self.net.features(x)
        return {"tuple": lambda: (z, h), "dict": lambda: {"hidden": h, "logits": z},
                "other-key": lambda: {"scores": z, "hidden": h},
                "model-output": lambda: transformers.modeling_outputs.SequenceClassifierOutput(logits=z)}[self.kind]()


@pytest.mark.parametrize("kind", ["tuple", "dict", "model-output", "other-key"])
def test_model_outputs_are_read_for_logits_and_gradients(kind):
    """Closed forms, GRODIN (engine and perturbation) and low-dimensional gradients work on wrapped outputs,
    without the "output differs from head" warning."""
    model, x = Wrapped(kind), make_inputs(12, 6, seed=6)
    kw = {"logits": lambda out: out["scores"]} if kind == "other-key" else {}
    probe = gradood.Probe(model, **kw)
    s = probe.signals((x, torch.arange(12) % 5), batch_size=6, progress=False)
    ref_probe = gradood.Probe(model.net)
    ref = ref_probe.signals((x, torch.arange(12) % 5), batch_size=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, hp in [("energy", {}), ("grodin", {"eps": 0.01}), ("lowdim-pca-energy", {"k_dims": 3})]:
            det = gradood.create(name, **hp)
            a = det.fit(s).score(s)
            b = gradood.create(name, **hp).fit(ref).score(ref)
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-6, atol=1e-9)


def test_output_without_logits_asks_for_the_logits_callable():
    probe = gradood.Probe(Wrapped("other-key"))
    with pytest.raises(gradood.ModelError, match=r"without a 'logits' tensor.*'scores'.*logits=lambda"):
        probe.signals(make_inputs(4, 6), progress=False).logits


# ----------------------------------------------------------------------------------------- embedding perturbation
def test_token_perturbation_moves_the_embeddings_exactly(bert):
    """ODIN on token ids = the same step computed by hand on ``inputs_embeds`` (BERT adds positions and types
    after the word embeddings, so both paths are the same function)."""
    data = model_inputs(tokens(6, 7))
    probe = gradood.Probe(bert)
    probe.forward(data)
    T, eps = 10.0, 0.01
    g = input_grad(probe, data, lambda f, _t: pred_ce(f, T))
    xp = step(probe, data, g, eps, direction=-1.0)
    assert isinstance(xp, ShiftedTokens) and xp.delta.shape == (6, L, 16)
    got = torch.softmax(probe.forward(xp, validate=False).logits / T, dim=1).amax(dim=1)

    emb = bert.bert.embeddings.word_embeddings(data["input_ids"]).detach().requires_grad_(True)
    z = bert(inputs_embeds=emb, attention_mask=data["attention_mask"]).logits
    (gr,) = torch.autograd.grad(pred_ce(z, T).sum(), emb)
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        zp = bert(inputs_embeds=emb - eps * gr.sign(), attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(got, torch.softmax(zp / T, dim=1).amax(dim=1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, torch.softmax(probe.forward(data).logits / T, dim=1).amax(dim=1))

    odin = gradood.create("odin", temperature=T, eps=eps)
    scores = odin.fit(probe.signals(data, progress=False)).score(probe.signals(data, progress=False))
    torch.testing.assert_close(torch.as_tensor(scores), got, rtol=1e-12, atol=1e-12)


def test_gpt2_perturbation_keeps_pooling_at_the_last_non_pad_token():
    """Perturbing through the embedding output keeps the token ids, so GPT-2 still pools at each row's last
    non-pad token (inputs_embeds would silently pool at the last position)."""
    model = tiny("gpt2")
    data = model_inputs(tokens(6, 8))
    probe = gradood.Probe(model)
    probe.forward(data)
    g = input_grad(probe, data, lambda f, _t: pred_ce(f, 1.0))
    xp = step(probe, data, g, 0.05, direction=-1.0)
    got = probe.forward(xp, validate=False)
    with torch.no_grad():
        e = model.transformer.wte(data["input_ids"]) + xp.delta
        hidden = model.transformer(inputs_embeds=e, attention_mask=data["attention_mask"]).last_hidden_state
    last = data["attention_mask"].sum(dim=1) - 1
    torch.testing.assert_close(got.features, hidden[torch.arange(6), last], rtol=1e-12, atol=1e-12)


def test_grodin_with_eps_on_tokens_matches_a_per_sample_loop(bert):
    """GRODIN eps > 0 on text: the engine's per-sample gradient norms at the shifted embeddings equal a loop
    of per-sample autograd through ``inputs_embeds``."""
    data = tokens(4, 9)
    probe = gradood.Probe(bert)
    s = probe.signals(data, progress=False)
    T, eps = 2.0, 0.02
    det = gradood.create("grodin", part="SG", temperature=T, eps=eps).fit(s)
    got = torch.as_tensor(det.score(s))
    ids, mask = data["input_ids"], data["attention_mask"]
    params = [p for p in bert.parameters() if p.requires_grad]
    want = []
    for i in range(4):
        emb = bert.bert.embeddings.word_embeddings(ids[i:i + 1]).detach().requires_grad_(True)
        z = bert(inputs_embeds=emb, attention_mask=mask[i:i + 1]).logits
        (gi,) = torch.autograd.grad(pred_ce(z, T).sum(), emb)
        e = bert.bert.embeddings.word_embeddings(ids[i:i + 1]) - eps * gi.sign()  # the table's gradient counts
        loss = pred_ce(bert(inputs_embeds=e, attention_mask=mask[i:i + 1]).logits, T).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        want.append(-sum(g.pow(2).sum() for g in grads if g is not None))
    torch.testing.assert_close(got, torch.stack(want).detach(), rtol=1e-8, atol=1e-12)


def test_embedding_layer_choice(bert):
    probe = gradood.Probe(bert)
    assert probe.embedding_layer()[0] == "bert.embeddings.word_embeddings"
    assert gradood.Probe(bert, embeddings="bert.embeddings.position_embeddings").embedding_layer()[0] \
        == "bert.embeddings.position_embeddings"
    with pytest.raises(gradood.ModelError, match="no module named 'nope'"):
        gradood.Probe(bert, embeddings="nope")

    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(5, 4), nn.Embedding(5, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            return self.fc((self.a(ids) + self.b(ids)).mean(dim=1))

    p = gradood.Probe(TwoTables())
    with pytest.raises(gradood.ModelError, match=r"2 nn.Embedding layers.*embeddings="):
        p.embedding_layer()


# ----------------------------------------------------------------------------------------- the whole registry
#: small grids / sizes so that the loop stays fast; every other hyperparameter is the default
FAST = {"temperatures": (1.0, 10.0), "epsilons": (0.0, 0.01), "k_dims": 3, "power_iters": 1, "probe_epochs": 1}
#: detectors that cannot run on token inputs, and the words of their error
CANNOT = {"fssd": "FSSD needs image-like inputs", "fssd-lr": "FSSD needs image-like inputs",
          "fssd-lr-eps": "FSSD needs image-like inputs", "ash-fm": "no activation layer with a feature-map output",
          "rankfeat": "no activation layer with a feature-map output",
          "scale-fm": "no activation layer with a feature-map output", "bats-fm": "no affine BatchNorm layer",
          "gaia-z": "no BatchNorm layer and no activation with a feature-map input"}


@pytest.fixture(scope="module")
def bert_signals(bert):
    probe = gradood.Probe(bert)
    mk = lambda d, n: probe.signals(d, batch_size=16, name=n, progress=False)  # noqa: E731
    return (mk(tokens(60, 10), "id"), mk(tokens(16, 11), "id-val"), mk(tokens(16, 12, lo=20), "ood-val"),
            mk(tokens(16, 13), "test"))


@pytest.mark.slow
@pytest.mark.parametrize("name", gradood.available())
def test_every_detector_runs_on_a_bert_classifier_or_says_why(name, bert_signals):
    fit, id_val, ood_val, test = bert_signals
    params = gradood.create(name).get_params()
    det = gradood.create(name, **{k: v for k, v in FAST.items() if k in params})
    kw = {"ood_val": ood_val, "id_val": id_val} if det.tunes_on_ood else {}
    if name in CANNOT:
        with pytest.raises(gradood.NotApplicableError, match=CANNOT[name]):
            det.fit(fit, **kw)
        return
    s = det.fit(fit, **kw).score(test)
    assert s.shape == (16,) and bool((s == s).all()) and bool((abs(s) < float("inf")).all())


@pytest.mark.slow  # a fresh interpreter importing torch and gradood
def test_core_import_does_not_import_transformers():
    code = "import sys, gradood; gradood.available(); gradood.Probe; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pixel_values_dict_is_perturbed_like_the_image_tensor():
    """A dict input with ``pixel_values`` (ViT) is perturbed in pixel units like the same images passed as a
    tensor: ODIN and Mahalanobis preprocessing give identical scores either way."""
    model = tiny("vit")
    x = make_inputs(6, 3, 8, 8, seed=14).double()
    for name, hp in [("odin", {"temperature": 10.0, "eps": 0.01}),
                     ("mahalanobis-ensemble", {"eps": 0.01, "combine": "mean-z"})]:
        scores = []
        for data in ({"pixel_values": x, "labels": torch.arange(6) % 3}, (x, torch.arange(6) % 3)):
            probe = gradood.Probe(model, input_std=0.5)
            s = probe.signals(data, batch_size=3, progress=False)
            scores.append(gradood.create(name, **hp).fit(s).score(s))
        torch.testing.assert_close(torch.as_tensor(scores[0]), torch.as_tensor(scores[1]), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- layers of a transformer
def test_default_layers_of_a_transformer_are_its_activation_modules(bert):
    """transformers' GELUActivation is its own module class: each encoder layer's activation is a default tap
    (before, only the classifier's dropout was found and multi-layer methods saw a single layer)."""
    probe = gradood.Probe(bert)
    probe.signals(tokens(4, 30), progress=False).warm_up()
    assert probe.default_layers() == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)] \
        + ["bert.pooler.activation"]  # nn.Tanh


def _alone_and_batched(model, request_of, n=6, seed=31):
    """The request's rows for a right-padded batch, and for each sample run alone without its padding."""
    data = model_inputs(tokens(n, seed))
    probe = gradood.Probe(model)
    batched = probe.signals(data, progress=False).get(request_of(probe))
    alone = []
    for i in range(n):
        real = int(data["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :real] for k, v in data.items()}
        alone.append(gradood.Probe(model).signals(one, progress=False).get(request_of(probe))[0])
    return batched, torch.stack(alone), data


def test_tap_mean_of_a_sequence_averages_the_real_tokens(bert):
    """Tap(layer, "mean") of a B x T x H activation is the mean over the sample's real tokens: a padded batch
    gives each sample exactly its unpadded result; the plain mean over the last dim (H, the old reading) and
    the mean over all T positions (pads included) both differ."""
    layer = "bert.encoder.layer.1.intermediate.intermediate_act_fn"
    batched, alone, data = _alone_and_batched(bert, lambda p: gradood.Tap(layer, "mean"))
    assert batched.shape == (6, 24)
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-12)
    probe = gradood.Probe(bert)
    raw = probe.forward(data, [layer]).taps[layer]
    pads_included = raw.mean(dim=1)
    assert (pads_included[3:] - batched[3:]).abs().max() > 1e-3


def test_gram_of_a_sequence_ignores_padding(bert):
    """Gram row sums of a transformer layer: H channels over the real tokens; padding changes nothing."""
    from gradood.detectors.gram import GramFeatures

    layer = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    batched, alone, data = _alone_and_batched(bert, lambda p: GramFeatures((layer,), 3))
    assert batched.shape == (6, 3 * 24)  # orders x channels (H = 24), not x positions
    torch.testing.assert_close(batched, alone, rtol=1e-9, atol=1e-12)
    # independent reference for sample 0 (unpadded): A = H x T, row sums of (A^p)(A^p)^T, signed p-th root
    a = gradood.Probe(bert).forward(model_inputs(data), [layer]).taps[layer][0].T
    ref = []
    for p in (1, 2, 3):
        ap = a ** p
        g = (ap @ ap.T).sum(dim=1)
        ref.append(g.sign() * g.abs() ** (1.0 / p))
    torch.testing.assert_close(batched[0], torch.cat(ref), rtol=1e-9, atol=1e-12)


def test_bench_reports_inapplicable_detectors_apart_from_failures(tmp_path, monkeypatch):
    """A NotApplicableError (the method does not exist for this architecture) is collected as not applicable
    when the caller asks, and stays an error otherwise."""
    from gradood.bench import runner
    from gradood.errors import NotApplicableError

    def fake(ref, p, bootstrap, seed):
        if ref.name == "ash-fm":
            raise NotApplicableError("ash-fm found no activation layer with a feature-map output")
        raise gradood.ConfigError("broken")

    class Run:
        model, id_test = "m", type("D", (), {"label": "d"})()
        detectors = [type("R", (), {"name": n, "display": n, "key": lambda self: n})() for n in ("ash-fm", "x")]

    class Prepared:
        fit = val = test = type("S", (), {"data_digest": lambda self: "0", "__len__": lambda self: 1})()
        ood_val, ood_test, accuracy = {}, {}, None
        info = type("I", (), {"fingerprint": "f"})()

    spec = type("Spec", (), {"runs": [Run()], "bootstrap": 0, "seed": 0})()
    monkeypatch.setattr(runner, "validate_names", lambda s: None)
    monkeypatch.setattr(runner, "validate_data", lambda s: None)
    monkeypatch.setattr(runner, "prepare", lambda *a: Prepared())
    monkeypatch.setattr(runner, "run_key", lambda *a: "k")
    monkeypatch.setattr(runner, "evaluate_detector", fake)
    na: list[str] = []
    _, _, errors = runner.run_benchmark(spec, tmp_path, progress=False, log=lambda m: None, not_applicable=na)
    assert na == ["m / ash-fm: ash-fm found no activation layer with a feature-map output"]
    assert errors == ["m / x: broken"]
    _, _, errors = runner.run_benchmark(spec, tmp_path / "b", progress=False, log=lambda m: None)
    assert len(errors) == 2
