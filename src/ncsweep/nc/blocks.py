"""The named blocks of each architecture, read from its module structure, and ``nc.layers``.

Blocks per architecture, in forward order (a block's depth is its index in this list); the
last block's pooled output is always the head's input:

- MLP (``layers``: Linear (+ BN) + activation groups): ``hidden1`` .. ``hidden<depth>`` (each
  hidden block's activation output), then ``features`` (the feature layer's output).
- ResNet18/34/50 (``conv1 .. maxpool``, ``layer1`` .. ``layer4``): ``stem`` (the max-pool's
  output; an identity with the CIFAR stem), ``stage1`` .. ``stage4`` (torchvision's ``layer1``
  .. ``layer4``), then ``features`` when ``feature_layer=linear`` adds a projection.
- VGG (``features`` cut at its max-pools): ``block1`` .. ``block5`` (each max-pool's output);
  with ``stem=imagenet`` also ``fc1``, ``fc2`` (the two hidden FC layers' activations); then
  ``features`` when ``feature_layer=linear`` adds a projection.
- Anything else, the UFM included (free features, no layers): no blocks.

A ``Network`` (backbone + head) is read through its ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import nn

from ncsweep.errors import ConfigError

KEY = "nc.layers"
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

Named = list[tuple[str, nn.Module]]


class Block(NamedTuple):
    """A named block: the module whose output is measured, and its depth in the architecture.

    ``head_input``: the module's output tensor is the backbone's output itself (the MLP's last
    layer), so the block's metrics are the feature-layer metrics the eval point computes anyway.
    """

    name: str
    module: nn.Module
    depth: int
    head_input: bool = False


def named_blocks(model: nn.Module) -> list[Block]:
    """All blocks of the model's architecture in forward order; [] for one without layers."""
    net = getattr(model, "backbone", model)
    for finder in (_resnet_blocks, _vgg_blocks, _mlp_blocks):
        found = finder(net)
        if found is not None:
            head = _head_input_module(net)
            return [Block(name, module, depth, module is head)
                    for depth, (name, module) in enumerate(found)]
    return []


def _head_input_module(net: nn.Module) -> nn.Module | None:
    """The module whose output the backbone returns unchanged: the last of the MLP's
    ``layers``; None for the others, which pool or cast after their last block."""
    layers = getattr(net, "layers", None)
    if getattr(net, "kind", None) == "mlp" and isinstance(layers, nn.Sequential) and len(layers):
        return layers[-1]
    return None


def select_blocks(model: nn.Module, selection: Any) -> list[Block]:
    """The blocks ``nc.layers`` asks for: ``all``, ``last``, or a list of block names (kept in
    forward order; an empty list or null: none). A name that is not a block is refused."""
    blocks = named_blocks(model)
    if selection is None:
        return []
    if isinstance(selection, str):
        if selection == "all":
            return blocks
        if selection == "last":
            return blocks[-1:]
        raise ConfigError(KEY, selection, _allowed(blocks))
    if not hasattr(selection, "__iter__"):
        raise ConfigError(KEY, selection, _allowed(blocks))
    names = {block.name for block in blocks}
    wanted = list(selection)
    for name in wanted:
        if not isinstance(name, str) or name not in names:
            raise ConfigError(KEY, name, _allowed(blocks))
    return [block for block in blocks if block.name in wanted]


def _allowed(blocks: Sequence[Block]) -> str:
    if not blocks:
        return ("all, last, [] or null: this architecture has no blocks, so it logs no "
                "layers")
    return ("all, last, or a list of this architecture's blocks: "
            + ", ".join(block.name for block in blocks))


def _projection(net: nn.Module) -> Named:
    """``features`` for a backbone's own Linear projection to d (``feature_layer=linear``)."""
    proj = getattr(net, "proj", None)
    return [("features", proj)] if isinstance(proj, nn.Module) else []


def _resnet_blocks(net: nn.Module) -> Named | None:
    stages = [getattr(net, name, None) for name in RESNET_STAGES]
    stem = getattr(net, "maxpool", None)
    if not isinstance(stem, nn.Module) or not all(isinstance(s, nn.Module) for s in stages):
        return None
    named = [(f"stage{i}", stage) for i, stage in enumerate(stages, 1)]
    return [("stem", stem), *named, *_projection(net)]


def _last_of_groups(modules: nn.Sequential) -> list[nn.Module]:
    """Each Linear's group (up to the next Linear) by its last module that is not a Dropout,
    which equals the group's output in eval mode."""
    starts = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    ends = [*starts[1:], len(modules)]
    out = []
    for start, end in zip(starts, ends, strict=True):
        kept = [m for m in list(modules)[start:end] if not isinstance(m, nn.Dropout)]
        out.append(kept[-1])
    return out


def _vgg_blocks(net: nn.Module) -> Named | None:
    features = getattr(net, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    pools = [m for m in features if isinstance(m, nn.MaxPool2d)]
    if not pools:
        return None
    named = [(f"block{i}", pool) for i, pool in enumerate(pools, 1)]
    classifier = getattr(net, "classifier", None)
    if isinstance(classifier, nn.Sequential):
        named += [(f"fc{i}", m) for i, m in enumerate(_last_of_groups(classifier), 1)]
    return named + _projection(net)


def _mlp_blocks(net: nn.Module) -> Named | None:
    layers = getattr(net, "layers", None)
    if not isinstance(layers, nn.Sequential):
        return None
    ends = _last_of_groups(layers)
    if not ends:
        return None
    hidden = [(f"hidden{i}", m) for i, m in enumerate(ends[:-1], 1)]
    return [*hidden, ("features", ends[-1])]
