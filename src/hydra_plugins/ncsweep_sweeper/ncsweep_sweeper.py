"""The ``ncsweep`` Hydra sweeper (conf/config.yaml): Hydra's basic sweeper, whose check that
every job composes derives value-only siblings (``ncsweep.launcher.compose``).

Hydra imports every module of ``hydra_plugins`` at start-up, so this one stays small.
"""

# No `from __future__ import annotations`: Hydra execs this module outside sys.modules,
# where dataclasses cannot resolve string annotations.

from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from ncsweep.launcher.hydra_compat import BasicSweeper, BasicSweeperConf


@dataclass
class NcsweepSweeperConf(BasicSweeperConf):
    """Hydra's basic sweeper (``params``, ``max_batch_size``), its job checks derived."""

    _target_: str = "hydra_plugins.ncsweep_sweeper.ncsweep_sweeper.NcsweepSweeper"


class NcsweepSweeper(BasicSweeper):
    """``hydra/sweeper=ncsweep``: every job checked as Hydra checks it, siblings derived."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from ncsweep.launcher.compose import composer

        check = composer(self.hydra_context.config_loader, self.config).check
        for overrides in batch:
            check(overrides)


ConfigStore.instance().store(group="hydra/sweeper", name="ncsweep", node=NcsweepSweeperConf(),
                             provider="ncsweep")
