"""Models for OOD benchmarks: architectures matching packaged pretrained weights, safe checkpoint loading,
a training recipe, and a registry.

Quick use::

    from gradood import models
    models.available()                          # ['efficientnet-lite0', 'lenet-fmnist', ...]
    model, info = models.load("mnist-cnn-ccexam")
    probe = gradood.Probe(model, head=info.head, input_std=info.std)
"""

from .architectures import CCExamMNISTNet, DigitRecognizerCNN, LeNet5
from .checkpoints import load_state_dict_file, load_weights, save_state_dict
from .efficientnet_lite import EfficientNetLite0
from .registry import ModelInfo, ModelSpec, available, describe, load, register, tokenizer

__all__ = [
    "available", "describe", "load", "register", "tokenizer", "ModelInfo", "ModelSpec",
    "DigitRecognizerCNN", "CCExamMNISTNet", "LeNet5", "EfficientNetLite0",
    "load_state_dict_file", "load_weights", "save_state_dict",
]
