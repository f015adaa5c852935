"""The per-block metrics of one eval point, fed by forward hooks from the eval passes the run
makes anyway (``ncsweep.training.evaluate``): no forward pass of its own while the kept block
features fit their budget.

Inside ``with DepthProbe(blocks, K, budget) as depth:``, around every forward pass of the
model: ``depth.before(y, phase, last)`` with the batch's labels (``phase``: ``train``,
``second``, ``test``, or ``none`` for a pass the blocks sit out; ``last``: the pass's last
batch), then ``depth.after(features)`` with
the head's input. Each hooked block's pooled output goes to its ``LayerMetrics`` from the hook
itself, while it is still in cache; on one process the last train batch ends the train pass,
so each block's centred pass runs there and then. After the train pass ``depth.reduce()``
(across ranks); a second train pass only where ``depth.needs_second_pass``; then
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
from typing import Any, Literal

import torch
from torch import nn

from ncsweep import distributed
from ncsweep.nc.blocks import Block
from ncsweep.nc.layers import BLOCK_KEYS, LayerMetrics, data_separation_fit, layer_key
from ncsweep.nc.probe import capture

Phase = Literal["train", "second", "test", "none"]


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
        self._labels: torch.Tensor | None = None
        self._phase: Phase = "train"
        self._final = False
        self._seen: set[str] = set()
        self._head_output: torch.Tensor | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DepthProbe:
        if self.metrics is not None:
            pairs = [(b.name, b.module) for b in self._own]
            self._stack.enter_context(capture(pairs, sink=self._receive))
        if self.shared is not None:
            handle = self.shared.module.register_forward_hook(self._store_head_output)
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stack.close()
        self._labels = self._head_output = None

    def before(self, labels: torch.Tensor, phase: Phase, last: bool = False) -> None:
        """The labels of the next forward pass, the pass it belongs to, and whether it is that
        pass's last batch."""
        self._labels, self._phase, self._seen = labels, phase, set()
        self._final = phase == "train" and last and not distributed.is_distributed()

    def after(self, features: torch.Tensor) -> None:
        """After the forward pass: ``features``, the head's input it computed. Refuses a block
        that produced nothing, and a head-input block whose output is not ``features``."""
        if self.metrics is not None:
            missing = [b.name for b in self._own if b.name not in self._seen]
            if missing:
                raise RuntimeError(
                    f"block(s) {missing} produced no output in this forward pass: run the "
                    "model inside the probe, and without torch.compile past the hooked modules"
                )
        if self.shared is not None and self._phase == "train":
            output, self._head_output = self._head_output, None
            if output is not features:
                raise RuntimeError(
                    f"block {self.shared.name!r} is marked as the head's input, but its output "
                    "is not the tensor the head received in this forward pass"
                )

    def reduce(self) -> None:
        """The train moments of every rank on every rank (collective; a no-op in one process)."""
        if self.metrics is not None:
            self.metrics.all_reduce()

    @property
    def needs_second_pass(self) -> bool:
        """True when the kept block features outgrew their budget: run a second train pass
        (``before(y, "second")``) before the test batches."""
        return self.metrics is not None and self.metrics.needs_second_pass

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

    def _receive(self, name: str, features: torch.Tensor) -> None:
        """A block's pooled output, from its hook, into the metrics of the current pass."""
        if self.metrics is None or self._labels is None:
            raise RuntimeError("a hooked block ran outside an eval batch: call before() first")
        self._seen.add(name)
        if self._phase == "train":
            self.metrics.add_train(name, features, self._labels, copy=False, final=self._final)
        elif self._phase == "second":
            self.metrics.add_second(name, features, self._labels, copy=False)
        elif self._phase == "test":
            self.metrics.add_test(name, features, self._labels, copy=False)

    def _store_head_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._head_output = output
