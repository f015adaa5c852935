"""The stepper of a stacked ensemble: every member's batch, one batched step of them all."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from hydra.utils import instantiate

from ncsweep.data import member_batches
from ncsweep.ensemble.stacked import (
    Stacked,
    member_losses,
    member_optimizer_state,
    stacked_optimizer_state,
)
from ncsweep.memory import StepMeter, TrainMemory
from ncsweep.training.checkpoint import base_state, position, restore_rng
from ncsweep.training.evaluation import Measure


class StackedStepper:
    """R members of one architecture trained as one batched model, each on its own batches.

    Each member's batches come from its own ``torch.Generator().manual_seed(seed)``, drawn as
    a solo run draws them; the optimiser and schedule are the members' own (``plain``, the
    resolved config of member 0) over the stacked tensors. Eval rows and checkpoints are each
    member's own, in the solo format.
    """

    def __init__(self, runs: Sequence[Any], seeds: Sequence[int], plain: dict,
                 measure: Measure) -> None:
        self.runs, self.measure = list(runs), measure
        first = self.runs[0]
        self.trainer, self.data = first.trainer, first.data
        self.members = len(self.runs)
        self.models = [run.model for run in self.runs]
        self.stacked = Stacked(self.models)
        self.loss_name = first.loss.name
        self.optimizer = instantiate(plain["optim"])(self.stacked.trainable)
        self.scheduler = instantiate(plain["schedule"])(self.optimizer,
                                                        epochs=plain["trainer"]["epochs"])
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.train_memory: TrainMemory | None = None
        self._epoch_rngs: list[torch.Tensor] = []
        self._loss = torch.zeros(self.members, device=self.trainer.device)
        self._count = 0

    def restore(self, states: Sequence[dict]) -> tuple[int, int, int]:
        """Every member's network, batch order and optimiser state; the shared RNG and LR."""
        for model, state, generator in zip(self.models, states, self.generators, strict=True):
            model.load_state_dict(state["model"])
            generator.set_state(state["data_rng"])
        self.stacked.read_from(self.models)
        self.optimizer.load_state_dict(stacked_optimizer_state(
            [s["optimizer"] for s in states], self.stacked.trainable))
        self.scheduler.load_state_dict(states[0]["scheduler"])
        restore_rng(states[0])
        return position(states[0])

    def start(self) -> None:
        self.stacked.train()

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_rngs = [g.get_state() for g in self.generators]
        yield from member_batches(self.data.train, self.trainer.batch_size, self.generators,
                                  augment=True)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """One optimiser step of every member; the samples each saw."""
        x, y = batch
        meter = StepMeter(self.stacked) if self.train_memory is None else None
        self.optimizer.zero_grad(set_to_none=True)
        with meter.saving() if meter is not None else nullcontext():
            losses = member_losses(self.loss_name, self.stacked(x), y) + self.stacked.penalty()
        losses.sum().backward()
        self.optimizer.step()
        self._loss += losses.detach()
        if meter is not None:
            whole = meter.result(self.stacked, self.optimizer)
            self.train_memory = TrainMemory(*(b // self.members for b in (
                whole.params_bytes, whole.grads_bytes, whole.optimizer_bytes,
                whole.activations_bytes)))
        self._count += 1
        return y.shape[1]

    def end_epoch(self) -> torch.Tensor:
        self.scheduler.step()
        mean = self._loss / max(self._count, 1)
        self._loss = torch.zeros(self.members, device=self.trainer.device)
        self._count = 0
        return mean

    def evaluate(self, epoch: int, step: int, members: Sequence[int]) -> dict[int, dict]:
        self.stacked.write_back(self.models)
        lr = self.optimizer.param_groups[0]["lr"]
        return {r: self.measure(self.models[r], self.runs[r].loss, self.runs[r].data, epoch,
                                step, lr) for r in members}

    def states(self, epoch: int, step: int, batch: int, members: Sequence[int],
               stopping: bool) -> dict[int, dict]:
        """Each member's checkpoint in the solo format (its slice of the optimiser state)."""
        self.stacked.write_back(self.models)
        optimizer = self.optimizer.state_dict()
        rngs = self._epoch_rngs if stopping else [g.get_state() for g in self.generators]
        return {r: {**base_state(epoch, step, batch, self.models[r],
                                 member_optimizer_state(optimizer, self.stacked.trainable, r),
                                 self.scheduler, self.trainer.batch_size),
                    "data_rng": rngs[r]} for r in members}
