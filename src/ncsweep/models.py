"""Backbones that end in a d-dimensional feature layer, and the network that puts a head on one.

Image backbones (torchvision's ResNet and VGG) return the pooled, flattened d-dimensional
features, the head's exact input; there is no classifier inside a backbone.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden blocks of ``width``, then a feature layer of width d.

    Every block is Linear (+ BatchNorm) + activation; the feature layer is one too when
    ``feature_activation`` is set, as in the MLPs of the Neural Collapse papers.
    """

    def __init__(self, input_shape: Sequence[int], feature_dim: int, width: int = 512,
                 depth: int = 2, batch_norm: bool = True, activation: str = "relu",
                 feature_activation: bool = True, compile: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"arch.activation={activation!r} is not allowed: one of "
                             + ", ".join(ACTIVATIONS))
        widths = [math.prod(input_shape), *([width] * depth)]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += self._block(fan_in, fan_out, batch_norm, activation, True)
        layers += self._block(widths[-1], feature_dim, batch_norm, activation, feature_activation)
        self.layers = nn.Sequential(*layers)
        # a compiled function, not a module: the state dict keeps its plain names
        self._compiled = torch.compile(self.layers.forward) if compile else None

    @staticmethod
    def _block(fan_in: int, fan_out: int, batch_norm: bool, activation: str,
               nonlinear: bool) -> list[nn.Module]:
        block: list[nn.Module] = [nn.Linear(fan_in, fan_out)]
        if nonlinear:
            if batch_norm:
                block.append(nn.BatchNorm1d(fan_out))
            block.append(ACTIVATIONS[activation]())
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) if self._compiled is None else self._compiled(x)


class Network(nn.Module):
    """backbone -> d features -> head; ``features_and_logits`` gives the head's exact input."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)

    def penalty(self) -> torch.Tensor | float:
        """Extra regularisation of the objective (the UFM's lambdas); 0 for ordinary networks."""
        penalty = getattr(self.backbone, "penalty", None)
        return penalty(self.head) if penalty is not None else 0.0

    def example_input(self, batch_size: int, input_shape: Sequence[int]) -> torch.Tensor:
        """A random batch of the data's shape, for dry runs."""
        example = getattr(self.backbone, "example_input", None)
        if example is not None:
            return example(batch_size)
        device = next(self.parameters()).device
        return torch.randn(batch_size, *input_shape, device=device)


class UFMFeatures(nn.Module):
    """The unconstrained feature model's features: one free row h_i per sample, indexed by i.

    With a learned head this is exactly the objective of nc-metrics.md: the training loss
    plus ``penalty`` = (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2 + (lambda_b/2)||b||^2, so the
    optimiser's own weight decay must be 0. Each eval point adds the objective, its gap to
    the closed-form optimum and the gradient norm; the end of a run adds the Hessian probe.
    """

    def __init__(self, input_shape: Sequence[int], feature_dim: int, num_classes: int,
                 n_per_class: int, lambda_w: float = 5e-3, lambda_h: float = 5e-3,
                 lambda_b: float = 0.0, init_std: float = 1.0, dtype: str = "float64",
                 probe_grad_tol: float = 1e-6, probe_gap_tol: float = 1e-6,
                 probe_eig_tol: float = 1e-8) -> None:
        super().__init__()
        self.num_classes, self.n_per_class = num_classes, n_per_class
        self.lambdas = (lambda_w, lambda_h, lambda_b)
        self.dtype = getattr(torch, dtype)
        n = num_classes * n_per_class
        scale = init_std / math.sqrt(feature_dim)
        self.features = nn.Parameter(scale * torch.randn(n, feature_dim, dtype=self.dtype))
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(n_per_class))
        self.register_buffer("all_rows", torch.arange(n), persistent=False)
        self._optimum: dict[tuple[str, bool], float] = {}
        self.tolerances = (probe_grad_tol, probe_gap_tol, probe_eig_tol)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if index.numel() == self.features.shape[0] and torch.equal(index, self.all_rows):
            return self.features
        return self.features[index]

    def example_input(self, batch_size: int) -> torch.Tensor:
        n = self.features.shape[0]
        return torch.randint(n, (min(batch_size, n),), device=self.features.device)

    def penalty(self, head: nn.Module) -> torch.Tensor:
        lambda_w, lambda_h, lambda_b = self.lambdas
        value = 0.5 * lambda_h * self.features.pow(2).sum()
        value = value + 0.5 * lambda_w * head.weight.pow(2).sum()
        if head.bias is not None and lambda_b:
            value = value + 0.5 * lambda_b * head.bias.pow(2).sum()
        return value

    def _theory_args(self, head: nn.Module, loss_fn: nn.Module) -> tuple:
        return (head.weight, self.features, head.bias, self.labels, loss_fn.name, *self.lambdas)

    def optimum(self, head: nn.Module, loss_fn: nn.Module) -> float | None:
        """f* from the closed form; None where the head is frozen (then f* is not the UFM's)."""
        from ncsweep.theory import ufm_optimum

        if not head.weight.requires_grad:
            return None
        key = (loss_fn.name, head.bias is not None)
        if key not in self._optimum:
            self._optimum[key] = ufm_optimum(self.num_classes, self.features.shape[1],
                                             self.n_per_class, loss_fn.name, *self.lambdas,
                                             bias=key[1]).objective
        return self._optimum[key]

    def eval_metrics(self, head: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
        """objective, objective_star, objective_gap and grad_norm over the trainable parameters."""
        from ncsweep.theory import ufm_objective

        params = [p for p in (head.weight, self.features, head.bias)
                  if p is not None and p.requires_grad]
        with torch.enable_grad():
            objective = ufm_objective(*self._theory_args(head, loss_fn))
            grads = torch.autograd.grad(objective, params)
        row = {"objective": objective.item(),
               "grad_norm": torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()}
        star = self.optimum(head, loss_fn)
        if star is not None:
            row.update(objective_star=star, objective_gap=row["objective"] - star)
        return row

    def final_checks(self, head: nn.Module, loss_fn: nn.Module, final: dict) -> dict:
        """The landscape probe at the end point, and a loud flag for a spurious minimum."""
        from ncsweep.theory import hessian_min_eig, ufm_objective

        weight, features, bias, labels, loss, *lambdas = self._theory_args(head, loss_fn)
        params = [p for p in (weight, features, bias) if p is not None and p.requires_grad]
        fixed = {"weight": weight, "features": features, "bias": bias}
        names = [k for k, p in fixed.items() if p is not None and p.requires_grad]

        def objective(*values: torch.Tensor) -> torch.Tensor:
            parts = {**fixed, **dict(zip(names, values, strict=True))}
            return ufm_objective(parts["weight"], parts["features"], parts["bias"], labels,
                                 loss, *lambdas)

        min_eig = hessian_min_eig(objective, [p.detach() for p in params])
        grad_tol, gap_tol, eig_tol = self.tolerances
        gap = final.get("objective_gap")
        suspect = (gap is not None and final["grad_norm"] < grad_tol and gap > gap_tol
                   and min_eig >= -eig_tol)
        checks = {"hessian_min_eig": min_eig, "spurious_minimum_suspect": bool(suspect)}
        if gap is not None:
            checks["reached_global_optimum"] = bool(gap <= gap_tol)
        if suspect:
            print(f"ncsweep: WARNING spurious_minimum_suspect: gradient norm "
                  f"{final['grad_norm']:.2e}, gap {gap:.2e} > {gap_tol:g}, smallest Hessian "
                  f"eigenvalue {min_eig:.2e} (no negative curvature)", flush=True)
        return checks


# --------------------------------------------------------------------------- image backbones

STEMS = ("imagenet", "cifar")
FEATURE_LAYERS = ("block", "linear")
FREEZE = ("none", "all_but_last_block", "all")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")


class WeightsNotFound(FileNotFoundError):
    """``arch.weights`` names no local file; ncsweep never downloads weights."""


def _check_choice(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not allowed: one of "
                         + ", ".join(str(c) for c in choices))


def _image_channels(input_shape: Sequence[int], arch: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"arch={arch} needs image inputs [C, H, W], not dataset.input_shape="
                         f"{list(input_shape)}; use an image data set, or arch=mlp")
    return int(input_shape[0])


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def resolve_weights(spec: str) -> Path:
    """A local weight file: a path, or a torchvision weight name in the torch hub cache."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        return path
    if _WEIGHTS_NAME.match(str(spec)):
        from torchvision.models import get_weight

        try:
            url = get_weight(str(spec)).url
        except (ValueError, KeyError, AttributeError) as err:
            raise WeightsNotFound(f"arch.weights={spec}: torchvision knows no such weights "
                                  f"({err})") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return cached
        raise WeightsNotFound(
            f"arch.weights={spec}: no file {cached}; ncsweep never downloads weights: copy "
            f"{os.path.basename(url)} there (from {url}), or give arch.weights=PATH")
    raise WeightsNotFound(f"arch.weights={spec}: no such file {path.resolve()}")


def load_matching_weights(module: nn.Module, spec: str) -> dict[str, list[str]]:
    """Load every tensor of a state dict whose name and shape match; report the rest.

    Accepts a plain state dict, one under ``state_dict`` or ``model`` (an ncsweep checkpoint:
    ``backbone.`` prefixes are stripped), and DataParallel's ``module.`` prefixes.
    """
    path = resolve_weights(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": sorted(loaded),
        "skipped_shape": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        "unused": sorted(k for k in state if k not in own),
        "kept_init": sorted(k for k in own if k not in loaded),
    }
    module.load_state_dict(loaded, strict=False)

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", ... ({len(keys)})" if len(keys) > 4 else "")

    note = f"ncsweep: arch.weights: loaded {len(loaded)}/{len(own)} tensors from {path}"
    if report["skipped_shape"]:
        note += f"; skipped (shape differs): {names(report['skipped_shape'])}"
    if report["unused"]:
        note += f"; not in this model: {names(report['unused'])}"
    if report["kept_init"]:
        note += f"; left at init: {names(report['kept_init'])}"
    print(note, flush=True)
    return report


class ImageBackbone(nn.Module):
    """What ResNet and VGG share: pretrained weights, freezing, and the speed switches.

    ``amp`` (bf16 or fp16) runs the backbone under autocast and returns float32 features
    (fp16 gradients are not loss-scaled: prefer bf16); ``channels_last`` stores weights and
    inputs NHWC; ``compile`` wraps the forward in ``torch.compile``.
    """

    VARIANTS: tuple[str, ...] = ()

    def _finish(self, weights: str | None, freeze: str, amp: str | None, channels_last: bool,
                compile: bool) -> None:
        _check_choice("arch.freeze", freeze, FREEZE)
        if amp is not None:
            _check_choice("arch.amp", amp, [None, *AMP_DTYPES])
        self.weights_report = load_matching_weights(self, weights) if weights else None
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.channels_last = bool(channels_last)
        self._frozen_norms: list[nn.Module] = []
        if freeze != "none":
            keep = self.last_block() if freeze == "all_but_last_block" else []
            for p in self.parameters():
                p.requires_grad_(False)
            for m in keep:
                for p in m.parameters():
                    p.requires_grad_(True)
            self._frozen_norms = [m for m in self.modules()
                                  if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                  and not any(p.requires_grad for p in m.parameters())]
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

    def last_block(self) -> list[nn.Module]:
        """The modules that ``freeze=all_but_last_block`` leaves trainable."""
        raise NotImplementedError

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> ImageBackbone:
        """Frozen BatchNorm layers keep their running statistics (eval mode) while training."""
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

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
                 freeze: str = "none", amp: str | None = None, channels_last: bool = False,
                 compile: bool = False) -> None:
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
        self._finish(weights, freeze, amp, channels_last, compile)

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
                 freeze: str = "none", amp: str | None = None, channels_last: bool = False,
                 compile: bool = False) -> None:
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
        self._finish(weights, freeze, amp, channels_last, compile)

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
