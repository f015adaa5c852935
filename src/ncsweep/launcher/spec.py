"""The launcher's two contracts: what a Hydra launcher hands ncsweep, what each task carries.

Both are frozen: the launcher reads nothing else from Hydra's plugin object, and a task reads
nothing but its spec on the node (the preflight's resource choices included), so what runs there
is fixed when the sweep is submitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.singleton import Singleton
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

KINDS = ("basic", "local", "slurm")


@dataclass(frozen=True)
class Sweep:
    """One batch of a sweep as Hydra's launcher receives it: its setup and ``hydra.launcher``."""

    kind: str
    hydra_context: HydraContext
    task_function: TaskFunction
    config: DictConfig
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"launcher kind {self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """What every task of a submitted sweep runs with on its node; pickled once per task.

    ``resources`` (the preflight's choices, e.g. ``auto`` resolved) are written into each job's
    ``hydra.launcher``; ``cpus_per_task`` is what a task may use, shared among its lanes.
    """

    hydra_context: HydraContext
    task_function: TaskFunction
    config: DictConfig
    launched: float
    singleton_state: dict[type, Singleton] = field(default_factory=dict)
    resources: Mapping[str, Any] = field(default_factory=dict)
    cpus_per_task: int | None = None
    runs_in_parallel: int = 1
    rank_timeout_s: float = 600.0
    job_dir_key: str = "hydra.sweep.dir"
