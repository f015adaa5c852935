"""Instantiate a run's parts from its config: data, network (backbone + head), loss, optimiser."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from ncsweep.data import DataBundle
from ncsweep.diskspace import human_bytes
from ncsweep.errors import ConfigError
from ncsweep.memory import free_bytes
from ncsweep.models import Network
from ncsweep.tracking import WandbMirror
from ncsweep.training import Trainer, count_parameters

JOB_FLAGS = ("dry_run", "resume", "ensemble")  # conf/trainer keys the job reads, not the Trainer
log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a job trains and measures."""

    data: DataBundle | None
    model: Network
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainer: Trainer
    logger: WandbMirror

    def describe(self) -> dict:
        """Static facts for the summary: parameter counts, device, data info."""
        total, trainable = count_parameters(self.model)
        info = dict(self.data.info) if self.data is not None else {}
        return {"params_total": total, "params_trainable": trainable,
                "device": str(self.trainer.device), **info,
                **self.model.backbone.transfer_record}

    def final_checks(self, final: dict) -> dict:
        """Model-specific end-of-run checks (the UFM's landscape probe); empty otherwise."""
        return self.model.backbone.final_checks(self.model.head, self.loss, final)


def build_run(plain: Mapping, read_data: bool = True) -> Run:
    """Build from the resolved config (``validate``'s), in a fixed order after seeding, so that
    a seed fixes every initial weight; nothing is read from Hydra's runtime."""
    settings = {k: v for k, v in plain["trainer"].items() if k not in JOB_FLAGS}
    trainer: Trainer = instantiate(settings, layers=plain.get("nc", {}).get("layers"))
    check_fits(plain, trainer.device)
    trainer.seed_everything(plain["seed"])
    data = instantiate(plain["dataset"]).to(trainer.device) if read_data else None
    backbone, head = _parts(plain)
    dtype = getattr(backbone, "dtype", torch.float32)
    model = Network(backbone, head).to(device=trainer.device, dtype=dtype)
    trainer.blocks(model)  # a name in nc.layers that is not a block is refused before training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(plain["optim"])(params)
    scheduler = instantiate(plain["schedule"])(optimizer, epochs=plain["trainer"]["epochs"])
    return Run(data, model, instantiate(plain["loss"]), optimizer, scheduler, trainer,
               instantiate(plain["logger"]))


def _parts(plain: Mapping) -> tuple[nn.Module, nn.Module]:
    """The backbone and head the config names, at its feature dimension."""
    dim = plain["feature_dim"]
    backbone = instantiate(plain["arch"], input_shape=tuple(plain["dataset"]["input_shape"]),
                           feature_dim=dim)
    head = instantiate(plain["head"], num_classes=plain["dataset"]["num_classes"],
                       feature_dim=dim)
    return backbone, head


def check_fits(plain: Mapping, device: torch.device) -> None:
    """Refuse a model whose parameters alone exceed the device's free memory, sized on the meta
    device first so that nothing is allocated (the bytes a dry run reports as
    ``memory_params_bytes``)."""
    free = free_bytes(device)
    if free is None:
        return
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            parts = _parts(plain)
    except (InstantiationException, RuntimeError, NotImplementedError) as err:
        log.info("the model was not sized before building (%s: %s)", type(err).__name__, err)
        return
    finally:
        torch.set_rng_state(rng)
    itemsize = getattr(parts[0], "dtype", torch.float32).itemsize
    size = sum(p.numel() for part in parts for p in part.parameters()) * itemsize
    if size > free:
        raise ConfigError("dim", plain["feature_dim"], (
            f"a model whose parameters fit in memory: arch={plain['arch']['_target_']} "
            f"holds {human_bytes(size)} of parameters alone at this dim, more than the "
            f"{human_bytes(free)} free on {device.type}"))
