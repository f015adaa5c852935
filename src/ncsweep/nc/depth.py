"""The per-block metrics of one eval point, fed by forward hooks from the eval passes the run
makes anyway (``ncsweep.training.evaluate``): no forward pass of its own while the kept block
features fit their budget.

Inside ``with DepthProbe(blocks, K, budget) as depth:`` every forward pass of the model stores
its blocks' pooled outputs; after each train batch ``depth.train(features, y)``, after the
train pass ``depth.reduce()`` (across ranks), on a second train pass (only if
``depth.needs_second_pass``) ``depth.second(y)``, after each test batch ``depth.test(y)``, then
``depth.compute(head)``. With no blocks (the UFM, ``nc.layers=[]``) every call does nothing and
``compute`` is empty.

A block whose output is the head's input itself (``Block.head_input``: the MLP's ``features``)
is not measured twice: its keys are the feature-layer metrics of the same eval point, passed
to ``compute`` as ``head`` (nc1, cdnv, trace_ratio, ncc_acc_train and, with test data,
ncc_acc_test). Each train batch checks that its output is the very tensor the head received.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ncsweep.nc.blocks import Block
from ncsweep.nc.layers import BLOCK_KEYS, LayerMetrics, data_separation_fit, layer_key
from ncsweep.nc.probe import BlockOutputs, capture


class DepthProbe:
    """Hooks on the chosen blocks for the ``with`` body, and their ``LayerMetrics``."""

    def __init__(self, blocks: Sequence[Block], num_classes: int,
                 max_feature_bytes: int) -> None:
        self.blocks = tuple(blocks)
        self.shared = next((b for b in self.blocks if b.head_input), None)
        self._own = [b for b in self.blocks if b is not self.shared]
        self.metrics = (LayerMetrics([b.name for b in self._own], num_classes,
                                     [b.depth for b in self._own], max_feature_bytes)
                        if self._own else None)
        self.outputs: BlockOutputs | None = None
        self._head_output: torch.Tensor | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DepthProbe:
        if self.metrics is not None:
            pairs = [(b.name, b.module) for b in self._own]
            self.outputs = self._stack.enter_context(capture(pairs))
        if self.shared is not None:
            handle = self.shared.module.register_forward_hook(self._store_head_output)
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stack.close()
        self.outputs = None
        self._head_output = None

    def train(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The latest forward pass's block outputs as a train batch; ``features``: the head's
        input of that pass."""
        if self.shared is not None:
            output, self._head_output = self._head_output, None
            if output is not features:
                raise RuntimeError(
                    f"block {self.shared.name!r} is marked as the head's input, but its output "
                    "is not the tensor the head received in this forward pass"
                )
        if self.metrics is not None and self.outputs is not None:
            self.metrics.update(self.outputs.take(), labels, copy=False)

    def reduce(self) -> None:
        """The train moments of every rank on every rank (collective; a no-op in one process)."""
        if self.metrics is not None:
            self.metrics.all_reduce()

    @property
    def needs_second_pass(self) -> bool:
        """True when the kept block features outgrew their budget: feed ``second`` a train pass."""
        return self.metrics is not None and self.metrics.needs_second_pass

    def second(self, labels: torch.Tensor) -> None:
        """The latest forward pass's block outputs on the second train pass (the squared terms
        and ncc_acc_train), run where ``needs_second_pass`` was True after ``reduce``."""
        if self.metrics is not None and self.outputs is not None:
            self.metrics.update_train_ncc(self.outputs.take(), labels, copy=False)

    def test(self, labels: torch.Tensor) -> None:
        """The latest forward pass's block outputs as a test batch (ncc_acc_test)."""
        if self.metrics is not None and self.outputs is not None:
            self.metrics.update_test(self.outputs.take(), labels, copy=False)

    def compute(self, head: Mapping[str, float]) -> dict[str, float]:
        """Every block's keys and the data-separation fit; empty without blocks (collective).

        ``head``: the feature-layer metrics of this eval point, the keys of a ``head_input``
        block (those of BLOCK_KEYS it holds)."""
        values = {} if self.metrics is None else self.metrics.block_values()
        if self.shared is not None:
            values |= {layer_key(self.shared.name, key): head[key]
                       for key in BLOCK_KEYS if key in head}
        if not self.blocks:
            return values
        nc1 = [values[layer_key(b.name, "nc1")] for b in self.blocks]
        return values | data_separation_fit([b.depth for b in self.blocks], nc1)

    def _store_head_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._head_output = output
