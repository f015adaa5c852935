"""The one checkpoint layout every training mode writes, and the checks on resuming one.

A checkpoint (``RunFolder.save_checkpoint`` adds ``format`` and ``run_key``) holds where the
run stands (``epoch`` done, then ``batch`` batches more; ``step`` optimiser steps), the
``model``, ``optimizer`` and ``scheduler`` state, the RNG states (``torch_rng``, ``cuda_rng``
where CUDA is present), ``global_batch_size`` and ``world_size``, ``train_time_s`` (the loop
adds it), ``attempts`` and ``wall_time_s`` (the job adds them), and what a mode needs beyond
that: ``data_rng`` (the batch order's generator) or ``solver`` (the batched starts' state).
A stacked-ensemble member's checkpoint is a solo run's, so it resumes either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ncsweep import distributed
from ncsweep.errors import ConfigError


def base_state(epoch: int, step: int, batch: int, model: nn.Module, optimizer: dict,
               scheduler: Any, batch_size: int | None) -> dict:
    """What every mode's checkpoint holds: position, model, optimiser, schedule, RNG, batch."""
    state = {"epoch": epoch, "batch": batch, "step": step, "model": model.state_dict(),
             "optimizer": optimizer, "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "global_batch_size": batch_size,
             "world_size": distributed.world_size()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def position(state: dict) -> tuple[int, int, int]:
    """(epoch done, step, batches done in the next epoch) of a checkpoint."""
    return int(state["epoch"]), int(state["step"]), int(state["batch"])


def restore_rng(state: dict) -> None:
    """The torch (and CUDA) RNG states of a checkpoint."""
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def check_global_batch(state: dict, batch_size: int | None) -> None:
    """A checkpoint resumes at the global batch it was written with, on any number of ranks."""
    saved = state.get("global_batch_size", batch_size)
    if saved != batch_size:
        raise ConfigError("trainer.batch_size", batch_size,
                          f"{saved}, the global batch of the checkpoint being resumed (it "
                          f"ran on {state.get('world_size', 1)} rank(s); any number of "
                          "ranks resumes it at that global batch)")
