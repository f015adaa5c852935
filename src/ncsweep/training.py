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

from ncsweep import distributed
from ncsweep.console import Progress
from ncsweep.data import DataBundle, Split, batches
from ncsweep.errors import ConfigError
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
F64 = torch.float64
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
    """Train/test loss and accuracy, the NC metrics of the train features, and ``nc4_test``.

    Under label noise or random labels (``Split.clean_labels`` set), from the same passes:
    every NC key against the clean labels (suffix ``_clean``, ``nc4_test_clean`` included),
    ``train_acc_clean`` (argmax of W h + b against the clean labels) and ``memorization`` (of
    the train samples whose label differs from the clean one, the share predicted as that
    noisy label; left out when no label differs). The clean-label NC state is a second
    accumulator, and the two share ``max_feature_bytes``. With minority classes
    (``DataBundle.minority_classes``, set by an imbalance): ``minority_collapse`` (the mean
    cosine over the pairs k < l of minority rows w_k, w_l of W; left out with fewer than two
    minority classes), ``test_acc_class_<k>`` for every class k with test samples and
    ``test_acc_minority``, ``test_acc_majority`` (accuracy over the test samples of those
    classes).
    """
    was_training = model.training
    model.eval()
    distributed.broadcast_buffers(model)
    train = _shard(data.train)
    budget = max_feature_bytes // 2 if train.clean_labels is not None else max_feature_bytes
    accumulator = NCAccumulator(data.num_classes, max_feature_bytes=budget)
    clean = NCAccumulator(data.num_classes, max_feature_bytes=budget) \
        if train.clean_labels is not None else None
    row = _split_metrics(model, loss_fn, train, eval_batch_size, "train", accumulator,
                         clean=clean)
    for acc in (accumulator, clean):
        if acc is not None:
            acc.all_reduce()
    weight, bias = model.head.weight, model.head.bias
    pending = [(acc, labels) for acc, labels in ((accumulator, train.labels),
                                                 (clean, train.clean_labels))
               if acc is not None and acc.needs_second_pass]
    if pending:
        start = 0
        for x, y in batches(train, eval_batch_size):
            features = model.backbone(x)
            for acc, labels in pending:
                acc.update_predictions(features, labels[start:start + y.numel()], weight, bias)
            start += y.numel()
    row.update(accumulator.compute(weight, bias))
    if clean is not None:
        row.update({f"{key}_clean": value for key, value in clean.compute(weight, bias).items()})
    minority = data.minority_classes
    if data.test is not None:
        heldout = [HeldOutNC4(acc, weight, bias) for acc in (accumulator, clean)
                   if acc is not None]
        row.update(_split_metrics(model, loss_fn, _shard(data.test), eval_batch_size, "test",
                                  heldout=heldout, minority=minority))
        row["nc4_test"] = heldout[0].compute()
        if clean is not None:
            row["nc4_test_clean"] = heldout[1].compute()
    if minority is not None and len(minority) >= 2:
        row["minority_collapse"] = minority_collapse(weight, minority)
    model.train(was_training)
    return row


def _shard(split: Split) -> Split:
    """This rank's contiguous share of a split for an eval pass (the whole split on one rank)."""
    return split.part(distributed.shard(len(split))) if distributed.is_distributed() else split


def minority_collapse(weight: torch.Tensor, minority: Sequence[int]) -> float:
    """Mean pairwise cosine of the minority classes' classifier rows (1: collapsed, Fang et al.)."""
    rows = weight.detach()[torch.as_tensor(list(minority), device=weight.device)].double()
    unit = rows / rows.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    pairs = torch.triu_indices(len(minority), len(minority), offset=1, device=weight.device)
    return cosines[pairs[0], pairs[1]].mean().item()


def _split_metrics(model: nn.Module, loss_fn: nn.Module, split: Split, eval_batch_size: int,
                   prefix: str, accumulator: NCAccumulator | None = None,
                   heldout: Sequence[HeldOutNC4] = (), clean: NCAccumulator | None = None,
                   minority: Sequence[int] | None = None) -> Row:
    """Loss and accuracy of one split; the clean-label and per-class tallies where asked.

    On several ranks each passes its shard and the tallies are summed over the ranks.
    """
    device = split.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    noisy = split.clean_labels is not None
    tally = torch.zeros(3, dtype=torch.long, device=device)  # clean-correct, flipped, memorised
    k = model.head.weight.shape[0]
    per_class = torch.zeros((2, k), dtype=torch.long, device=device)  # correct, count
    start = 0
    for x, y in batches(split, eval_batch_size):
        features, logits = model.features_and_logits(x)
        predicted = logits.argmax(dim=1)
        if accumulator is not None:
            accumulator.update(features, y)
        for held in heldout:
            held.update(features)
        loss_sum += loss_fn(logits, y).double() * y.numel()
        hit = predicted == y
        correct += hit.sum()
        if noisy:
            true = split.clean_labels[start:start + y.numel()]
            if clean is not None:
                clean.update(features, true)
            flipped = y != true
            tally += torch.stack([(predicted == true).sum(), flipped.sum(),
                                  (flipped & hit).sum()])
        if minority is not None:
            per_class[0] += torch.bincount(y[hit], minlength=k)
            per_class[1] += torch.bincount(y, minlength=k)
        start += y.numel()
    sums = distributed.all_reduce_sum(torch.cat([
        torch.stack([loss_sum, correct.double(), torch.tensor(float(len(split)), dtype=F64,
                                                               device=device)]),
        tally.double(), per_class.double().flatten()]))
    loss_total, correct_total, count = sums[:3].tolist()
    tally = sums[3:6].long()
    per_class = sums[6:].long().view(2, k)
    n = int(count)
    row = {f"{prefix}_loss": loss_total / n, f"{prefix}_acc": correct_total / n}
    if noisy:
        clean_correct, flipped, memorised = tally.tolist()
        row[f"{prefix}_acc_clean"] = clean_correct / n
        if flipped:
            row["memorization"] = memorised / flipped
    if minority is not None:
        row.update(_class_accuracies(prefix, per_class.tolist(), minority))
    return row


def _class_accuracies(prefix: str, per_class: list[list[int]], minority: Sequence[int]) -> Row:
    """``<prefix>_acc_class_<k>`` per class with samples, and over minority and majority."""
    correct, count = per_class
    pairs = enumerate(zip(correct, count, strict=True))
    row = {f"{prefix}_acc_class_{k}": c / n for k, (c, n) in pairs if n}
    groups = {"minority": set(minority), "majority": set(range(len(count))) - set(minority)}
    for name, classes in groups.items():
        total = sum(count[k] for k in classes)
        if total:
            row[f"{prefix}_acc_{name}"] = sum(correct[k] for k in classes) / total
    return row


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
    """Trains a ``Network`` on a ``DataBundle``; keys mirror ``conf/trainer``."""

    def __init__(self, epochs: int = 100, batch_size: int | None = 128,
                 eval_batch_size: int = 4096, device: str = "auto", eval_every: int = 10,
                 checkpoint_every: int | None = None, deterministic: bool = False,
                 dry_run: bool = False, resume: str = "auto", progress: bool = True,
                 on_nonfinite: str = "fail", max_feature_bytes: int = 512 * 2**20,
                 cpu_threads: int | None = None, ensemble: bool = False,
                 sync_batchnorm: bool = False) -> None:
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.device = distributed.rank_device(resolve_device(device))
        self.sync_batchnorm = _check_sync_batchnorm(sync_batchnorm, self.device)
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every or eval_every
        self.deterministic, self.dry_run, self.resume = deterministic, dry_run, resume
        self.progress, self.on_nonfinite = progress, on_nonfinite
        self.max_feature_bytes = max_feature_bytes
        self.ensemble = ensemble  # the launchers group the seeds; a lone run trains alone
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
        """Train from scratch or from ``resume_state``; every eval row goes to ``on_eval``.

        The backbone's ``fit_starts`` hook (the UFM's batched random starts) may take the loop
        over: a result from it is returned as is, None lets the loop below run.
        """
        result = model.backbone.fit_starts(self, model, loss_fn, optimizer, scheduler, data,
                                           seed, on_eval, on_checkpoint, stop_requested,
                                           resume_state)
        if result is not None:
            return result
        generator = torch.Generator().manual_seed(seed)
        start_epoch, step, skip = 0, 0, 0
        if resume_state is not None:
            start_epoch, step, skip = self._restore(resume_state, model, optimizer, scheduler,
                                                    generator)
        n = len(data.train)
        size = min(self.batch_size or n, n)
        trained = self._parallel(model, n, size)
        earlier = float(resume_state.get("train_time_s", 0.0)) if resume_state else 0.0
        reset_peak(self.device)
        started, samples = time.perf_counter(), 0

        def state(data_rng: torch.Tensor, epoch: int, batch: int) -> dict:
            return {**self._state(model, optimizer, scheduler, data_rng, epoch, step, batch),
                    "train_time_s": earlier + time.perf_counter() - started,
                    "global_batch_size": self.batch_size,
                    "world_size": distributed.world_size()}

        train_memory: TrainMemory | None = None
        final: Row = {}
        if start_epoch == 0 and skip == 0:
            final = self._eval_point(model, loss_fn, data, 0, step, optimizer, on_eval)
        model.train()
        for epoch in range(start_epoch + 1, self.epochs + 1):
            epoch_rng = generator.get_state()
            loss_sum = torch.zeros((), device=self.device)
            count = 0
            train_batches = batches(data.train, self.batch_size, generator, augment=True,
                                    sharded=trained is not model)
            for index, (x, y) in enumerate(train_batches):
                if index < skip:
                    continue
                if distributed.any_rank(stop_requested()):
                    on_checkpoint(state(epoch_rng, epoch - 1, index))
                    raise StopRequested(f"stopped in epoch {epoch} after {index} batches")
                meter = StepMeter(model) if train_memory is None else None
                batch = min(size, n - index * size)
                loss_sum += self._step(model, loss_fn, optimizer, x, y, meter, trained,
                                       batch).detach()
                if meter is not None:
                    train_memory = meter.result(model, optimizer)
                count += 1
                step += 1
                samples += batch
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

    def _parallel(self, model: nn.Module, n: int, size: int) -> nn.Module:
        """The module the steps call: the model itself, or on several ranks its DDP wrapper."""
        if not distributed.is_distributed():
            return model
        world = distributed.world_size()
        last = n % size
        if size < world or 0 < last < world:
            raise ConfigError("trainer.batch_size", self.batch_size,
                              f"a global batch that gives each of the {world} ranks a sample in "
                              f"every step ({n} train samples: the last batch has {last or size})")
        if self.sync_batchnorm:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _step(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
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
        saved = state.get("global_batch_size", self.batch_size)
        if saved != self.batch_size:
            raise ConfigError("trainer.batch_size", self.batch_size,
                              f"{saved}, the global batch of the checkpoint being resumed (it "
                              f"ran on {state.get('world_size', 1)} rank(s); any number of "
                              "ranks resumes it at that global batch)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["epoch"]), int(state["step"]), int(state["batch"])
