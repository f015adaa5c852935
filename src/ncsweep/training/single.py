"""The stepper of one model, on one process or as the ranks of a DDP run: an epoch of
mini-batches drawn from the seed's generator, one optimiser step each."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ncsweep import distributed
from ncsweep.data import DataBundle, batches
from ncsweep.errors import ConfigError
from ncsweep.memory import StepMeter, TrainMemory
from ncsweep.training.checkpoint import base_state, check_global_batch, position, restore_rng
from ncsweep.training.evaluation import Measure


def optimizer_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                   x: torch.Tensor, y: torch.Tensor, meter: StepMeter | None = None,
                   trained: nn.Module | None = None, batch: int | None = None) -> torch.Tensor:
    """One optimiser step; ``meter`` notes what the forward saves for backward.

    On several ranks ``trained`` (DDP) averages the gradients, so each rank's mean loss is
    weighted by its share of the ``batch`` samples of the global batch: the step is the
    one-process step. The closure returns the global objective (line searches see it).
    """
    first_loss: list[torch.Tensor] = []
    net = trained if trained is not None else model
    parallel = net is not model
    scale = y.numel() * distributed.world_size() / batch if parallel and batch else 1.0

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with meter.saving() if meter is not None else nullcontext():
            data_loss = loss_fn(net(x), y)
            loss = (data_loss * scale if parallel else data_loss) + model.penalty()
        loss.backward()
        if parallel:
            loss = distributed.all_reduce_sum(loss.detach().clone()) / distributed.world_size()
        if not first_loss:
            first_loss.append(loss.detach())
        return loss

    optimizer.step(closure)
    return first_loss[0]


class ModelStepper:
    """One network trained by its optimiser on shuffled mini-batches (DDP on several ranks)."""

    members = 1

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, data: DataBundle, seed: int, batch_size: int | None,
                 device: torch.device, sync_batchnorm: bool, measure: Measure) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, \
            scheduler
        self.data, self.batch_size, self.device = data, batch_size, device
        self.sync_batchnorm, self.measure = sync_batchnorm, measure
        self.generator = torch.Generator().manual_seed(seed)
        self.n = len(data.train)
        self.size = min(batch_size or self.n, self.n)
        self.trained: nn.Module = model
        self.train_memory: TrainMemory | None = None
        self._epoch_rng: torch.Tensor | None = None
        self._loss = torch.zeros((), device=device)
        self._count = 0

    def restore(self, states: Sequence[dict]) -> tuple[int, int, int]:
        """Model, optimiser, schedule, batch order and RNG from the run's checkpoint."""
        [state] = states
        check_global_batch(state, self.batch_size)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["data_rng"])
        restore_rng(state)
        return position(state)

    def start(self) -> None:
        """Wrap the model for DDP on several ranks (the steps then call the wrapper)."""
        self.trained = self._parallel()

    def _parallel(self) -> nn.Module:
        if not distributed.is_distributed():
            return self.model
        world = distributed.world_size()
        last = self.n % self.size
        if self.size < world or 0 < last < world:
            raise ConfigError("trainer.batch_size", self.batch_size,
                              f"a global batch that gives each of the {world} ranks a sample in "
                              f"every step ({self.n} train samples: the last batch has "
                              f"{last or self.size})")
        if self.sync_batchnorm:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """One epoch's batches (this rank's share of each) with the global batch's size."""
        self.model.train()
        self._epoch_rng = self.generator.get_state()
        stream = batches(self.data.train, self.batch_size, self.generator, augment=True,
                         sharded=self.trained is not self.model)
        for index, (x, y) in enumerate(stream):
            yield x, y, min(self.size, self.n - index * self.size)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor, int]) -> int:
        """One optimiser step on the batch; the samples it saw (over every rank)."""
        x, y, count = batch
        meter = StepMeter(self.model) if self.train_memory is None else None
        self._loss += optimizer_step(self.model, self.loss_fn, self.optimizer, x, y, meter,
                                     self.trained, count).detach()
        if meter is not None:
            self.train_memory = meter.result(self.model, self.optimizer)
        self._count += 1
        return count

    def end_epoch(self) -> torch.Tensor:
        """Step the schedule; the epoch's mean training loss, shape (1,)."""
        self.scheduler.step()
        mean = (self._loss.double() / max(self._count, 1)).reshape(1)
        self._loss = torch.zeros((), device=self.device)
        self._count = 0
        return mean

    def evaluate(self, epoch: int, step: int, members: Sequence[int]) -> dict[int, dict]:
        return {0: self.measure(self.model, self.loss_fn, self.data, epoch, step,
                                self.optimizer.param_groups[0]["lr"])}

    def states(self, epoch: int, step: int, batch: int, members: Sequence[int],
               stopping: bool) -> dict[int, dict]:
        """The checkpoint; a stop mid-epoch resumes from the epoch's batch order."""
        rng = self._epoch_rng if stopping else self.generator.get_state()
        return {0: {**base_state(epoch, step, batch, self.model, self.optimizer.state_dict(),
                                 self.scheduler, self.batch_size), "data_rng": rng}}
