"""The per-block metrics of one eval point, fed by forward hooks from the eval passes the run
makes anyway (``ncsweep.training.evaluate``): no forward pass of its own while the kept block
features fit their budget.

Inside ``with DepthProbe(blocks, K, budget) as depth:`` every forward pass of the model stores
its blocks' pooled outputs; after each train batch ``depth.train(y)``, after the train pass
``depth.reduce()`` (across ranks), on a second train pass (only if ``depth.needs_second_pass``)
``depth.second(y)``, after each test batch ``depth.test(y)``, then ``depth.compute()``. With no
blocks (the UFM, ``nc.layers=[]``) every call does nothing and ``compute`` is empty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType

import torch

from ncsweep.nc.blocks import Block
from ncsweep.nc.layers import LayerMetrics
from ncsweep.nc.probe import BlockOutputs, capture


class DepthProbe:
    """Hooks on the chosen blocks for the ``with`` body, and their ``LayerMetrics``."""

    def __init__(self, blocks: Sequence[Block], num_classes: int,
                 max_feature_bytes: int) -> None:
        self.blocks = tuple(blocks)
        self.metrics = (LayerMetrics([b.name for b in self.blocks], num_classes,
                                     [b.depth for b in self.blocks], max_feature_bytes)
                        if self.blocks else None)
        self.outputs: BlockOutputs | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DepthProbe:
        if self.blocks:
            pairs = [(b.name, b.module) for b in self.blocks]
            self.outputs = self._stack.enter_context(capture(pairs))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stack.close()
        self.outputs = None

    def train(self, labels: torch.Tensor) -> None:
        """The latest forward pass's block outputs as a train batch."""
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
            self.metrics.update_train_ncc(self.outputs.take(), labels)

    def test(self, labels: torch.Tensor) -> None:
        """The latest forward pass's block outputs as a test batch (ncc_acc_test)."""
        if self.metrics is not None and self.outputs is not None:
            self.metrics.update_test(self.outputs.take(), labels)

    def compute(self) -> dict[str, float]:
        """Every block's keys and the data-separation fit; empty without blocks (collective)."""
        return {} if self.metrics is None else self.metrics.compute()
