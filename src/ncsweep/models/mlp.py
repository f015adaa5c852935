"""The MLP backbone of the Neural Collapse papers: Linear (+ BN) + activation blocks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from ncsweep.errors import ConfigError
from ncsweep.models.network import Backbone

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(Backbone):
    """Flatten, then ``depth`` hidden blocks of ``width``, then a feature layer of width d.

    Every block is Linear (+ BatchNorm) + activation; the feature layer is one too when
    ``feature_activation`` is set, as in the MLPs of the Neural Collapse papers. ``weights``,
    ``weights_strict`` and ``freeze`` start it from a state dict (ncsweep.models.transfer);
    the last block is the feature layer.
    """

    kind = "mlp"

    def __init__(self, input_shape: Sequence[int], feature_dim: int, width: int = 512,
                 depth: int = 2, batch_norm: bool = True, activation: str = "relu",
                 feature_activation: bool = True, compile: bool = False,
                 weights: str | None = None, weights_strict: bool = True,
                 freeze: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("arch.activation", activation, "one of " + ", ".join(ACTIVATIONS))
        widths = [math.prod(input_shape), *([width] * depth)]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += self._block(fan_in, fan_out, batch_norm, activation, True)
        feature_block = self._block(widths[-1], feature_dim, batch_norm, activation,
                                    feature_activation)
        self.layers = nn.Sequential(*layers, *feature_block)
        self._feature_block = len(feature_block)
        self.start_from(weights, weights_strict, freeze)
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

    def last_block(self) -> list[nn.Module]:
        return list(self.layers)[-self._feature_block:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) if self._compiled is None else self._compiled(x)
