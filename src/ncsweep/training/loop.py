"""The training loop: cadence of eval points and checkpoints, stop requests, the final eval.

What differs between the modes (one model; stacked ensemble members; the UFM's batched
starts) is a *stepper*: its epoch of steps, its state and restore, and its eval. The loop
knows nothing of files, W&B or launchers: eval rows and checkpoint states leave through
callbacks, and a stop request (a preemption signal) comes in through one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ncsweep import distributed
from ncsweep.console import Progress
from ncsweep.data import DataBundle
from ncsweep.errors import ConfigError
from ncsweep.memory import PeakMemory, TrainMemory, read_peak, reset_peak, training_step_memory
from ncsweep.nc.blocks import Block, select_blocks
from ncsweep.training.evaluation import Row, evaluate
from ncsweep.training.single import ModelStepper
from ncsweep.training.starts import StartsStepper

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class StopRequested(Exception):
    """Training stopped early on request (preemption); a checkpoint was saved first."""


class Stepper(Protocol):
    """What one training mode supplies to the loop; ``members`` runs train side by side."""

    members: int

    def restore(self, states: Sequence[dict]) -> tuple[int, int, int]:
        """Load the members' checkpoints; (epoch done, step, batches done in the next)."""

    def start(self) -> None:
        """Ready to step (after any restore)."""

    def batches(self) -> Iterable[Any]:
        """One epoch's batches, each for :meth:`step`."""

    def step(self, batch: Any) -> int:
        """One step on the batch; the samples a member saw."""

    def end_epoch(self) -> torch.Tensor:
        """Step the schedule; each member's mean training loss of the epoch, shape (members,)."""

    def evaluate(self, epoch: int, step: int, members: Sequence[int]) -> dict[int, Row]:
        """An eval row for each member named."""

    def states(self, epoch: int, step: int, batch: int, members: Sequence[int],
               stopping: bool) -> dict[int, dict]:
        """A checkpoint for each member named (``stopping``: in the middle of an epoch)."""

    @property
    def train_memory(self) -> TrainMemory | None:
        """The account of one step's bytes (per member)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


def _check_sync_batchnorm(asked: bool, device: torch.device) -> bool:
    """SyncBatchNorm needs several ranks and CUDA tensors; asked where it cannot act, refuse."""
    if not asked:
        return False
    if device.type != "cuda":
        raise ConfigError("trainer.sync_batchnorm", asked, f"false on {device.type} ranks "
                          "(torch's SyncBatchNorm takes CUDA tensors only)")
    if not distributed.is_distributed():
        raise ConfigError("trainer.sync_batchnorm", asked, "false in a one-process run (it "
                          "syncs batch statistics across hydra.launcher.tasks_per_node > 1 ranks)")
    return True


@dataclass
class FitResult:
    """What a finished fit hands back for the summary."""

    final: Row
    epochs_run: int
    train_time_s: float
    earlier_train_time_s: float
    samples_seen: int
    peak_memory: PeakMemory
    train_memory: TrainMemory | None


class Trainer:
    """Trains a ``Network`` on a ``DataBundle``; keys mirror ``conf/trainer`` less the job's
    own flags (``dry_run``, ``resume``, ``ensemble``), which the job reads, plus ``layers``
    (``nc.layers``: the blocks measured at every eval point, ``ncsweep.nc.blocks``)."""

    def __init__(self, epochs: int = 100, batch_size: int | None = 128,
                 eval_batch_size: int = 4096, device: str = "auto", eval_every: int = 10,
                 checkpoint_every: int | None = None, deterministic: bool = False,
                 progress: bool = True, on_nonfinite: str = "fail",
                 max_feature_bytes: int = 512 * 2**20, cpu_threads: int | None = None,
                 sync_batchnorm: bool = False, layers: Any = None) -> None:
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.device = distributed.rank_device(resolve_device(device))
        self.sync_batchnorm = _check_sync_batchnorm(sync_batchnorm, self.device)
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every or eval_every
        self.deterministic = deterministic
        self.progress, self.on_nonfinite = progress, on_nonfinite
        self.max_feature_bytes = max_feature_bytes
        self.layers = layers
        self._live = Progress(progress)
        if cpu_threads:
            torch.set_num_threads(cpu_threads)

    def seed_everything(self, seed: int) -> None:
        """Seed torch (all devices) and switch on deterministic kernels when asked."""
        torch.manual_seed(seed)
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def dry_run_step(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                     num_classes: int, input_shape: Sequence[int]
                     ) -> tuple[PeakMemory, TrainMemory]:
        """One real step on a random batch of the data's shape: the device peak and the account."""
        batch = self.batch_size or 128
        reset_peak(self.device)
        x = model.example_input(batch, input_shape)
        y = torch.randint(num_classes, (x.shape[0],), device=self.device)
        account = training_step_memory(model, loss_fn, optimizer, x, y, penalty=model.penalty)
        return read_peak(self.device), account

    def measure(self, model: nn.Module, loss_fn: nn.Module, data: DataBundle, epoch: int,
                step: int, lr: float) -> Row:
        """One eval row: position, LR, the split and NC metrics, the backbone's own metrics."""
        row: Row = {"epoch": epoch, "step": step, "lr": lr}
        row.update(evaluate(model, loss_fn, data, self.eval_batch_size, self.max_feature_bytes,
                            self.blocks(model)))
        row.update(model.backbone.eval_metrics(model.head, loss_fn))
        return row

    def blocks(self, model: nn.Module) -> list[Block]:
        """The blocks ``layers`` names in this model; a name that is not one is a ConfigError."""
        return select_blocks(model, self.layers)

    def stepper(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, data: DataBundle, seed: int) -> Stepper:
        """The stepper of one network: its batched starts where it holds them, else its batches."""
        if model.backbone.starts is not None:
            return StartsStepper(model, loss_fn, optimizer, scheduler, data, seed,
                                 self.batch_size, self.measure)
        return ModelStepper(model, loss_fn, optimizer, scheduler, data, seed, self.batch_size,
                            self.device, self.sync_batchnorm, self.measure)

    def fit(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, data: DataBundle, seed: int,
            on_eval: Callable[[Row], None] = lambda row: None,
            on_checkpoint: Callable[[dict], None] = lambda state: None,
            stop_requested: Callable[[], bool] = lambda: False,
            resume_state: dict | None = None) -> FitResult:
        """Train one network from scratch or from ``resume_state``; eval rows go to ``on_eval``."""
        [result] = self.run(self.stepper(model, loss_fn, optimizer, scheduler, data, seed),
                            lambda r, row: on_eval(row), lambda r, state: on_checkpoint(state),
                            stop_requested, None if resume_state is None else [resume_state])
        return result

    def run(self, stepper: Stepper, on_eval: Callable[[int, Row], None],
            on_checkpoint: Callable[[int, dict], None],
            stop_requested: Callable[[], bool] = lambda: False,
            resume_states: Sequence[dict] | None = None,
            on_failure: Callable[[int, Exception], None] | None = None) -> list[FitResult]:
        """Train a stepper's members to ``epochs``; one FitResult each.

        Eval rows fall at epoch 0 (unless resuming), every ``eval_every`` epochs and at the
        end; checkpoints every ``checkpoint_every`` epochs and at the end. A stop request is
        checked before every step: the members are checkpointed where they stand and
        StopRequested is raised. A member whose loss turns non-finite goes to ``on_failure``
        and trains no further (with none given, NonFiniteLoss is raised).
        """
        start_epoch, step, skip = stepper.restore(resume_states) if resume_states else (0, 0, 0)
        stepper.start()
        earlier = ([float(s.get("train_time_s", 0.0)) for s in resume_states] if resume_states
                   else [0.0] * stepper.members)
        active = list(range(stepper.members))
        finals: dict[int, Row] = {}
        reset_peak(self.device)
        started, samples = time.perf_counter(), 0

        def checkpoint(epoch: int, batch: int, stopping: bool = False) -> None:
            elapsed = time.perf_counter() - started
            for r, state in stepper.states(epoch, step, batch, active, stopping).items():
                on_checkpoint(r, {**state, "train_time_s": earlier[r] + elapsed})

        def eval_point(epoch: int) -> None:
            for r, row in stepper.evaluate(epoch, step, active).items():
                finals[r] = row
                on_eval(r, row)
                self._log_row(row)

        if start_epoch == 0 and skip == 0:
            eval_point(0)
        for epoch in range(start_epoch + 1, self.epochs + 1):
            for index, batch in enumerate(stepper.batches()):
                if index < skip:
                    continue
                if distributed.any_rank(stop_requested()):
                    checkpoint(epoch - 1, index, stopping=True)
                    raise StopRequested(f"stopped in epoch {epoch} after {index} batches")
                samples += stepper.step(batch)
                step += 1
            skip = 0
            self._end_epoch(stepper.end_epoch(), epoch, active, on_failure)
            if not active:
                break
            if epoch % self.eval_every == 0 or epoch == self.epochs:
                eval_point(epoch)
            if epoch % self.checkpoint_every == 0 or epoch == self.epochs:
                checkpoint(epoch, 0)
        elapsed = time.perf_counter() - started
        if any(r not in finals for r in active):
            eval_point(self.epochs)
        peak = read_peak(self.device)
        return [FitResult(finals.get(r, {}), self.epochs - start_epoch, elapsed, earlier[r],
                          samples, peak, stepper.train_memory) for r in range(stepper.members)]

    def _end_epoch(self, losses: torch.Tensor, epoch: int, active: list[int],
                   on_failure: Callable[[int, Exception], None] | None) -> None:
        """One sync per epoch: a member whose loss is not finite fails, the progress line."""
        values = losses.tolist()
        if self.on_nonfinite == "fail":
            for r in [r for r in active if not math.isfinite(values[r])]:
                err = NonFiniteLoss(f"training loss became {values[r]} in epoch {epoch} "
                                    "(trainer.on_nonfinite=fail); lower the LR or check the data")
                if on_failure is None:
                    raise err
                on_failure(r, err)
                active.remove(r)
        if active:
            mean = sum(values) / len(values)
            note = f" (mean of {len(values)} members)" if len(values) > 1 else ""
            self._live.update(f"epoch {epoch:>4}/{self.epochs}  loss {mean:.4g}{note}")

    def _log_row(self, row: Row) -> None:
        if not self.progress:
            return
        self._live.clear()
        parts = [f"epoch {row['epoch']:>4}/{self.epochs}", f"train_loss {row['train_loss']:.4g}",
                 f"train_acc {100 * row['train_acc']:.2f}%"]
        if "test_acc" in row:
            parts.append(f"test_acc {100 * row['test_acc']:.2f}%")
        parts += [f"{k} {row[k]:.3g}" for k in ("nc1", "nc2_m", "nc3", "nc4", "objective_gap")
                  if k in row]
        log.info("%s", "  ".join(parts))
