"""The stepper of the UFM's batched random starts (``arch.starts=R``): one step of the
batched solver per epoch, the run's optimiser settings and schedule driving it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ncsweep.data import DataBundle
from ncsweep.memory import TrainMemory
from ncsweep.training.checkpoint import base_state, position
from ncsweep.training.evaluation import Measure

_SCHEDULER_ORDER = re.escape("Detected call of `lr_scheduler.step()` before")


class StartsStepper:
    """R starts of a UFM solved as one batched problem; start 0 is what the eval rows measure.

    LBFGS takes up to max_iter iterations per epoch, gradient descent one; the optimiser's lr
    after the schedule's step is the solvers' lr. The checkpoint holds the solvers' state, so
    a resumed run continues every start where it stopped.
    """

    members = 1

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, data: DataBundle, seed: int, batch_size: int | None,
                 measure: Measure) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, \
            scheduler
        self.data, self.batch_size, self.measure = data, batch_size, measure
        self.backbone = model.backbone
        self.solver = self.backbone.start_solver(model.head, loss_fn, optimizer, seed)
        self.samples = self.backbone.starts * self.backbone.labels.numel()

    def restore(self, states: Sequence[dict]) -> tuple[int, int, int]:
        """The model, the schedule and every start's solver state."""
        [state] = states
        self.model.load_state_dict(state["model"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.solver.load_state_dict(state["solver"])
        epoch = position(state)[0]
        return epoch, epoch, 0

    def start(self) -> None:
        self.backbone.sync(self.model.head)

    def batches(self) -> Iterator[None]:
        """One solver step per epoch, on the whole problem."""
        yield None

    def step(self, batch: None) -> int:
        self.solver.set_lr(self.optimizer.param_groups[0]["lr"])
        self.solver.step()
        return self.samples

    def end_epoch(self) -> torch.Tensor:
        """Step the schedule; the starts' mean objective, shape (1,)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _SCHEDULER_ORDER)
            self.scheduler.step()
        return self.solver.value.mean().reshape(1)

    def evaluate(self, epoch: int, step: int, members: Sequence[int]) -> dict[int, dict]:
        self.backbone.sync(self.model.head)
        return {0: self.measure(self.model, self.loss_fn, self.data, epoch, step,
                                self.optimizer.param_groups[0]["lr"])}

    def states(self, epoch: int, step: int, batch: int, members: Sequence[int],
               stopping: bool) -> dict[int, dict]:
        return {0: {**base_state(epoch, step, batch, self.model, self.optimizer.state_dict(),
                                 self.scheduler, self.batch_size),
                    "solver": self.solver.state_dict()}}

    @property
    def train_memory(self) -> TrainMemory:
        return self.backbone.starts_memory()
