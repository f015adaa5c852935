"""The ``ncsweep_slurm`` and ``ncsweep_local`` Hydra launchers (conf/launcher/*.yaml pick them).

Hydra accepts launchers only from the ``hydra_plugins`` package and imports every module in it
at start-up, so this module stays small: the work lives in :mod:`ncsweep.launcher`, imported
only when a sweep launches.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules,
# where dataclasses cannot resolve string annotations.

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

PACKAGE = "hydra_plugins.ncsweep_launcher.ncsweep_launcher"


@dataclass
class NcsweepLocalConf(LocalQueueConf):
    """submitit subprocesses on this machine, watched until they end."""

    _target_: str = f"{PACKAGE}.NcsweepLocalLauncher"
    leave_running_on_interrupt: bool = False
    poll_s: float = 10.0
    log_every_s: float = 60.0


@dataclass
class NcsweepSlurmConf(SlurmQueueConf):
    """A SLURM job array; ``auto`` resources are read from the partition before submitting."""

    _target_: str = f"{PACKAGE}.NcsweepSlurmLauncher"
    cpus_per_task: Any = "auto"
    gpus_per_node: Any = "auto"
    mem_gb: Any = "auto"
    detach: bool = False
    leave_running_on_interrupt: bool = False
    poll_s: float = 10.0
    log_every_s: float = 60.0


class _Watched:
    """Shared by both launchers: launch through ncsweep, resolved resources applied in the job."""

    resolved: dict[str, Any] | None = None

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from ncsweep.launcher import launch

        return launch(self, job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        from ncsweep.launcher import run_in_job

        return run_in_job(self, sweep_overrides, job_dir_key, job_num, singleton_state)


class NcsweepLocalLauncher(_Watched, LocalLauncher):
    """``launcher=local``."""


class NcsweepSlurmLauncher(_Watched, SlurmLauncher):
    """``launcher=slurm``."""


ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_local",
                             node=NcsweepLocalConf(), provider="ncsweep")
ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_slurm",
                             node=NcsweepSlurmConf(), provider="ncsweep")
