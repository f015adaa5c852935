"""The members' networks stacked on a leading dimension, and their batched training loop."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ncsweep.ensemble.members import Member

log = logging.getLogger(__name__)


class Stacked(nn.Module):
    """R networks of one architecture as stacked tensors (member first) and a batched forward.

    Parameters and buffers keep the members' names (``backbone.layers.1.weight``); trainable
    ones are leaves with gradients, the rest (a frozen ETF, BN statistics) plain tensors.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        first = models[0]
        self.members = len(models)
        self.tensors: dict[str, torch.Tensor] = {}
        self.trainable: list[torch.Tensor] = []
        for name, p in first.named_parameters():
            stacked = nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach()
                                                for m in models]), requires_grad=p.requires_grad)
            self.register_parameter(name.replace(".", "__"), stacked)
            self.tensors[name] = stacked
            if p.requires_grad:
                self.trainable.append(stacked)
        for name, _ in first.named_buffers():
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models]).clone()
            self.register_buffer(name.replace(".", "__"), stacked)
            self.tensors[name] = stacked
        self.is_ufm = hasattr(first.backbone, "lambdas")
        # plain tuples, not submodules: the stack must not own member 0's tensors
        self.layers = () if self.is_ufm else tuple(first.backbone.layers)
        self.lambdas = first.backbone.lambdas if self.is_ufm else (0.0, 0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, B, ...) inputs (UFM: (R, B) sample indices) to (R, B, K) logits."""
        return self._linear("head", self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_ufm:
            h = self.tensors["backbone.features"]
            return torch.gather(h, 1, x[..., None].expand(-1, -1, h.shape[-1]))
        x = x.flatten(2)
        for i, module in enumerate(self.layers):
            prefix = f"backbone.layers.{i}"
            if isinstance(module, nn.Flatten):
                continue
            if isinstance(module, nn.Linear):
                x = self._linear(prefix, x)
            elif isinstance(module, nn.BatchNorm1d):
                x = self._batch_norm(prefix, module, x)
            else:
                x = module(x)
        return x

    def _linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors[f"{prefix}.weight"], self.tensors.get(f"{prefix}.bias")
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))

    def _batch_norm(self, prefix: str, module: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d per member as one BN over R x F channels: torch's own kernel, which in
        training moves each member's running statistics on that member's batch."""
        members, batch, width = x.shape
        tracked = self.tensors[f"{prefix}.num_batches_tracked"]
        momentum = module.momentum
        if self.training:
            tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(tracked[0])
        flat = x.transpose(0, 1).reshape(batch, members * width)
        weight, bias = (self.tensors.get(f"{prefix}.{k}") for k in ("weight", "bias"))
        y = F.batch_norm(flat, self.tensors[f"{prefix}.running_mean"].view(-1),
                         self.tensors[f"{prefix}.running_var"].view(-1),
                         None if weight is None else weight.view(-1),
                         None if bias is None else bias.view(-1),
                         training=self.training, momentum=momentum or 0.0, eps=module.eps)
        return y.view(batch, members, width).transpose(0, 1)

    def penalty(self) -> torch.Tensor | float:
        """Each member's extra regularisation (the UFM's lambdas), shape (R,); 0 for the MLP."""
        if not self.is_ufm:
            return 0.0
        lambda_w, lambda_h, lambda_b = self.lambdas
        value = 0.5 * lambda_h * self.tensors["backbone.features"].pow(2).sum(dim=(1, 2))
        value = value + 0.5 * lambda_w * self.tensors["head.weight"].pow(2).sum(dim=(1, 2))
        bias = self.tensors.get("head.bias")
        if bias is not None and lambda_b:
            value = value + 0.5 * lambda_b * bias.pow(2).sum(dim=1)
        return value

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy each member's slice into its own network (for eval points and checkpoints)."""
        for r, model in enumerate(models):
            for name, t in (*model.named_parameters(), *model.named_buffers()):
                t.copy_(self.tensors[name][r])

    @torch.no_grad()
    def read_from(self, models: Sequence[nn.Module]) -> None:
        """The members' networks into the stack (after they loaded a checkpoint)."""
        for r, model in enumerate(models):
            for name, t in (*model.named_parameters(), *model.named_buffers()):
                self.tensors[name][r].copy_(t)


def member_losses(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's mean training loss on its own batch (the scale of ncsweep.losses), (R,)."""
    if name == "ce":  # classes on dim 1: torch's kernel then runs along the batch, 2-3x faster
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)
    minus_one = torch.full((*labels.shape, 1), -1.0, dtype=logits.dtype, device=logits.device)
    residual = logits.scatter_add(2, labels[..., None], minus_one)
    return 0.5 * residual.pow(2).sum(dim=2).mean(dim=1)


def member_optimizer_state(state: dict, params: Sequence[torch.Tensor], r: int) -> dict:
    """Member r's slice of the stacked optimiser's state dict, in the solo run's format."""
    sliced = {}
    for index, entries in state["state"].items():
        shape = params[index].shape
        sliced[index] = {k: (v[r].clone() if isinstance(v, torch.Tensor) and v.shape == shape
                             else v.clone() if isinstance(v, torch.Tensor) else v)
                         for k, v in entries.items()}
    return {"state": sliced, "param_groups": copy.deepcopy(state["param_groups"])}


def stacked_optimizer_state(states: Sequence[dict], params: Sequence[torch.Tensor]) -> dict:
    """The members' solo-format optimiser states as one state dict of the stacked optimiser."""
    merged = {}
    for index, entries in states[0]["state"].items():
        shape = params[int(index)].shape[1:]
        merged[index] = {k: (torch.stack([s["state"][index][k] for s in states])
                             if isinstance(v, torch.Tensor) and v.shape == shape else v)
                         for k, v in entries.items()}
    return {"state": merged, "param_groups": copy.deepcopy(states[0]["param_groups"])}


class EnsembleFit:
    """Trainer.fit for R members at once: the same epochs, batches, eval points, checkpoints."""

    def __init__(self, members: list[Member], started: float) -> None:
        from hydra.utils import instantiate

        self.members = members
        self.runs = [m.run for m in members]
        first = self.runs[0]
        self.trainer = first.trainer
        self.models = [run.model for run in self.runs]
        self.stacked = Stacked(self.models)
        self.loss_name = first.loss.name
        members[0].activate()
        self.optimizer = instantiate(members[0].cfg.optim)(self.stacked.trainable)
        self.scheduler = instantiate(members[0].cfg.schedule)(
            self.optimizer, epochs=members[0].plain["trainer"]["epochs"])
        self.started = started

    def _active(self) -> list[int]:
        return [r for r, m in enumerate(self.members) if m.status is None]

    def _restore(self, generators: list[torch.Generator]) -> tuple[int, int, int]:
        states = [m.state for m in self.members]
        for model, state, generator in zip(self.models, states, generators, strict=True):
            model.load_state_dict(state["model"])
            generator.set_state(state["data_rng"])
        self.stacked.read_from(self.models)
        self.optimizer.load_state_dict(stacked_optimizer_state(
            [s["optimizer"] for s in states], self.stacked.trainable))
        self.scheduler.load_state_dict(states[0]["scheduler"])
        torch.set_rng_state(states[0]["torch_rng"])
        if "cuda_rng" in states[0] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states[0]["cuda_rng"])
        return int(states[0]["epoch"]), int(states[0]["step"]), int(states[0]["batch"])

    def _checkpoint(self, rngs: list[torch.Tensor], epoch: int, step: int, batch: int,
                    train_time: Callable[[int], float]) -> None:
        self.stacked.write_back(self.models)
        optimizer = self.optimizer.state_dict()
        for r in self._active():
            m = self.members[r]
            state = {"epoch": epoch, "batch": batch, "step": step,
                     "model": self.models[r].state_dict(),
                     "optimizer": member_optimizer_state(optimizer, self.stacked.trainable, r),
                     "scheduler": self.scheduler.state_dict(), "data_rng": rngs[r],
                     "torch_rng": torch.get_rng_state(), "train_time_s": train_time(r),
                     "attempts": m.attempts,
                     "wall_time_s": m.earlier_wall + time.perf_counter() - self.started}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            m.context.folder.save_checkpoint(state, m.context.key)

    def _eval(self, epoch: int, step: int, finals: list[dict]) -> None:
        self.stacked.write_back(self.models)
        for r in self._active():
            m = self.members[r]

            def on_eval(row: dict, m: Member = m) -> None:
                m.context.folder.append_metrics(row)
                m.mirror.log(row, step=int(row["epoch"]))

            finals[r] = self.trainer._eval_point(self.models[r], m.run.loss, m.run.data, epoch,
                                                 step, self.optimizer, on_eval)

    def _check_finite(self, mean_loss: torch.Tensor, epoch: int) -> None:
        """A member whose loss became NaN/inf fails alone (trainer.on_nonfinite=fail)."""
        from ncsweep.jobs import _fail
        from ncsweep.training import NonFiniteLoss

        if self.trainer.on_nonfinite != "fail":
            return
        values = mean_loss.tolist()
        for r in self._active():
            if not math.isfinite(values[r]):
                m = self.members[r]
                err = NonFiniteLoss(f"training loss became {values[r]} in epoch {epoch} "
                                    "(trainer.on_nonfinite=fail); lower the LR or check the data")
                m.mirror.finish(exit_code=1)
                m.status = _fail(m.context, err, f"{m.context.key} FAILED: NonFiniteLoss: {err}")

    def fit(self, stop_requested: Callable[[], bool]) -> list[Any]:
        """Train every member from scratch or from its checkpoint; one FitResult each."""
        from ncsweep.data import member_batches
        from ncsweep.memory import StepMeter, TrainMemory, read_peak, reset_peak
        from ncsweep.training import FitResult, StopRequested

        trainer, count_r = self.trainer, len(self.members)
        generators = [torch.Generator().manual_seed(m.plain["seed"]) for m in self.members]
        start_epoch, step, skip = 0, 0, 0
        if self.members[0].state is not None:
            start_epoch, step, skip = self._restore(generators)
        earlier = [float(m.state.get("train_time_s", 0.0)) if m.state else 0.0
                   for m in self.members]
        reset_peak(trainer.device)
        started = time.perf_counter()

        def train_time(r: int) -> float:
            return earlier[r] + time.perf_counter() - started

        finals: list[dict] = [{} for _ in self.members]
        if start_epoch == 0 and skip == 0:
            self._eval(0, step, finals)
        train_memory: TrainMemory | None = None
        samples = 0
        data = self.runs[0].data
        self.stacked.train()
        for epoch in range(start_epoch + 1, trainer.epochs + 1):
            rngs = [g.get_state() for g in generators]
            loss_sum = torch.zeros(count_r, device=trainer.device)
            count = 0
            stream = member_batches(data.train, trainer.batch_size, generators, augment=True)
            for index, (x, y) in enumerate(stream):
                if index < skip:
                    continue
                if stop_requested():
                    self._checkpoint(rngs, epoch - 1, step, index, train_time)
                    raise StopRequested(f"stopped in epoch {epoch} after {index} batches")
                meter = StepMeter(self.stacked) if train_memory is None else None
                loss_sum += self._step(x, y, meter)
                if meter is not None:
                    whole = meter.result(self.stacked, self.optimizer)
                    train_memory = TrainMemory(*(b // count_r for b in (
                        whole.params_bytes, whole.grads_bytes, whole.optimizer_bytes,
                        whole.activations_bytes)))
                count += 1
                step += 1
                samples += y.shape[1]
            skip = 0
            self.scheduler.step()
            mean_loss = loss_sum / max(count, 1)
            self._check_finite(mean_loss, epoch)
            if not self._active():
                break
            trainer._live.update(f"epoch {epoch:>4}/{trainer.epochs}  loss "
                                 f"{mean_loss.mean().item():.4g} (mean of {count_r} members)")
            if epoch % trainer.eval_every == 0 or epoch == trainer.epochs:
                self._eval(epoch, step, finals)
            if epoch % trainer.checkpoint_every == 0 or epoch == trainer.epochs:
                self._checkpoint([g.get_state() for g in generators], epoch, step, 0, train_time)
        elapsed = time.perf_counter() - started
        if any(not finals[r] for r in self._active()):
            self._eval(trainer.epochs, step, finals)
        peak = read_peak(trainer.device)
        return [FitResult(finals[r], trainer.epochs - start_epoch, elapsed, earlier[r], samples,
                          peak, train_memory) for r in range(count_r)]

    def _step(self, x: torch.Tensor, y: torch.Tensor, meter: Any) -> torch.Tensor:
        """One optimiser step of every member; their losses, (R,)."""
        self.optimizer.zero_grad(set_to_none=True)
        with meter.saving() if meter is not None else nullcontext():
            losses = member_losses(self.loss_name, self.stacked(x), y) + self.stacked.penalty()
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()
