"""Each job's config as Hydra composes it, derived from a sibling's where only values differ.

Hydra composes every job twice (the sweeper's check, then the launch), ~0.1 s each on this
project's config tree: most of what a sweep of short runs costs, and 30 min for 10,000 jobs.
Jobs whose overrides differ from an already composed job's only in plain value overrides
(``seed=3``, ``optim.lr=0.01``: a key that is no config group, no ``+``/``++``/``~``/``@``, not
under ``hydra``, a single non-container value) get a copy of that job's config with those values
set by Hydra's own call (``OmegaConf.update(..., merge=True)``), and the per-job fields Hydra
writes (``hydra.overrides.task``, ``hydra.job.override_dirname``, ``env_set`` from
``env_copy``, ``runtime.cwd``) written as Hydra writes them. Hydra composes everything else: a
job with a ``+`` or ``~`` on a key (Hydra checks those against values), a key reached through
an interpolated node (two keys may name one node), a search path change, and any job whose
values or fields do not set (Hydra then raises its own error); each such fallback is logged
once per cause, with the reason.

Two users: the sweeper's check before launching (every job of the sweep, in one process), and
each task on its node, which derives its later runs from its first (``runs_per_task`` > 1). On
the local SLURM cluster, 16 runs 8 a task: a derived config 16-26 ms against Hydra's 170-290 ms,
2.0-3.7 s of the sweep's in-task composition saved; a task of one run composes as Hydra does.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsweep.launcher.hydra_compat import caching_repository, overrides_dirname
from ncsweep.launcher.overrides import parse

log = logging.getLogger(__name__)

KEEP = 32  # composed templates kept per sweep (one per distinct choice of config groups)


@dataclass
class _Template:
    overrides: list[Override]
    config: DictConfig
    scratch: DictConfig | None = None  # a copy that checks set values on, never handed out


class SweepComposer:
    """``load_sweep_config`` of one sweep's master config, with value-only siblings derived."""

    def __init__(self, config_loader: Any, master: DictConfig) -> None:
        self.loader = config_loader
        self.master = master
        self.prefix = [str(o) for o in master.hydra.overrides.hydra]
        self._templates: OrderedDict[tuple, _Template] = OrderedDict()
        self._groups: dict[str, bool] = {}
        self._repo: Any = None
        self._said: set[str] = set()

    def load(self, sweep_overrides: Sequence[str]) -> DictConfig:
        """The job's config, equal to ``config_loader.load_sweep_config(master, overrides)``."""
        parsed, shape, template = self._find(sweep_overrides)
        if template is not None:
            config = copy.deepcopy(template.config)
            if self._set_values(config, template, parsed) and self._finish(config, parsed):
                return config
        return self._compose(sweep_overrides, parsed, shape)

    def check(self, sweep_overrides: Sequence[str]) -> None:
        """Raise what composing the job would raise (the sweeper's check before launching),
        setting a sibling's values on one scratch copy instead of composing."""
        parsed, shape, template = self._find(sweep_overrides)
        if template is not None:
            if template.scratch is None:
                template.scratch = copy.deepcopy(template.config)
            if (self._set_values(template.scratch, template, parsed)
                    and self._finish(template.scratch, parsed, write=False)):
                return
            template.scratch = None
        self._compose(sweep_overrides, parsed, shape)

    def _find(self, sweep_overrides: Sequence[str]) -> tuple[list[Override], tuple | None,
                                                              _Template | None]:
        parsed = parse([*self.prefix, *sweep_overrides])
        shape = self._shape(parsed)
        template = self._templates.get(shape) if shape is not None else None
        if template is not None:
            self._templates.move_to_end(shape)
        return parsed, shape, template

    def _compose(self, sweep_overrides: Sequence[str], parsed: list[Override],
                 shape: tuple | None) -> DictConfig:
        config = self.loader.load_sweep_config(self.master, list(sweep_overrides))
        if shape is not None and not self._aliased(config, parsed):
            self._templates[shape] = _Template(parsed, copy.deepcopy(config))
            while len(self._templates) > KEEP:
                self._templates.popitem(last=False)
        return config

    def _shape(self, parsed: list[Override]) -> tuple | None:
        """What a sibling must share: every line but the values of plain value overrides; None
        when the job cannot be derived: a search path change, keys that overlap, or a ``+`` or
        ``~`` on a key (Hydra checks those against values the plain overrides may change)."""
        if any(o.key_or_group == "hydra.searchpath" for o in parsed):
            return None
        settings = [o for o in parsed if not self._group(o)]
        if any(o.type in (OverrideType.ADD, OverrideType.DEL) for o in settings):
            return None
        values = [o.key_or_group for o in settings]
        shape = []
        for override in parsed:
            if self._plain_value(override):
                key = override.key_or_group
                if values.count(key) > 1 or any(
                        k.startswith(key + ".") or key.startswith(k + ".") for k in values):
                    return None
                shape.append(("value", key))
            else:
                shape.append(("line", override.input_line))
        return tuple(shape)

    def _aliased(self, config: DictConfig, parsed: list[Override]) -> bool:
        """Whether a key set by the job passes through an interpolated node: two keys may then
        name one node, and the order Hydra sets them in decides its value."""
        for override in parsed:
            if self._group(override):
                continue
            node: Any = config
            for part in override.key_or_group.split(".")[:-1]:
                try:
                    if OmegaConf.is_interpolation(node, part):
                        return True
                    node = node[part]
                except Exception as err:  # a path that Hydra alone can judge
                    self._fall_back(f"the path of {override.key_or_group}", err)
                    return True
                if not OmegaConf.is_config(node):
                    break
        return False

    def _group(self, override: Override) -> bool:
        """Whether Hydra takes the override as a config group choice (its defaults list)."""
        key = override.key_or_group
        if isinstance(override.value(), dict):
            return False
        if key not in self._groups:
            self._groups[key] = self._repository().group_exists(key)
        return self._groups[key]

    def _plain_value(self, override: Override) -> bool:
        key = override.key_or_group
        if (override.type != OverrideType.CHANGE or override.package is not None
                or override.value_type != ValueType.ELEMENT or key == "hydra"
                or override.is_hydra_override()
                or isinstance(override.value(), (dict, list))):
            return False
        return not self._group(override)

    def _repository(self) -> Any:
        if self._repo is None:
            self._repo = caching_repository(self.loader, self.master.hydra.job.config_name)
        return self._repo

    def _fall_back(self, what: str, err: Exception) -> None:
        """Say why Hydra composes a job instead of deriving it (once per cause and error)."""
        reason = f"{what} raised {type(err).__name__}"
        if reason not in self._said:
            self._said.add(reason)
            detail = str(err).strip().splitlines()
            log.info("composer: Hydra composes the job itself: %s%s", reason,
                     f" ({detail[0]})" if detail else "")

    def _set_values(self, config: DictConfig, template: _Template,
                    parsed: list[Override]) -> bool:
        """The job's values set on a copy of its sibling's config; False where Hydra must
        compose it (and raise its own error)."""
        for was, now in zip(template.overrides, parsed, strict=True):
            if was.input_line == now.input_line:
                continue
            try:
                OmegaConf.update(config, now.key_or_group, now.value(), merge=True)
            except Exception as err:  # Hydra's composition judges (and words) the value
                self._fall_back(f"setting {now.key_or_group}", err)
                return False
        return True

    def _finish(self, config: DictConfig, parsed: list[Override], write: bool = True) -> bool:
        """The fields Hydra writes per job: its task overrides, ``override_dirname`` (the run
        folder's name), copied environment and working directory (only read where not
        ``write``, for a check); False where they do not resolve (Hydra must compose it)."""
        try:
            naming = config.hydra.job.config.override_dirname
            task = [o for o in parsed if not o.is_hydra_override()]
            environment = {key: os.environ[key] for key in config.hydra.job.env_copy}
            dirname = overrides_dirname(task, naming)
            if not write:
                return True
            config.hydra.overrides.task = [o.input_line for o in task]
            with open_dict(config.hydra):
                for key, value in environment.items():
                    config.hydra.job.env_set[key] = value
            config.hydra.runtime.cwd = os.getcwd()
            config.hydra.job.override_dirname = dirname
        except Exception as err:  # a per-job field Hydra alone can resolve (or refuse)
            self._fall_back("writing Hydra's per-job fields", err)
            return False
        OmegaConf.copy_cache(from_config=self.master, to_config=config)
        return True


_COMPOSERS: weakref.WeakKeyDictionary[Any, SweepComposer] = weakref.WeakKeyDictionary()


def composer(config_loader: Any, master: DictConfig) -> SweepComposer:
    """The sweep's composer, shared by the sweeper's check and the launcher in this process."""
    found = _COMPOSERS.get(config_loader)
    if found is None or found.master is not master:
        found = _COMPOSERS[config_loader] = SweepComposer(config_loader, master)
    return found
