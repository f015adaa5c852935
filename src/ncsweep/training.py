"""The training loop: optimiser steps, LR schedule, eval points with NC metrics, checkpoints.

It knows nothing of files, W&B or launchers: eval rows and checkpoint states leave through
callbacks, and a stop request (a preemption signal) comes in through one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ncsweep.console import Progress
from ncsweep.data import DataBundle, Split, batches
from ncsweep.memory import (
    PeakMemory,
    StepMeter,
    TrainMemory,
    read_peak,
    reset_peak,
    training_step_memory,
)
from ncsweep.nc import HeldOutNC4, NCAccumulator

Row = dict[str, float]
log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class StopRequested(Exception):
    """Training stopped early on request (preemption); a checkpoint was saved first."""


class LBFGS(torch.optim.LBFGS):
    """LBFGS with L2 weight decay folded into the closure (torch's LBFGS has none)."""

    def __init__(self, params, lr: float = 1.0, weight_decay: float = 0.0, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.weight_decay = weight_decay

    def step(self, closure):  # type: ignore[override]
        if not self.weight_decay:
            return super().step(closure)
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]

        def decayed():
            loss = closure()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=self.weight_decay)
                return loss + 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in params)

        return super().step(decayed)


def multistep_schedule(optimizer: torch.optim.Optimizer, epochs: int,
                       milestones: Sequence[float] = (1 / 3, 2 / 3), gamma: float = 0.1):
    """LR times ``gamma`` at each milestone: an epoch number, or a fraction of the epochs if < 1."""
    at = sorted({round(m * epochs) if m < 1 else int(m) for m in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=at, gamma=gamma)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, eta_min: float = 0.0):
    """Cosine decay over the whole run."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1),
                                                      eta_min=eta_min)


def constant_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """No schedule: the LR stays where the optimiser put it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


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


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: DataBundle, eval_batch_size: int,
             max_feature_bytes: int) -> Row:
    """Train/test loss and accuracy, the NC metrics of the train features, and ``nc4_test``."""
    was_training = model.training
    model.eval()
    accumulator = NCAccumulator(data.num_classes, max_feature_bytes=max_feature_bytes)
    row = _split_metrics(model, loss_fn, data.train, eval_batch_size, "train", accumulator)
    weight, bias = model.head.weight, model.head.bias
    if accumulator.needs_second_pass:
        for x, y in batches(data.train, eval_batch_size):
            accumulator.update_predictions(model.backbone(x), y, weight, bias)
    row.update(accumulator.compute(weight, bias))
    if data.test is not None:
        heldout = HeldOutNC4(accumulator, weight, bias)
        row.update(_split_metrics(model, loss_fn, data.test, eval_batch_size, "test",
                                  heldout=heldout))
        row["nc4_test"] = heldout.compute()
    model.train(was_training)
    return row


def _split_metrics(model: nn.Module, loss_fn: nn.Module, split: Split, eval_batch_size: int,
                   prefix: str, accumulator: NCAccumulator | None = None,
                   heldout: HeldOutNC4 | None = None) -> Row:
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    correct = torch.zeros((), dtype=torch.long, device=split.labels.device)
    for x, y in batches(split, eval_batch_size):
        features, logits = model.features_and_logits(x)
        if accumulator is not None:
            accumulator.update(features, y)
        if heldout is not None:
            heldout.update(features)
        loss_sum += loss_fn(logits, y).double() * y.numel()
        correct += (logits.argmax(dim=1) == y).sum()
    n = len(split)
    return {f"{prefix}_loss": loss_sum.item() / n, f"{prefix}_acc": correct.item() / n}


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
    """Trains a ``Network`` on a ``DataBundle``; keys mirror ``conf/trainer``."""

    def __init__(self, epochs: int = 100, batch_size: int | None = 128,
                 eval_batch_size: int = 4096, device: str = "auto", eval_every: int = 10,
                 checkpoint_every: int | None = None, deterministic: bool = False,
                 dry_run: bool = False, resume: str = "auto", progress: bool = True,
                 on_nonfinite: str = "fail", max_feature_bytes: int = 512 * 2**20,
                 cpu_threads: int | None = None) -> None:
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.device = resolve_device(device)
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every or eval_every
        self.deterministic, self.dry_run, self.resume = deterministic, dry_run, resume
        self.progress, self.on_nonfinite = progress, on_nonfinite
        self.max_feature_bytes = max_feature_bytes
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

    def fit(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler, data: DataBundle, seed: int,
            on_eval: Callable[[Row], None] = lambda row: None,
            on_checkpoint: Callable[[dict], None] = lambda state: None,
            stop_requested: Callable[[], bool] = lambda: False,
            resume_state: dict | None = None) -> FitResult:
        """Train from scratch or from ``resume_state``; every eval row goes to ``on_eval``."""
        generator = torch.Generator().manual_seed(seed)
        start_epoch, step, skip = 0, 0, 0
        if resume_state is not None:
            start_epoch, step, skip = self._restore(resume_state, model, optimizer, scheduler,
                                                    generator)
        earlier = float(resume_state.get("train_time_s", 0.0)) if resume_state else 0.0
        reset_peak(self.device)
        started, samples = time.perf_counter(), 0

        def state(data_rng: torch.Tensor, epoch: int, batch: int) -> dict:
            return {**self._state(model, optimizer, scheduler, data_rng, epoch, step, batch),
                    "train_time_s": earlier + time.perf_counter() - started}

        train_memory: TrainMemory | None = None
        final: Row = {}
        if start_epoch == 0 and skip == 0:
            final = self._eval_point(model, loss_fn, data, 0, step, optimizer, on_eval)
        model.train()
        for epoch in range(start_epoch + 1, self.epochs + 1):
            epoch_rng = generator.get_state()
            loss_sum = torch.zeros((), device=self.device)
            count = 0
            train_batches = batches(data.train, self.batch_size, generator, augment=True)
            for index, (x, y) in enumerate(train_batches):
                if index < skip:
                    continue
                if stop_requested():
                    on_checkpoint(state(epoch_rng, epoch - 1, index))
                    raise StopRequested(f"stopped in epoch {epoch} after {index} batches")
                meter = StepMeter(model) if train_memory is None else None
                loss_sum += self._step(model, loss_fn, optimizer, x, y, meter).detach()
                if meter is not None:
                    train_memory = meter.result(model, optimizer)
                count += 1
                step += 1
                samples += y.numel()
            skip = 0
            scheduler.step()
            self._end_epoch(loss_sum.item() / max(count, 1), epoch)
            if epoch % self.eval_every == 0 or epoch == self.epochs:
                final = self._eval_point(model, loss_fn, data, epoch, step, optimizer, on_eval)
            if epoch % self.checkpoint_every == 0 or epoch == self.epochs:
                on_checkpoint(state(generator.get_state(), epoch, 0))
        elapsed = time.perf_counter() - started
        if not final:
            final = self._eval_point(model, loss_fn, data, self.epochs, step, optimizer, on_eval)
        return FitResult(final, self.epochs - start_epoch, elapsed, earlier, samples,
                         read_peak(self.device), train_memory)

    def _step(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
              x: torch.Tensor, y: torch.Tensor, meter: StepMeter | None = None) -> torch.Tensor:
        """One optimiser step; ``meter`` notes what the forward saves for backward."""
        first_loss: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with meter.saving() if meter is not None else nullcontext():
                loss = loss_fn(model(x), y) + model.penalty()
            loss.backward()
            if not first_loss:
                first_loss.append(loss.detach())
            return loss

        optimizer.step(closure)
        return first_loss[0]

    def _end_epoch(self, mean_loss: float, epoch: int) -> None:
        """One sync per epoch: stop on a non-finite loss, update the terminal's progress line."""
        if self.on_nonfinite == "fail" and not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"training loss became {mean_loss} in epoch {epoch} "
                                "(trainer.on_nonfinite=fail); lower the LR or check the data")
        self._live.update(f"epoch {epoch:>4}/{self.epochs}  loss {mean_loss:.4g}")

    def _eval_point(self, model: nn.Module, loss_fn: nn.Module, data: DataBundle, epoch: int,
                    step: int, optimizer: torch.optim.Optimizer,
                    on_eval: Callable[[Row], None]) -> Row:
        row: Row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
        row.update(evaluate(model, loss_fn, data, self.eval_batch_size, self.max_feature_bytes))
        row.update(model.backbone.eval_metrics(model.head, loss_fn))
        on_eval(row)
        if self.progress:
            self._live.clear()
            log.info("%s", self._progress_line(row))
        return row

    def _progress_line(self, row: Row) -> str:
        parts = [f"epoch {row['epoch']:>4}/{self.epochs}", f"train_loss {row['train_loss']:.4g}",
                 f"train_acc {100 * row['train_acc']:.2f}%"]
        if "test_acc" in row:
            parts.append(f"test_acc {100 * row['test_acc']:.2f}%")
        parts += [f"{k} {row[k]:.3g}" for k in ("nc1", "nc2_m", "nc3", "nc4", "objective_gap")
                  if k in row]
        return "  ".join(parts)

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               data_rng: torch.Tensor, epoch: int, step: int, batch: int) -> dict:
        """Everything needed to continue bitwise: ``epoch`` done, then ``batch`` batches more."""
        state = {
            "epoch": epoch, "batch": batch, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data_rng": data_rng, "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, generator: torch.Generator) -> tuple[int, int, int]:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["epoch"]), int(state["step"]), int(state["batch"])
