"""Forward hooks that collect named blocks' outputs during a forward pass the run makes anyway.

A convolutional output (N, C, H, W) enters as its per-channel spatial means (N, C), in float64:
global average pooling is the standard reduction of a feature map in the layer-wise collapse
literature (it is what the network's own head sees after its last stage), its width C does not
depend on the input size, and the full map would be C*H*W-dimensional (64 x 32 x 32 = 65,536
features at ResNet18's first stage on 32 x 32 inputs: 512 KiB of float64 per sample). Any other
output is flattened to (N, -1) and copied to float64, so later in-place operations of the
network cannot change it and the metrics centre it in place without a copy of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def pool(output: torch.Tensor) -> torch.Tensor:
    """A block's output as (N, features) in float64: per-channel means of a 4-D map, else a
    flattened copy (the one float64 copy the metrics need)."""
    output = output.detach()
    if output.ndim == 4:
        return output.mean(dim=(2, 3), dtype=torch.float64)
    flat = output.flatten(1)
    return flat.to(torch.float64, copy=True).contiguous()


Sink = Callable[[str, torch.Tensor], None]
"""Takes each pooled block output as the forward pass makes it: (block name, features)."""


class BlockOutputs:
    """The pooled outputs of the hooked blocks from the latest forward pass, by block name; or,
    with a ``sink``, each one handed to it at once, while it is still in cache."""

    def __init__(self, names: Sequence[str], sink: Sink | None = None) -> None:
        self.names = tuple(names)
        self.sink = sink
        self._outputs: dict[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        """The forward hook that stores a module's (last) output under ``name``, or hands it
        to the sink."""
        def store(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"block {name!r} ({type(module).__name__}) returned "
                                f"{type(output).__name__}, not a tensor")
            if self.sink is None:
                self._outputs[name] = pool(output)
            else:
                self.sink(name, pool(output))
        return store

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs of the forward pass since the last take, and clear them, so a stale
        batch can never be paired with new labels; refused if a block produced nothing."""
        outputs, self._outputs = self._outputs, {}
        missing = [name for name in self.names if name not in outputs]
        if missing:
            raise RuntimeError(
                f"block(s) {missing} produced no output in this forward pass: run the model "
                "inside capture(...), and without torch.compile past the hooked modules"
            )
        return outputs


@contextlib.contextmanager
def capture(blocks: Sequence[tuple[str, nn.Module]],
            sink: Sink | None = None) -> Iterator[BlockOutputs]:
    """Hook every (name, module) block for the ``with`` body; the hooks are removed on exit.

    ``with capture(blocks) as outputs: model(x); layers.update(outputs.take(), y)``, or with
    ``sink(name, features)`` called from each hook instead.
    """
    outputs = BlockOutputs([name for name, _ in blocks], sink)
    handles = []
    try:
        for name, module in blocks:
            handles.append(module.register_forward_hook(outputs.hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
