"""Image backbones (torchvision's ResNet and VGG) ending in a d-dimensional feature layer.

They return the pooled, flattened d-dimensional features, the head's exact input; there is
no classifier inside a backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ncsweep.errors import ConfigError
from ncsweep.models.network import Backbone

STEMS = ("imagenet", "cifar")
FEATURE_LAYERS = ("block", "linear")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check_choice(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(str(c) for c in choices))


def _image_channels(input_shape: Sequence[int], arch: str) -> int:
    if len(input_shape) != 3:
        raise ConfigError("dataset.input_shape", list(input_shape),
                          f"[C, H, W] image inputs with arch={arch}; use an image data set, "
                          "or arch=mlp")
    return int(input_shape[0])


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class ImageBackbone(Backbone):
    """What ResNet and VGG share: pretrained weights, freezing, and the speed switches.

    ``amp`` (bf16 or fp16) runs the backbone under autocast and returns float32 features
    (fp16 gradients are not loss-scaled: prefer bf16); ``channels_last`` stores weights and
    inputs NHWC; ``compile`` wraps the forward in ``torch.compile``.
    """

    kind = "vision"

    VARIANTS: tuple[str, ...] = ()

    def _finish(self, weights: str | None, weights_strict: bool, freeze: str, amp: str | None,
                channels_last: bool, compile: bool) -> None:
        if amp is not None:
            _check_choice("arch.amp", amp, [None, *AMP_DTYPES])
        self.start_from(weights, weights_strict, freeze)
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self._run = torch.compile(self.features_of) if compile else self.features_of

    def _torchvision_net(self, input_shape: Sequence[int], variant: str, stem: str,
                         feature_layer: str) -> tuple[nn.Module, int]:
        """Check the arch options and build torchvision's untrained ``variant``; (net, channels)."""
        from torchvision import models

        _check_choice("arch.variant", variant, self.VARIANTS)
        _check_choice("arch.stem", stem, STEMS)
        _check_choice("arch.feature_layer", feature_layer, FEATURE_LAYERS)
        return getattr(models, variant)(weights=None), _image_channels(input_shape, variant)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is None:
            return self._run(x)
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            features = self._run(x)
        return features.float()


class ResNet(ImageBackbone):
    """torchvision's ResNet18/34/50 up to global pooling, with a d-dimensional output.

    ``feature_layer=block`` (Zhu et al. 2021): the last residual block of layer4 outputs d
    channels (its last conv and BN have d channels, and a 1x1 conv + BN projection shortcut
    maps the block's input to d), so a smaller d removes parameters; at d = 512 (2048 for
    ResNet50) the network is torchvision's own. ``feature_layer=linear``: a Linear projection
    from 512/2048 to d after pooling. ``stem=cifar``: a 3x3 stride-1 first conv and no max-pool.
    """

    VARIANTS = ("resnet18", "resnet34", "resnet50")

    def __init__(self, input_shape: Sequence[int], feature_dim: int, variant: str = "resnet18",
                 stem: str = "imagenet", feature_layer: str = "block", weights: str | None = None,
                 weights_strict: bool = True, freeze: str = "none", amp: str | None = None,
                 channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        net, channels = self._torchvision_net(input_shape, variant, stem, feature_layer)
        width = net.fc.in_features
        if stem == "cifar":
            net.conv1 = _init_conv(nn.Conv2d(channels, 64, 3, 1, 1, bias=False))
            net.maxpool = nn.Identity()
        elif channels != 3:
            net.conv1 = _init_conv(nn.Conv2d(channels, 64, 7, 2, 3, bias=False))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2,
                                                              net.layer3, net.layer4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.width, self.feature_dim = width, feature_dim
        if feature_layer == "block" and feature_dim != width:
            _narrow_block(self.layer4[-1], feature_dim)
        self.proj = nn.Linear(width, feature_dim) if feature_layer == "linear" else None
        self._finish(weights, weights_strict, freeze, amp, channels_last, compile)

    def last_block(self) -> list[nn.Module]:
        return [self.layer4[-1]] + ([self.proj] if self.proj is not None else [])

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.proj(x) if self.proj is not None else x


def _narrow_block(block: nn.Module, dim: int) -> None:
    """Make a torchvision BasicBlock/Bottleneck output ``dim`` channels, projection shortcut."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, BasicBlock):
        block.conv2 = _init_conv(nn.Conv2d(block.conv2.in_channels, dim, 3, 1, 1, bias=False))
        block.bn2 = nn.BatchNorm2d(dim)
    elif isinstance(block, Bottleneck):
        block.conv3 = _init_conv(nn.Conv2d(block.conv3.in_channels, dim, 1, bias=False))
        block.bn3 = nn.BatchNorm2d(dim)
    else:
        raise TypeError(f"cannot narrow a {type(block).__name__}")
    shortcut = nn.Conv2d(block.conv1.in_channels, dim, 1, stride=block.stride, bias=False)
    block.downsample = nn.Sequential(_init_conv(shortcut), nn.BatchNorm2d(dim))


class VGG(ImageBackbone):
    """torchvision's VGG (with BatchNorm) as a d-dimensional feature extractor.

    ``stem=cifar``: the conv layers, then global average pooling (the usual VGG for 32x32
    images, 512 features); with ``feature_layer=block`` the last conv layer (and its BN)
    outputs d channels. ``stem=imagenet``: torchvision's 7x7 pooling and two hidden FC layers
    (4096 features, with dropout); the second one outputs d. ``feature_layer=linear`` adds a
    Linear projection to d instead.
    """

    VARIANTS = ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")

    def __init__(self, input_shape: Sequence[int], feature_dim: int, variant: str = "vgg11_bn",
                 stem: str = "cifar", feature_layer: str = "block", weights: str | None = None,
                 weights_strict: bool = True, freeze: str = "none", amp: str | None = None,
                 channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        net, channels = self._torchvision_net(input_shape, variant, stem, feature_layer)
        self.features = net.features
        if channels != 3:
            self.features[0] = _init_conv(nn.Conv2d(channels, 64, 3, padding=1))
        convs = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        self._last_conv = convs[-1]
        narrow = feature_layer == "block"
        if stem == "cifar":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Identity()
            width = self.features[self._last_conv].out_channels
            if narrow and feature_dim != width:
                last = self.features[self._last_conv]
                self.features[self._last_conv] = _init_conv(
                    nn.Conv2d(last.in_channels, feature_dim, 3, padding=1))
                self.features[self._last_conv + 1] = nn.BatchNorm2d(feature_dim)
        else:
            self.avgpool = net.avgpool
            self.classifier = net.classifier[:6]
            width = self.classifier[3].out_features
            if narrow and feature_dim != width:
                self.classifier[3] = nn.Linear(self.classifier[3].in_features, feature_dim)
                nn.init.normal_(self.classifier[3].weight, 0, 0.01)
                nn.init.zeros_(self.classifier[3].bias)
        self.stem, self.width, self.feature_dim = stem, width, feature_dim
        self.proj = nn.Linear(width, feature_dim) if feature_layer == "linear" else None
        self._finish(weights, weights_strict, freeze, amp, channels_last, compile)

    def last_block(self) -> list[nn.Module]:
        if self.stem == "cifar":
            block = [self.features[self._last_conv], self.features[self._last_conv + 1]]
        else:
            block = [self.classifier[3]]
        return block + ([self.proj] if self.proj is not None else [])

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        x = self.classifier(x)
        return self.proj(x) if self.proj is not None else x
