"""Small classifiers whose module names match packaged pretrained weights (so ``load_state_dict`` is strict),
and the LeNet-5 gradood trains for Fashion-MNIST.

Every layer is a named submodule (no functional ReLUs/pools), so :class:`gradood.Probe` can tap any of them.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitRecognizerCNN(nn.Module):
    """The MNIST CNN of the ``digit-recognizer-py==0.1.0`` wheel (MIT licence, Shivam Gupta).

    ``conv_layers``: 3 x [Conv 3x3 pad 1 -> ReLU -> MaxPool 2] with 32, 64, 128 channels (28 -> 14 -> 7 -> 3);
    ``fc_layers``: Linear(1152, 256) -> ReLU -> Linear(256, 10) (the head, ``fc_layers.2``).
    Inputs: 1 x 28 x 28 normalised with MNIST mean 0.1307, std 0.3081.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.flatten = nn.Flatten()
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(self.flatten(self.conv_layers(x)))


class CCExamMNISTNet(nn.Module):
    """The MNIST CNN of the ``ccexam==1.0.0`` wheel (MIT licence, FYS-8805-Collaborative-Coding).

    ``features``: 2 x [Conv 3x3 pad 1 -> ReLU -> MaxPool 2] with 32, 64 channels (28 -> 14 -> 7);
    ``classifier``: Linear(3136, 128) -> ReLU -> Linear(128, 10) (the head, ``classifier.2``).
    Inputs: 1 x 28 x 28 normalised with MNIST mean 0.1307, std 0.3081.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class LeNet5(nn.Module):
    """LeNet-5 for 1 x 28 x 28 inputs, as used for Fashion-MNIST in the FSSD paper's small-model setting.

    conv1 (1->6, 5x5) relu1 pool1 (2) | conv2 (6->16, 5x5) relu2 pool2 (2) | flatten (16*4*4 = 256) |
    fc1 (120) relu3 | fc2 (84) relu4 | fc3 (classes; the head). No padding: 28 -> 24 -> 12 -> 8 -> 4.
    Every stage is its own module, so FSSD / multi-layer Mahalanobis can tap e.g. ``relu1``, ``relu2``,
    ``relu3``, ``relu4``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
