"""EfficientNet-Lite0 in plain PyTorch, state-dict compatible with timm's `tf_efficientnet_lite0`.

Contract:
- `EfficientNetLite0(num_classes=1000)` has exactly the parameter and buffer names, order and shapes of timm's
  `tf_efficientnet_lite0`, so a timm state dict loads with `strict=True` (no timm or torchvision needed).
- It computes what the TF-ported weights expect: TensorFlow "SAME" padding (asymmetric, extra pixel on the
  bottom/right for strided convs), BatchNorm eps 1e-3 (TF; momentum stays 0.1 as timm builds it), ReLU6, no
  squeeze-excite.
- `forward_features(pixels [N, 3, H, W]) -> [N, 1280, ceil(H/32), ceil(W/32)]` (7x7 = 49 visual tokens at 224),
  `forward(pixels) -> logits [N, num_classes]`.
- `preprocess(pil_images) -> [N, 3, 224, 224]` reproduces timm's eval transform for these weights (bicubic resize of
  the short side to 224 / crop_pct, center crop, scale to [-1, 1] with mean = std = 0.5) using only PIL + numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

INPUT_SIZE = 224
CROP_PCT = 0.875  # timm's default eval crop: resize the short side to 224 / 0.875 = 256, then center-crop 224
MEAN = (0.5, 0.5, 0.5)  # TF-Lite EfficientNets take pixels in [-1, 1], not ImageNet mean/std
STD = (0.5, 0.5, 0.5)
NUM_FEATURES = 1280
BN_EPS = 1e-3  # TF BatchNorm defaults, as timm's tf_ variants use
BN_MOMENTUM = 0.1  # timm's tf_ variants set only eps; momentum stays PyTorch's default (TF decay .99 would be .01)

# One row per stage: (repeats, kernel, first stride, expansion, out channels); expansion 1 = depthwise-separable.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis: output = ceil(size / stride), extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free conv with TF "SAME" padding computed from the input size (needed when stride > 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C', ceil(H/s), ceil(W/s)]
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv with TF "SAME" padding; static symmetric padding where that is the same thing (stride 1)."""
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)


def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv + ReLU6, then a linear pointwise projection (the expansion-1 first stage)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.skip = stride == 1 and cin == cout
        self.conv_dw, self.bn1 = conv(cin, cin, kernel, stride, groups=cin), norm(cin)
        self.conv_pw, self.bn2 = conv(cin, cout), norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, cin, H, W] -> [N, cout, H/s, W/s]
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: 1x1 expand + ReLU6, depthwise + ReLU6, linear 1x1 projection, residual."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.skip = stride == 1 and cin == cout
        self.conv_pw, self.bn1 = conv(cin, mid), norm(mid)
        self.conv_dw, self.bn2 = conv(mid, mid, kernel, stride, groups=mid), norm(mid)
        self.conv_pwl, self.bn3 = conv(mid, cout), norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, cin, H, W] -> [N, cout, H/s, W/s]
        y = F.relu6(self.bn1(self.conv_pw(x)))  # [N, mid, H, W]
        y = F.relu6(self.bn2(self.conv_dw(y)))  # [N, mid, H/s, W/s]
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


def build_stages(cin: int = STEM_CHANNELS) -> nn.Sequential:
    """`blocks.<stage>.<block>` exactly as timm names them."""
    stages = []
    for repeats, kernel, stride, expansion, cout in STAGES:
        blocks = []
        for i in range(repeats):
            s = stride if i == 0 else 1
            if expansion == 1:
                blocks.append(DepthwiseSeparable(cin, cout, kernel, s))
            else:
                blocks.append(InvertedResidual(cin, cout, kernel, s, expansion))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7M parameters) with timm `tf_efficientnet_lite0` parameter names."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_features = NUM_FEATURES
        self.drop_rate = drop_rate
        self.conv_stem, self.bn1 = conv(3, STEM_CHANNELS, 3, 2), norm(STEM_CHANNELS)
        self.blocks = build_stages(STEM_CHANNELS)
        self.conv_head, self.bn2 = conv(STAGES[-1][-1], NUM_FEATURES), norm(NUM_FEATURES)
        self.classifier = nn.Linear(NUM_FEATURES, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TF-style init (fan-out normal for convs), so a randomly built model has sane activations."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 1280, H/32, W/32]
        return self.features_and_stages(pixels)[0]

    def features_and_stages(self, pixels: torch.Tensor, keep: Sequence[int] = ()) -> tuple[torch.Tensor, list]:
        """Final features [N, 1280, H/32, W/32] and the outputs of the stages listed in `keep`, in stage order."""
        x = F.relu6(self.bn1(self.conv_stem(pixels)))  # [N, 32, H/2, W/2]
        kept = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in keep:
                kept.append(x)  # [N, C_i, h_i, w_i]
        return F.relu6(self.bn2(self.conv_head(x))), kept  # x: [N, 320, H/32, W/32] before the head

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:  # [N, 1280, h, w] -> [N, num_classes]
        pooled = features.mean(dim=(2, 3))  # [N, 1280]
        pooled = F.dropout(pooled, self.drop_rate, self.training)
        return self.classifier(pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, num_classes]
        return self.forward_head(self.forward_features(pixels))


def resize_and_crop(image: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """Bicubic resize of the short side to floor(size / crop_pct), then a centered size x size crop."""
    image = image.convert("RGB")
    scale = math.floor(size / crop_pct)
    w, h = image.size
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return image.crop((left, top, left + size, top + size))


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    size: int = INPUT_SIZE,
    crop_pct: float = CROP_PCT,
) -> torch.Tensor:
    """PIL images (or HxWx3 uint8 arrays) -> normalized float pixels [N, 3, size, size] for `EfficientNetLite0`."""
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        arrays.append(np.asarray(resize_and_crop(image, size, crop_pct), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # [N, 3, size, size] in [0, 1]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch - mean) / std
