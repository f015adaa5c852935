"""Memory of training: a device-independent account of the bytes one training step holds, and
the peak the device saw (the CUDA allocator's peaks on a GPU, the process's peak RSS else).

``training_step_memory`` runs one real step and counts every storage once (keyed by device and
storage address), so tied parameters and views count once:

- ``memory_params_bytes``: every parameter of the model, frozen ones included;
- ``memory_grads_bytes``: the ``.grad`` of every trainable parameter after backward;
- ``memory_optimizer_bytes``: every tensor in ``optimizer.state`` after the step, as it is:
  Adam's two moments and its ``step`` scalars (4-byte CPU tensors unless capturable or fused),
  SGD's momentum buffers, LBFGS's direction, previous flat gradient and history;
- ``memory_activations_bytes``: the tensors autograd saves for backward during the forward and
  the loss (``torch.autograd.graph.saved_tensors_hooks``): the input batch where the first
  layer saves it, the labels and scalars the loss saves, autocast's low-precision weight
  copies. Parameter and buffer storages that autograd saves (a Linear's weight, BatchNorm's
  running statistics) are left out: they are model state, not made by the step. With LBFGS
  the largest of its closure calls counts (each call's graph is freed before the next);
- ``train_memory_bytes``: the sum of the four.

Not counted: buffers, forward temporaries freed before backward, the activation gradients and
scratch alive only during backward or the optimiser's update, kernel workspaces (cuDNN,
cuBLAS), the allocator's caching and fragmentation, and the memory of Python and torch
themselves. On a GPU the allocator's peak is therefore at least params + grads + optimizer
(after the step) and at least params + activations (at the end of the forward), and above
``train_memory_bytes`` only by buffers and such transient memory.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class PeakMemory:
    """What one measurement saw; ``kind`` says which figure ``bytes`` is."""

    bytes: int
    kind: str
    reserved_bytes: int | None = None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak window; returns False where the OS keeps only a lifetime peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def read_peak(device: torch.device) -> PeakMemory:
    """The peak since the last reset: CUDA allocated (and reserved), or peak RSS of the process."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device), "cuda_max_allocated",
                          torch.cuda.max_memory_reserved(device))
    hwm = _vm_hwm()
    if hwm is not None:
        return PeakMemory(hwm, "cpu_peak_rss")
    scale = 1 if sys.platform == "darwin" else 1024
    return PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                      "cpu_peak_rss_lifetime")


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take on ``device``: CUDA's free bytes, or the machine's
    available memory (``MemAvailable``) for the CPU; None where it cannot be read (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


StorageKey = tuple[str, int]


@dataclass(frozen=True)
class TrainMemory:
    """The bytes one training step holds, by kind; ``total_bytes`` is their sum."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", self.params_bytes + self.grads_bytes
                           + self.optimizer_bytes + self.activations_bytes)

    def as_dict(self) -> dict[str, int]:
        """The five summary fields of docs/metrics.md, under their names there."""
        return {"memory_params_bytes": self.params_bytes,
                "memory_grads_bytes": self.grads_bytes,
                "memory_optimizer_bytes": self.optimizer_bytes,
                "memory_activations_bytes": self.activations_bytes,
                "train_memory_bytes": self.total_bytes}


def _storages(tensor: torch.Tensor) -> list[tuple[StorageKey, torch.UntypedStorage]]:
    """The storages a tensor lives in (two for a sparse COO tensor: indices and values)."""
    if tensor.is_sparse:
        return _storages(tensor._indices()) + _storages(tensor._values())
    storage = tensor.untyped_storage()
    return [((str(tensor.device), storage.data_ptr()), storage)]


class _Ledger:
    """A byte count that adds each storage once; ``seen`` may be shared between ledgers."""

    def __init__(self, seen: set[StorageKey]) -> None:
        self.seen = seen
        self.bytes = 0

    def add(self, tensors: Iterable[torch.Tensor]) -> _Ledger:
        for tensor in tensors:
            for key, storage in _storages(tensor):
                if key not in self.seen:
                    self.seen.add(key)
                    self.bytes += storage.nbytes()
        return self


class _SavedTensors:
    """A pack hook that notes each storage saved for backward, except the ``excluded`` ones.

    It holds the storages until ``release`` (the end of the forward), so that the address of
    one freed meanwhile cannot be reused by a later saved tensor and be taken for a duplicate.
    """

    def __init__(self, excluded: set[StorageKey]) -> None:
        self.excluded = excluded
        self.held: dict[StorageKey, torch.UntypedStorage] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for key, storage in _storages(tensor):
            if key not in self.excluded:
                self.held.setdefault(key, storage)
        return tensor

    def release(self) -> int:
        total = sum(storage.nbytes() for storage in self.held.values())
        self.held.clear()
        return total


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _state_tensors(value: object) -> Iterator[torch.Tensor]:
    """Every tensor in an optimiser state value, looking inside lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _state_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _state_tensors(item)


class StepMeter:
    """Accounts a training step as it runs: the forward inside ``saving()``, then ``result``.

    The training loop meters its first step this way, and ``training_step_memory`` any step.
    """

    def __init__(self, model: nn.Module) -> None:
        self._seen: set[StorageKey] = set()
        self._params = _Ledger(self._seen).add(model.parameters())
        self._excluded = self._seen | _Ledger(set()).add(model.buffers()).seen
        self._activations: list[int] = []

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Note the tensors autograd saves in this block (the forward and the loss)."""
        saved = _SavedTensors(self._excluded)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
            yield
        self._activations.append(saved.release())

    def result(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainMemory:
        """The account after ``optimizer.step``: gradients and optimiser state as they are now."""
        grads = _Ledger(self._seen).add(p.grad for p in model.parameters()
                                        if p.requires_grad and p.grad is not None)
        state = _Ledger(self._seen).add(t for value in optimizer.state.values()
                                        for t in _state_tensors(value))
        return TrainMemory(self._params.bytes, grads.bytes, state.bytes,
                           max(self._activations, default=0))


def training_step_memory(model: nn.Module,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         penalty: Callable[[], torch.Tensor | float] | None = None
                         ) -> TrainMemory:
    """Run ONE real training step on (x, y) and account the bytes it holds (module docstring).

    The step is the training loop's: ``optimizer.step(closure)``, the closure zeroing the
    gradients, computing ``loss_fn(model(x), y)`` plus ``penalty()`` where given (e.g.
    ``model.penalty``) and calling backward, so LBFGS works too. It updates the model and the
    optimiser state like any step: call it on a dry run or on a copy. The mode (train/eval)
    and the devices are the caller's.
    """
    meter = StepMeter(model)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with meter.saving():
            loss = loss_fn(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
        loss.backward()
        return loss

    optimizer.step(closure)
    return meter.result(model, optimizer)
