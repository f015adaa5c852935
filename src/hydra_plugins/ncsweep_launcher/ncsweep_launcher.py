"""The ``ncsweep_basic``, ``ncsweep_local`` and ``ncsweep_slurm`` Hydra launchers (conf/launcher/).

Hydra accepts launchers only from the ``hydra_plugins`` package and imports every module in it
at start-up, so this module stays small: the work lives in :mod:`ncsweep.launcher`, imported
only when a sweep launches (its light ``hydra_compat`` aside, the one home of Hydra's private
names).
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules,
# where dataclasses cannot resolve string annotations.

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from ncsweep.launcher.hydra_compat import BasicLauncher, BasicLauncherConf

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
    """Shared by both submitit launchers: the sweep handed to ncsweep as a typed spec."""

    kind = "abstract"

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from ncsweep.launcher.spec import Sweep
        from ncsweep.launcher.submit import launch

        sweep = Sweep(self.kind, self.hydra_context, self.task_function, self.config,
                      dict(self.params))
        return launch(sweep, job_overrides, initial_job_idx)


class NcsweepBasicLauncher(BasicLauncher):
    """``launcher=basic``: Hydra's basic launcher, with seeds grouped under trainer.ensemble."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from ncsweep.launcher.spec import Sweep
        from ncsweep.launcher.tasks import launch_basic

        sweep = Sweep("basic", self.hydra_context, self.task_function, self.config)
        return launch_basic(sweep, job_overrides, initial_job_idx)


class NcsweepLocalLauncher(_Watched, LocalLauncher):
    """``launcher=local``."""

    kind = "local"


class NcsweepSlurmLauncher(_Watched, SlurmLauncher):
    """``launcher=slurm``."""

    kind = "slurm"


ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_basic",
                             node=NcsweepBasicConf(), provider="ncsweep")
ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_local",
                             node=NcsweepLocalConf(), provider="ncsweep")
ConfigStore.instance().store(group="hydra/launcher", name="ncsweep_slurm",
                             node=NcsweepSlurmConf(), provider="ncsweep")
