"""Seeds trained as one batched model: a sweep's jobs that differ only in ``seed``.

``trainer.ensemble=true`` makes the launchers hand such jobs over together. Each member is
built exactly as its solo run (``build_run`` after its own seed), so it starts from the solo
run's weights; its batches come from its own ``torch.Generator().manual_seed(seed)``, drawn
as ``Trainer.fit`` draws them. The members' tensors are then stacked on a leading member
dimension and trained by batched matmuls (``torch.baddbmm``) with one elementwise optimiser
over the stacked tensors, which is each member's own optimiser state side by side. Batch norm
keeps per-member running statistics, updated from each member's own batch.

Supported: ``arch=mlp`` (``arch.freeze=none``) and ``arch=ufm`` (single start), either head,
``loss=ce|mse``, ``optim=sgd|adam`` (AdamW too). Eval points, checkpoints, summaries and W&B
runs are each member's own, in the solo format: a member's checkpoint resumes as a solo run
and back. Members whose checkpoints stand at different points, or whose data differ, are
trained one after another instead.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from ncsweep.errors import ConfigError
from ncsweep.tracking import CheckpointError, NoMirror, WandbMirror, write_atomic

log = logging.getLogger(__name__)
OPTIMIZERS = {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.AdamW": "adamw"}
ARCHS = {"ncsweep.models.MLP": "mlp", "ncsweep.models.UFMFeatures": "ufm"}
HEADS = ("ncsweep.heads.LearnedHead", "ncsweep.heads.ETFHead")
LOSSES = ("ncsweep.losses.CrossEntropy", "ncsweep.losses.HalfSquaredError")
WITH = "with trainer.ensemble=true"


def check_supported(plain: dict) -> None:
    """Refuse in one line what cannot train as a batched ensemble."""
    optim = plain["optim"].get("_target_", "")
    if optim not in OPTIMIZERS:
        name = optim.rsplit(".", 1)[-1].lower()
        raise ConfigError("optim", name, f"sgd, adam or adamw {WITH} (elementwise optimisers; "
                          "a line search couples a member's steps)")
    arch = plain["arch"]
    if arch.get("_target_") not in ARCHS:
        name = arch.get("_target_", "").rsplit(".", 1)[-1].lower()
        raise ConfigError("arch", name, f"mlp or ufm {WITH} (convolutional backbones have no "
                          "batched kernels here)")
    if arch.get("freeze", "none") != "none":
        raise ConfigError("arch.freeze", arch["freeze"], f"none {WITH}")
    if arch.get("compile"):
        raise ConfigError("arch.compile", arch["compile"], f"false {WITH}")
    if arch.get("starts") is not None:
        raise ConfigError("arch.starts", arch["starts"], f"null {WITH} (batched starts are "
                          "one batched run already)")
    if plain["head"].get("_target_") not in HEADS:
        raise ConfigError("head", plain["head"].get("_target_"), f"learned or etf {WITH}")
    if plain["loss"].get("_target_") not in LOSSES:
        raise ConfigError("loss", plain["loss"].get("_target_"), f"ce or mse {WITH}")


@dataclass
class Member:
    """One admitted job of a group: its config, context and the Hydra runtime it ran under."""

    cfg: DictConfig
    plain: dict
    context: Any
    identity: dict
    hydra: DictConfig
    run: Any = None
    mirror: Any = None
    state: dict | None = None
    summary: dict = field(default_factory=dict)
    attempts: int = 1
    earlier_wall: float = 0.0
    status: dict | None = None

    def activate(self) -> None:
        """Make this member's Hydra runtime the current one (``${hydra:...}``, JobContext)."""
        HydraConfig.instance().cfg = self.hydra


def prepare(cfg: DictConfig) -> Member | dict:
    """A Hydra task that only admits the job: the member to train later, or its status dict."""
    from ncsweep.jobs import admit

    admitted = admit(cfg)
    if isinstance(admitted, dict):
        return admitted
    context, identity, plain = admitted
    return Member(cfg, plain, context, identity, copy.deepcopy(HydraConfig.instance().cfg))


def run_group(members: Sequence[Member]) -> list[dict]:
    """Train the admitted members of one group together; a status dict for each, in order."""
    if len(members) < 2 or members[0].plain["trainer"]["dry_run"]:
        return [_solo(m) for m in members]
    if any(m.plain["dataset"] != members[0].plain["dataset"] for m in members):
        log.info("ensemble of %d: the members' data differ (a seeded data set); training them "
                 "one after another", len(members))
        return [_solo(m) for m in members]
    for m in members:
        if m.plain["trainer"]["resume"] != "never":
            try:
                m.state = m.context.folder.load_checkpoint(m.context.key)
            except CheckpointError:
                return [_solo(m) for m in members]
    points = {None if m.state is None else (int(m.state["epoch"]), int(m.state["batch"]),
                                            int(m.state["step"])) for m in members}
    if len(points) > 1:
        log.info("ensemble of %d: the members' checkpoints stand at different points; training "
                 "them one after another", len(members))
        return [_solo(m) for m in members]
    return _train(list(members))


def _solo(member: Member) -> dict:
    from ncsweep.jobs import run_job

    member.activate()
    return run_job(member.cfg)


def _train(members: list[Member]) -> list[dict]:
    """Build every member as its solo run, train them stacked, finish each folder."""
    from ncsweep.jobs import USER_ERRORS, StopFlag, _fail, _root_cause
    from ncsweep.training import StopRequested

    started = time.perf_counter()
    for m in members:
        m.activate()
        m.context.folder.write_run(m.identity)
    stop = StopFlag()
    stop.install()
    try:
        _build(members)
        log.info("ensemble: %d seeds (%s) as one batched model", len(members),
                 ", ".join(str(m.plain["seed"]) for m in members))
        results = EnsembleFit(members, started).fit(stop)
    except StopRequested:
        for m in members:
            if m.status is None:
                m.mirror.finish(exit_code=1)
                m.context.folder.record_attempt("interrupted")
        stop.hand_over()
    except Exception as err:
        err = _root_cause(err)
        for m in members:
            if m.status is None:
                if m.mirror is not None:
                    m.mirror.finish(exit_code=1)
                line = (f"error: {err}" if isinstance(err, USER_ERRORS) else
                        f"{m.context.key} FAILED: {type(err).__name__}: {err} (traceback in "
                        f"{m.context.folder.file('FAILED')})")
                m.status = _fail(m.context, err, line)
        return [m.status for m in members]
    finally:
        stop.restore()
    for m, result in zip(members, results, strict=True):
        if m.status is None:
            m.status = _finish(m, result, started)
    return [m.status for m in members]


def build_members(configs: Sequence[tuple[DictConfig, dict]],
                  before: Callable[[int], None] = lambda index: None) -> list[Any]:
    """Each member's parts exactly as its solo run builds them (``build_run`` after its seed),
    the data read once and shared; ``before(i)`` runs ahead of member i's build."""
    from ncsweep.build import build_run

    runs = []
    for index, (cfg, plain) in enumerate(configs):
        before(index)
        runs.append(build_run(cfg, plain, read_data=index == 0))
    for run in runs[1:]:
        run.data = runs[0].data
    return runs


def _build(members: list[Member]) -> None:
    """Each member's folder, parts (exactly its solo run's, data read once) and W&B run."""
    for m in members:
        if m.plain["trainer"]["resume"] == "never":
            m.context.folder.reset()
        else:
            m.context.folder.prepare()
    runs = build_members([(m.cfg, m.plain) for m in members],
                         lambda index: members[index].activate())
    for m, run in zip(members, runs, strict=True):
        folder = m.context.folder
        m.run = run
        trainer_cfg = m.plain["trainer"]
        m.summary = {**m.identity, "epochs": trainer_cfg["epochs"],
                     "batch_size": trainer_cfg["batch_size"], "ensemble": len(members)}
        m.summary.pop("created")
        folder.write_config(m.plain)
        folder.keep_metrics([r for r in folder.read_metrics()
                             if m.state is not None and r["epoch"] <= m.state["epoch"]])
        if m.state is not None:
            m.earlier_wall = float(m.state.get("wall_time_s", 0.0))
            m.attempts = int(m.state.get("attempts", 1)) + 1
    for m in members:
        m.summary.update(m.run.describe())
        m.mirror = _concurrent(m.run.logger)
        m.mirror.start(m.context.folder.path, m.context.wandb_id, m.context.key, m.context.name,
                       m.plain, quiet=not m.plain["trainer"]["progress"])


def _finish(m: Member, result: Any, started: float) -> dict:
    """Write one member's summary, run files and DONE exactly as a solo run does."""
    from ncsweep.jobs import _memory_fields, _times

    folder = m.context.folder
    summary = m.summary
    summary.update(status="done", resumed_from_epoch=m.state["epoch"] if m.state else None,
                   **result.final, **_memory_fields(result.peak_memory, result.train_memory),
                   **_times(time.perf_counter() - started, m.earlier_wall, result, m.attempts),
                   time_per_epoch_s=result.train_time_s / max(result.epochs_run, 1),
                   samples_per_s=result.samples_seen / max(result.train_time_s, 1e-9))
    summary.update(m.run.final_checks(result.final))
    for name, text in getattr(m.run.model.backbone, "run_files", dict)().items():
        write_atomic(folder.file(name), text)
    folder.write_summary(summary)
    m.mirror.finish(summary)
    folder.mark_done()
    folder.record_attempt("done")
    log.info("%s: done (ensemble member); results in %s", m.context.key, folder.path)
    return {"status": "done", "dir": str(folder.path)}


class ConcurrentMirror(WandbMirror):
    """A W&B mirror whose run lives beside the other members' runs in this process."""

    def _init(self, wandb: Any, mode: str, run_dir: Path, run_id: str, name: str, group: str,
              config: Any, settings: dict) -> Any:
        from ncsweep.tracking import _jsonable

        return wandb.init(
            project=self.project, entity=self.entity, mode=mode, tags=self.tags,
            dir=str(run_dir), id=run_id, name=name, group=group, resume="allow",
            config=_jsonable(config), reinit="create_new", settings=wandb.Settings(**settings))


def _concurrent(mirror: WandbMirror) -> WandbMirror:
    if isinstance(mirror, NoMirror) or type(mirror) is not WandbMirror:
        return mirror
    return ConcurrentMirror(mirror.project, mirror.entity, mirror.mode, mirror.tags)


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
    if name == "ce":
        per_sample = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return per_sample.view(labels.shape).mean(dim=1)
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
        from ncsweep.data import batches
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
            streams = [batches(data.train, trainer.batch_size, g, augment=True)
                       for g in generators]
            for index, pairs in enumerate(zip(*streams, strict=True)):
                if index < skip:
                    continue
                if stop_requested():
                    self._checkpoint(rngs, epoch - 1, step, index, train_time)
                    raise StopRequested(f"stopped in epoch {epoch} after {index} batches")
                x = torch.stack([p[0] for p in pairs])
                y = torch.stack([p[1] for p in pairs])
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
