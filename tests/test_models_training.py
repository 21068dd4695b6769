"""The training recipe: seeded and deterministic, atomic checkpoint, the ``gradood train`` entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradood import data, models
from gradood.data import ArrayDataset, sha256_file
from gradood.errors import ConfigError
from gradood.models.training import TrainConfig, train_classifier, train_main


def blobs(n: int = 240, seed: int = 0) -> ArrayDataset:
    """Three classes of 1 x 28 x 28 images that differ in mean brightness: learnable in one epoch."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.clip(rng.normal(0.2 + 0.3 * y[:, None, None, None], 0.1, (n, 1, 28, 28)), 0, 1).astype(np.float32)
    return ArrayDataset(x, y.astype(np.int64), ("dark", "mid", "bright"), (0.5,), (0.3,), name="blobs")


def train_once(seed: int, tmp_path, tag: str):
    torch.manual_seed(seed)
    model = models.LeNet5(num_classes=3)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=0.01, seed=seed, threads=1)
    return train_classifier(model, blobs(), test=blobs(90, seed=1), config=cfg, progress=False,
                            checkpoint=tmp_path / f"{tag}.pt")


def test_training_is_seeded_deterministic_and_saves_atomically(tmp_path):
    threads = torch.get_num_threads()
    a, b = train_once(0, tmp_path, "a"), train_once(0, tmp_path, "b")
    assert a.checkpoint_sha256 == b.checkpoint_sha256 == sha256_file(tmp_path / "a.pt")
    assert a.test_accuracy > 0.9 and len(a.history) == 2 and not a.model.training
    assert train_once(1, tmp_path, "c").checkpoint_sha256 != a.checkpoint_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]  # no temporary files left
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    sd = models.load_state_dict_file(tmp_path / "a.pt")
    models.load_weights(models.LeNet5(num_classes=3), sd)


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="optimizer"):
        train_classifier(models.LeNet5(3), blobs(), config=TrainConfig(optimizer="rmsprop"), progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        train_classifier(models.LeNet5(3), blobs(), config=TrainConfig(epochs=0), progress=False)


def test_train_main_writes_checkpoint_and_record(tmp_path, capsys):
    out = tmp_path / "lenet.pt"
    argv = ["lenet-fmnist", "--out", str(out), "--epochs", "1", "--train-subset", "2000", "--optimizer", "adam",
            "--lr", "0.003", "--no-progress"]
    assert train_main(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_file(out)
    assert record["command"] == "gradood train " + " ".join(argv)
    assert record["seed"] == 0 and record["torch_version"] == torch.__version__
    assert record["dataset"]["train_samples"] == 2000 and record["dataset"]["test_samples"] == 10000
    assert 0.4 < record["test_accuracy"] < 1 and record["config"]["optimizer"] == "adam"
    model = models.load_weights(models.LeNet5(), models.load_state_dict_file(out))
    assert model.fc3.out_features == 10
    assert "saved" in capsys.readouterr().out


def test_recipe_reference_checkpoint_is_what_the_registry_loads():
    model, info = models.load("lenet-fmnist")
    assert info.checkpoint_sha256 and info.accuracy["fashion_mnist/test"] > 0.85
    assert data.describe("fashion_mnist").splits == ("train", "test")
