"""The ``ncsweep_basic``, ``ncsweep_local`` and ``ncsweep_slurm`` Hydra launchers (conf/launcher/).

Hydra accepts launchers only from the ``hydra_plugins`` package and imports every module in it
at start-up, so this module stays small: the work lives in :mod:`ncsweep.launcher`, imported
only when a sweep launches.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules,
# where dataclasses cannot resolve string annotations.

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher, BasicLauncherConf
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

PACKAGE = "hydra_plugins.ncsweep_launcher.ncsweep_launcher"


@dataclass
class NcsweepBasicConf(BasicLauncherConf):
    """Jobs one after another in this process; seeds trained together under trainer.ensemble."""

    _target_: str = f"{PACKAGE}.NcsweepBasicLauncher"


@dataclass
class NcsweepLocalConf(LocalQueueConf):
    """submitit subprocesses on this machine, watched until they end."""

    _target_: str = f"{PACKAGE}.NcsweepLocalLauncher"
    runs_per_task: int = 1
    runs_in_parallel: int = 1
    rank_timeout_s: float = 600.0
    leave_running_on_interrupt: bool = False
    poll_s: float = 10.0
    log_every_s: float = 60.0


@dataclass
class NcsweepSlurmConf(SlurmQueueConf):
    """A SLURM job array; ``auto`` resources are read from the partition before submitting."""

    _target_: str = f"{PACKAGE}.NcsweepSlurmLauncher"
    runs_per_task: int = 1
    runs_in_parallel: int = 1
    rank_timeout_s: float = 600.0
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

    def __call__(self, units: list, job_dir_key: str, singleton_state: dict[type, Singleton],
                 launched: float) -> list[JobReturn]:
        """One submitit task: its runs (ncsweep.launcher.Unit lists), one JobReturn per run."""
        from ncsweep.launcher import run_in_job

        return run_in_job(self, units, job_dir_key, singleton_state, launched)


class NcsweepBasicLauncher(BasicLauncher):
    """``launcher=basic``: Hydra's basic launcher, with seeds grouped under trainer.ensemble."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from ncsweep.launcher import launch_basic

        return launch_basic(self, job_overrides, initial_job_idx)


class NcsweepLocalLauncher(_Watched, LocalLauncher):
    """``launcher=local``."""


class NcsweepSlurmLauncher(_Watched, SlurmLauncher):
    """``launcher=slurm``."""


ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_basic",
                             node=NcsweepBasicConf(), provider="ncsweep")
ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_local",
                             node=NcsweepLocalConf(), provider="ncsweep")
ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_slurm",
                             node=NcsweepSlurmConf(), provider="ncsweep")
